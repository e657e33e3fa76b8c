"""onefile_train.py: train GPT-2 from scratch in one file you can read from top to bottom, like nanoGPT's train.py.

recipes/pretrain.py's educational twin: model, data, AdamW with weight-decay groups (or Muon), warmup + cosine
schedule, clipping, accumulation, evaluation (loss, bits per byte), sampling, checkpoints and DDP, written out with
torch, numpy, `tokenizers` and `safetensors` (nothing from toolkit/). The same shape, tokenizer, data, seed and initial
weights give pretrain.py's loss curve (tests/test_onefile.py; docs/training_architecture.md maps the sections).

    python recipes/onefile_train.py                        # gpt2-micro on the embedded pydoc corpus (CPU: minutes)
    python recipes/onefile_train.py --train_file ../shared/data/tinyshakespeare/input.txt \
        --tokenizer_name ../shared/data/gpt2-tokenizer --output_dir out/shakespeare
    python recipes/onefile_train.py --token_store data/fineweb --preset gpt2   # a store from `toolkit prepare`
    python recipes/onefile_train.py --output_dir out/onefile --resume        # continue from OUTPUT_DIR/checkpoint
    python recipes/onefile_train.py --max_steps 0 --output_dir out/init      # only save the initial weights
    torchrun --nproc_per_node 2 recipes/onefile_train.py   # DDP: gloo on CPU, nccl on GPUs
Output folders load with from_pretrained: `pretrain.py --model_name_or_path out/init` starts from these weights.
"""

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import re
import shutil
import sys
import time
import timeit

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"

def die(message: str) -> None:  # user mistakes end with one line naming the problem and the fix, and exit status 2
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

# ---- Configuration: pretrain.py's flag names and defaults (so tests and benchmarks pass one command line to both).
LEARNING_RATE_BY_WIDTH = ((256, 3e-3), (512, 1e-3), (768, 6e-4), (1024, 3e-4), (1280, 2.5e-4), (10**9, 2e-4))
MUON_UP_TO_WIDTH = 256  # --optim auto picks Muon up to this width, as pretrain.py does (toolkit/presets.py says why)
PRESETS = {"gpt2-nano": (2, 2, 64, 256), "gpt2-micro": (4, 4, 128, 256), "gpt2-mini": (6, 6, 384, 256),
           "gpt2": (12, 12, 768, 1024), "gpt2-medium": (24, 16, 1024, 1024), "gpt2-large": (36, 20, 1280, 1024),
           "gpt2-xl": (48, 25, 1600, 1024)}  # (n_layer, n_head, n_embd, n_positions), as in toolkit/presets.py

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train GPT-2 in one file (see the module docstring).")
    a = p.add_argument
    a("--output_dir", default="out/onefile", help="the final model; OUTPUT_DIR/checkpoint: the latest checkpoint")
    a("--train_file", "--data", help=".txt/.md (one document) or .json/.jsonl (a 'text' per row); default: pydoc")
    a("--token_store", help="a folder written by `toolkit prepare` (train and validation shards, tokenizer)")
    a("--tokenizer_name", help="tokenizer.json or vocab.json + merges.txt folder; default: the store's, or a new BPE")
    a("--preset", "--model", choices=PRESETS, help="model shape (default gpt2-micro; with a shape flag, gpt2: the "
      "guide's --n_layer 48 --n_head 16 --n_embd 1600 is GPT-2 1.5B, as in pretrain.py); --model: other guides' name")
    for name in ("n_layer", "n_head", "n_embd", "n_positions"):
        a(f"--{name}", type=int, help="override the preset")
    a("--max_steps", "--steps", type=int, default=400, help="optimizer updates (0: save the initial weights only)")
    a("--vocab_size", type=int, help="the BPE trained when no tokenizer is given (4096; 50257 for a GPT-2 shape)")
    a("--learning_rate", type=float, help="peak learning rate; default: by model width (LEARNING_RATE_BY_WIDTH)")
    a("--optim", choices=["auto", "adamw_torch_fused", "muon"], default="auto", help="auto: muon up to 256 wide")
    a("--warmup_steps", type=float, default=50, help="linear warmup updates (below 1: a fraction of max_steps)")
    for name in ("eval_strategy", "save_strategy"):
        a(f"--{name}", choices=["steps", "no"], default="steps")
    a("--overwrite_output_dir", action="store_true", help="replace a finished or interrupted run in output_dir")
    a("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint (nanoGPT's init_from='resume')")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--compile", action="store_true", help="torch.compile the model (slow start, faster GPU steps)")
    for name, default in (("block_size", 128), ("per_device_train_batch_size", 16), ("per_device_eval_batch_size", 32),
                          ("gradient_accumulation_steps", 1), ("validation_split_percentage", 5),
                          ("logging_steps", 10), ("eval_steps", 200), ("save_steps", 200), ("seed", 42),
                          ("sample_max_new_tokens", 64), ("muon_learning_rate", 0.05), ("min_lr_rate", 0.1),
                          ("weight_decay", 0.1), ("adam_beta1", 0.9), ("adam_beta2", 0.95), ("max_grad_norm", 1.0),
                          ("dropout", 0.0)):  # the type is the default's: int or float
        a(f"--{name}", type=type(default), default=default, help=f"default: {default}")
    # Other guides write options with dashes: --n-layer 48 and --max-steps=10 mean --n_layer 48 and --max_steps=10.
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args([re.sub(r"^--[\w-]+", lambda m: "--" + m[0][2:].replace("-", "_"), t) for t in argv])
    for name in ("max_steps", "block_size", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps"):
        if getattr(args, name) < (low := int(name != "max_steps")):  # --max_steps 0: only the initial weights
            die(f"--{name} must be at least {low}; pass a larger integer")
    # Shape flags without a preset start from GPT-2's own shape and vocabulary (pretrain.py's rule).
    args.gpt2_shape = args.preset is None and any(getattr(args, n) for n in ("n_layer", "n_head", "n_embd"))
    args.preset = args.preset or ("gpt2" if args.gpt2_shape else "gpt2-micro")
    args.vocab_size = args.vocab_size or (50257 if args.gpt2_shape else 4096)
    for name, value in zip(("n_layer", "n_head", "n_embd", "n_positions"), PRESETS[args.preset]):
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    args.warmup_steps = int(w) if (w := args.warmup_steps) >= 1 else math.ceil(args.max_steps * w)
    return args

# ---- The model: GPT-2 as transformers' GPT2LMHeadModel computes it, with its module names (checkpoints convert).
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)  # c_attn: q, k, v at once

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # heads apart
        # One fused kernel for softmax(q k^T / sqrt(d)) v; the causal mask lets position t see positions <= t only.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return F.dropout(self.c_proj(y), self.dropout, self.training)

class Block(nn.Module):  # pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))
    def __init__(self, n_embd, n_head, dropout, eps):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd, eps=eps), CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2, self.dropout = nn.LayerNorm(n_embd, eps=eps), dropout
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(n_embd, 4 * n_embd), c_proj=nn.Linear(4 * n_embd, n_embd)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h = F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh")  # GPT-2's tanh GELU ("gelu_new" in transformers)
        return x + F.dropout(self.mlp.c_proj(h), self.dropout, self.training)

class GPT(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg, d, eps = cfg, cfg["n_embd"], cfg["layer_norm_epsilon"]
        self.transformer = nn.ModuleDict(dict(  # token and (learned) position embeddings, blocks, final LayerNorm
            wte=nn.Embedding(cfg["vocab_size"], d), wpe=nn.Embedding(cfg["n_positions"], d),
            h=nn.ModuleList(Block(d, cfg["n_head"], cfg["dropout"], eps) for _ in range(cfg["n_layer"])),
            ln_f=nn.LayerNorm(d, eps=eps)))
        # GPT-2 initialisation: N(0, 0.02) weights and embeddings, zero biases, LayerNorm (1, 0); the projections into
        # the residual stream (c_proj) get 0.02/sqrt(2*n_layer), so its variance does not grow with depth.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg["n_layer"]) if "c_proj" in name else 0.02)
            else:
                nn.init.ones_(p) if ".ln_" in name and name.endswith(".weight") else nn.init.zeros_(p)

    def forward(self, idx, labels=None):
        """Logits (B, T, V); with labels (== idx for packed blocks), (logits of positions 0..T-2, loss)."""
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.size(1), device=idx.device))
        x = F.dropout(x, self.cfg["dropout"], self.training)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if labels is None:  # the output projection IS the token embedding (tied, as in GPT-2): logits = x wte^T
            return F.linear(x, self.transformer.wte.weight)
        # Position t predicts token t+1 (HF's shifted loss): the mean over B*(T-1) predictions; the last has no target.
        logits = F.linear(x[:, :-1], self.transformer.wte.weight)
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.8, top_k=50, generator=None):
        """Sample one token at a time among the top_k likeliest, feeding the sequence back in (no KV cache)."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg["n_positions"]:])[:, -1, :] / temperature
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            probs = F.softmax(logits.masked_fill(logits < kth, -float("inf")), dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx

# ---- Checkpoints in Hugging Face format, so GPT2LMHeadModel.from_pretrained reads them: HF's names, its Conv1D
# (in, out) layout where nn.Linear is (out, in), and no lm_head.weight (tied_word_embeddings: it is wte).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_SHAPE = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon")  # config.json's names

def save_hf(model: GPT, tokenizer, eos_id: int, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    cfg, drop = model.cfg, model.cfg["dropout"]
    config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_inner=None, activation_function="gelu_new",
                  resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop, tie_word_embeddings=True, bos_token_id=eos_id,
                  eos_token_id=eos_id, dtype="float32", **{k: cfg[k] for k in GPT2_SHAPE},
                  training_block_size=cfg.get("block_size"))  # `toolkit eval` scores windows of the trained length
    tensors = {name: (t.t() if name.endswith(CONV1D) else t).detach().float().cpu().contiguous()
               for name, t in model.state_dict().items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))  # AutoTokenizer.from_pretrained(folder) gives it back
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=EOS, eos_token=EOS, unk_token=EOS,
                       model_max_length=cfg["n_positions"]), f, indent=2)

def load_checkpoint(folder: str, dropout: float = 0.0) -> GPT:  # what save_hf wrote, as a GPT again (--resume)
    with open(os.path.join(folder, "config.json")) as f:
        model = GPT(dict({k: v for k, v in json.load(f).items() if k in GPT2_SHAPE}, dropout=dropout))
    state = {n: t.t() if n.endswith(CONV1D) else t for n, t in load_file(f"{folder}/model.safetensors").items()}
    model.load_state_dict(state)
    return model

# ---- Tokenizer: a byte-level BPE (GPT-2's scheme: any text round-trips, one special token <|endoftext|>).
def load_tokenizer(folder: str):
    file = functools.partial(os.path.join, folder)
    if os.path.isfile(file("tokenizer.json")):
        tok = Tokenizer.from_file(file("tokenizer.json"))
    elif os.path.isfile(file("vocab.json")) and os.path.isfile(file("merges.txt")):  # GPT-2's own files, as HF reads
        tok = Tokenizer(models.BPE.from_file(file("vocab.json"), file("merges.txt")))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.add_special_tokens([EOS])
    else:
        die(f"'{folder}' holds neither tokenizer.json nor vocab.json + merges.txt; pass a GPT-2 tokenizer folder")
    if tok.token_to_id(EOS) is None:
        die(f"the tokenizer in '{folder}' has no {EOS} token to separate documents; use a GPT-2 style tokenizer")
    return tok

def train_tokenizer(documents, vocab_size: int):
    # toolkit/tokenizer.py's train_bpe_tokenizer, copied: the same settings, so both recipes see the same tokens.
    if vocab_size < 257:
        die(f"--vocab_size {vocab_size} is too small for a byte-level BPE; use at least 257 (256 bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    return tok

# ---- Data: documents -> token stream (EOS after every document) -> fixed-length blocks.
def read_documents(path):
    """A .txt/.md file is ONE document (like datasets' text loader with sample_by='document'); .json/.jsonl rows
    are documents (their 'text' field); no file: the standard library's pydoc topics, one per topic."""
    if path is None:
        from pydoc_data.topics import topics
        return [topics[k] for k in sorted(topics)]
    if not os.path.isfile(path) or not path.endswith((".txt", ".text", ".md", ".json", ".jsonl")):
        die(f"'{path}' is not an existing .txt/.md/.json/.jsonl file; use recipes/pretrain.py for parquet or Hub data")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith((".json", ".jsonl")):
        return [text]
    try:  # a JSON array, or one JSON object per line
        lines = filter(str.strip, text.splitlines())
        rows = json.loads(text) if text.lstrip().startswith("[") else map(json.loads, lines)
        return [row["text"] for row in rows]
    except (ValueError, KeyError, TypeError):
        die(f"'{path}' is not JSON lines with a 'text' field per row; write one {{\"text\": ...}} object per line")

def split_validation(streams, percentage, max_tokens=5_000_000):
    """pretrain.py's rule (toolkit prepare): every round(100/P)-th document is held out, until the validation split
    has max_tokens; training never sees a validation document. One document (a single .txt): its last P% of tokens."""
    if len(streams) == 1:
        tail = min(max_tokens, max(1, round(len(streams[0]) * percentage / 100)))
        return streams[0][:-tail], streams[0][-tail:]
    every, train, val, n_val = round(100 / percentage), [], [], 0
    for i, s in enumerate(streams):
        if i % every == 0 and n_val < max_tokens:
            val.append(s)
            n_val += len(s)
        else:
            train.append(s)
    return np.concatenate(train), np.concatenate(val)

def read_store(store, vocab):
    """A `toolkit prepare` store (manifest.json + raw token shards) -> its train and validation shards, each one
    memory-mapped as nanoGPT maps train.bin. Blocks copies out the rows of one batch at a time, so the process holds a
    batch, not the store: the pages read are the kernel's page cache, which it drops under memory pressure."""
    path = os.path.join(store, "manifest.json")
    if not os.path.isfile(path):
        die(f"'{store}' has no manifest.json; pass a folder written by `toolkit prepare`")
    with open(path) as f:
        manifest = json.load(f)
    if not manifest.get("complete"):
        die(f"token store '{store}' is incomplete; rerun the `toolkit prepare` command that writes it to finish it")
    if manifest["tokenizer"]["vocab_size"] > vocab:  # the store's ids go up to its own tokenizer's size
        die(f"'{store}' holds ids beyond this tokenizer; drop --tokenizer_name to use the store's own")
    return ([np.memmap(os.path.join(store, s["file"]), dtype=manifest["dtype"], mode="r")
             for s in manifest["splits"][split]["shards"]] for split in ("train", "validation"))

class Blocks:
    """A token stream in pieces (a store's shards, or one array) as n rows of block_size tokens, read when indexed."""

    def __init__(self, pieces, block_size):
        self.pieces, self.T = pieces, block_size
        self.starts = np.cumsum([0] + [len(p) for p in pieces])  # where each piece begins in the stream
        self.n = int(self.starts[-1]) // block_size

    def row(self, i):  # tokens [i*T, (i+1)*T) of the stream, which may span two pieces
        start, end, parts = i * self.T, (i + 1) * self.T, []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:  # a slice past a piece's end stops there; the rest comes from the next piece
            parts.append(self.pieces[k][start - self.starts[k]:end - self.starts[k]])
            start, k = start + len(parts[-1]), k + 1
        return np.concatenate(parts)

    def __getitem__(self, index):  # a slice or a tensor of block indices -> (n, block_size) int64
        rows = range(self.n)[index] if isinstance(index, slice) else index.tolist()
        return torch.from_numpy(np.stack([self.row(i) for i in rows]).astype(np.int64))

@functools.lru_cache(maxsize=1)  # one epoch's order, kept for its steps
def epoch_order(n_train, seed, epoch):
    """The block order of one epoch exactly as HF Trainer + accelerate draw it (the parity tests need it): a
    permutation seeded with seed + epoch. Batch b of rank r is its slice (b * world + r) * B ... + B: consecutive
    slices of B blocks dealt round-robin to the ranks, a partial last batch and leftovers that cannot go to every rank
    dropped (see batches_per_rank)."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + epoch))

# ---- Muon (as toolkit/muon.py): each hidden matrix moves along U V^T of its Nesterov momentum's SVD, from 5 Newton-
# Schulz iterations (bf16 on GPUs, fp32 on CPUs), with decoupled weight decay and a step sqrt(max(1, out/in)) x lr.
class Muon(torch.optim.Optimizer):  # Muon(params, dict(lr=..., weight_decay=...))
    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                x = p.grad.lerp(buf.lerp_(p.grad, 1 - 0.95), 0.95)
                x = x.bfloat16() if x.is_cuda else x.float()
                x = x if x.size(0) <= x.size(1) else x.T  # iterate on the smaller Gram matrix
                x = x / x.norm().clamp(min=1e-7)
                for _ in range(5):
                    gram = x @ x.T
                    x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
                x = (x if p.size(0) <= p.size(1) else x.T).to(p.dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(x, alpha=-group["lr"] * math.sqrt(max(1.0, p.size(0) / p.size(1))))  # nn.Linear: (out, in)

# ---- Learning-rate schedule: linear warmup from 0, then cosine decay to min_lr_rate * learning_rate at
# max_steps (transformers' "cosine_with_min_lr"). Update k uses lr * f(k); f(0) = 0 with warmup, as in HF.
def lr_factor(k, warmup, max_steps, min_lr_rate):
    if k < warmup:
        return float(k) / float(max(1, warmup))
    progress = float(k - warmup) / float(max(1, max_steps - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - min_lr_rate) + min_lr_rate)

# ---- MFU (model FLOPs utilisation): training FLOPs per token are 6N for the weight matmuls (2N forward, 4N backward;
# N without the position table, only indexed) plus 12*L*d*T for attention (PaLM appendix B), against the dense bf16
# data-sheet peak on GPUs (toolkit/flops.py's table; a test pins the two) or a measured fp32 matmul on CPU.
GPU_PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                 "A100": 312e12, "A10G": 125e12, "L4": 121e12, "L40S": 362e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
                 "V100": 125e12, "T4": 65e12}

def gpu_peak(name):  # the entry whose words all appear in the device name, longest first: 'H100 NVL' before 'H100'
    return next((GPU_PEAK_BF16[key] for key in sorted(GPU_PEAK_BF16, key=len, reverse=True)
                 if all(word in name.upper() for word in key.upper().split())), None)

@functools.lru_cache(maxsize=None)  # measure once per process
def peak_flops(device) -> tuple[float | None, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak(name), f"{name} bf16 data sheet" if gpu_peak(name) else f"{name}: unknown peak"
    a = torch.randn(2048, 2048)
    seconds = min(timeit.repeat(lambda: torch.mm(a, a), number=1, repeat=5))  # the fastest: the first warms up
    return 2 * 2048**3 / seconds, "CPU fp32 2048x2048 matmul, measured"

def main(argv=None):
    args = parse_args(argv)
    B, T, G = args.per_device_train_batch_size, args.block_size, args.gradient_accumulation_steps

    # ---- Distributed setup: torchrun starts one process per device (RANK, WORLD_SIZE); each trains a full copy of the
    # model on its own batches, and DDP averages the gradients during backward.
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)  # before the process group: NCCL works on the current device
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    bf16 = use_cuda and torch.cuda.is_bf16_supported()  # autocast (fp32 weights); fp32 on CPU, where bf16 is slow
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    torch.manual_seed(args.seed)  # the same initial weights on every rank, and in every run with this seed and shape

    def log(message, **metrics_entry):  # rank 0 prints; an entry also goes to metrics.jsonl (opened below)
        if master:
            print(message)
            if metrics_entry:
                print(json.dumps(metrics_entry), file=metrics)  # line-buffered: on disk at once

    # ---- Output folder: one checkpoint, OUTPUT_DIR/checkpoint (nanoGPT's ckpt.pt), which --resume continues from.
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    if args.resume and not os.path.isfile(os.path.join(ckpt_dir, "training_state.pt")):
        die(f"--resume: '{ckpt_dir}' holds no checkpoint; run without --resume to start a new run there")
    if not args.resume and (os.path.exists(ckpt_dir) or os.path.exists(os.path.join(args.output_dir, "config.json"))):
        if not args.overwrite_output_dir:
            die(f"'{args.output_dir}' holds a run; pass --resume, --overwrite_output_dir or another --output_dir")
        if master:  # an old checkpoint must not be resumed into the new run later
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    # ---- Data and tokenizer: documents -> tokens with EOS after each -> a training and a validation stream -> blocks.
    docs = None if args.token_store else read_documents(args.train_file)
    store_tokenizer = args.token_store and os.path.join(args.token_store, "tokenizer")
    tok_folder = args.tokenizer_name or (ckpt_dir if args.resume else store_tokenizer)
    if not tok_folder:  # rank 0 trains the BPE and the others read its file: one tokenizer however many processes run
        tok_folder = args.output_dir
        if master:
            os.makedirs(args.output_dir, exist_ok=True)
            train_tokenizer(docs, args.vocab_size).save(os.path.join(args.output_dir, "tokenizer.json"))
        if ddp:
            dist.barrier()
    tokenizer = load_tokenizer(tok_folder)
    eos_id, vocab = tokenizer.token_to_id(EOS), tokenizer.get_vocab_size(with_added_tokens=True)
    if args.token_store:
        train_pieces, val_pieces = read_store(args.token_store, vocab)
    else:
        streams = [np.array(e.ids + [eos_id], dtype=np.int64)  # each document's ids, then EOS
                   for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
        train_pieces, val_pieces = ([stream] for stream in split_validation(streams, args.validation_split_percentage))
    train_blocks, val_blocks = Blocks(train_pieces, T), Blocks(val_pieces, T)
    if train_blocks.n < B * world or val_blocks.n == 0:
        die(f"{train_blocks.n} training, {val_blocks.n} validation blocks of {T} tokens: under a batch per "
            "process or no validation block; use more text or lower --block_size / --per_device_train_batch_size")
    # Bits per byte (comparable across tokenizers) needs the UTF-8 bytes of the scored validation tokens (all but each
    # block's first). A byte-level BPE writes each byte as one character, so a token's bytes = its length; EOS has 0.
    token_bytes = torch.zeros(vocab, dtype=torch.long)
    for piece, i in tokenizer.get_vocab(with_added_tokens=True).items():
        token_bytes[i] = 0 if i == eos_id else len(piece)
    scored = val_blocks[:][:, 1:]  # the validation split is small (toolkit prepare caps it at 5M tokens)
    val_bytes_per_token = token_bytes[scored].sum().item() / scored.numel()

    # ---- Model: from the checkpoint, or fresh with GPT-2 init. The embedding is padded to a multiple of 64
    # (nanoGPT: 50304 instead of 50257 makes GPU matmuls faster); the extra rows never appear as targets.
    if args.resume:
        model = load_checkpoint(ckpt_dir, args.dropout)
    elif args.n_embd % args.n_head:
        die(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}; pick an n_head that divides n_embd")
    else:
        rows = max(vocab, args.vocab_size) if args.gpt2_shape and not args.tokenizer_name else vocab
        model = GPT(dict(vocab_size=math.ceil(rows / 64) * 64, n_positions=args.n_positions, n_embd=args.n_embd,
                         n_layer=args.n_layer, n_head=args.n_head, layer_norm_epsilon=1e-5, dropout=args.dropout))
    cfg = model.cfg
    cfg["block_size"] = T
    if T > cfg["n_positions"] or vocab > cfg["vocab_size"]:
        die(f"--block_size {T} or the tokenizer's {vocab} tokens exceed the model's n_positions {cfg['n_positions']} "
            f"or vocab_size {cfg['vocab_size']}; lower --block_size (or raise --n_positions), or use its tokenizer")
    raw_model = model.to(device)  # unwrapped, for evaluating, saving and sampling
    model = torch.compile(model) if args.compile else model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)

    # ---- Optimizer: AdamW, weight decay on the matrices only (p.dim() >= 2: the set transformers'
    # get_decay_parameter_names picks by name); with Muon, the blocks' matrices move with Muon (listed first).
    params = [p for p in raw_model.parameters() if p.requires_grad]  # wte, also the head, appears once
    if args.learning_rate is None:  # wider models need a smaller step (see LEARNING_RATE_BY_WIDTH)
        args.learning_rate = next(lr for width, lr in LEARNING_RATE_BY_WIDTH if cfg["n_embd"] <= width)
    if args.optim == "auto":
        args.optim = "muon" if cfg["n_embd"] <= MUON_UP_TO_WIDTH else "adamw_torch_fused"
    muon = {id(p): p for n, p in raw_model.named_parameters() if args.optim == "muon" and ".h." in n and p.dim() == 2}
    groups = [dict(params=[p for p in params if p.dim() >= 2 and id(p) not in muon], weight_decay=args.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    optimizers = [torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                    fused=device.type in ("cuda", "cpu"))]  # one fused kernel for all parameters
    if muon:
        optimizers.insert(0, Muon([*muon.values()], dict(lr=args.muon_learning_rate, weight_decay=args.weight_decay)))
    peak_lrs = [g["lr"] for opt in optimizers for g in opt.param_groups]  # the schedule scales each group's peak
    step = 0
    if args.resume:  # the optimizers' moments, the step, and the RNG, so dropout masks go on as if never interrupted
        state = torch.load(os.path.join(ckpt_dir, "training_state.pt"), map_location=device, weights_only=True)
        for opt, saved in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(saved)
        step = state["step"]
        torch.set_rng_state(state["rng"].cpu())

    # ---- The training loop. One iteration = one optimizer update = G micro-batches per process. First: the epoch's
    # length, FLOPs per token (for MFU), and the metrics file (appended to when resuming).
    batches_per_rank = (train_blocks.n // B) // world  # per epoch
    updates_per_epoch = math.ceil(batches_per_rank / G)  # the last update may use fewer micro-batches
    n_params, (peak, peak_src) = sum(p.numel() for p in params), peak_flops(device)
    flops_per_token = 6 * (n_params - cfg["n_positions"] * cfg["n_embd"]) + 12 * cfg["n_layer"] * cfg["n_embd"] * T
    if master:
        os.makedirs(args.output_dir, exist_ok=True)
        metrics = open(os.path.join(args.output_dir, "metrics.jsonl"), "a" if args.resume else "w", buffering=1)
    log(f"model: {cfg['n_layer']} layers, {cfg['n_head']} heads, width {cfg['n_embd']}, vocab {cfg['vocab_size']}: "
        f"{n_params:,} parameters | peak lr {args.learning_rate:g} | data: {train_blocks.n} train / {val_blocks.n} "
        f"val blocks of {T} tokens | {world} process(es) on {device.type}{' (bf16 autocast)' if bf16 else ''} | peak "
        f"{peak or 0:.3g} FLOP/s ({peak_src})" + (f" | resumed from {ckpt_dir} at step {step}" if args.resume else ""))
    loss_sum, steps_since_log, tokens_per_step = torch.zeros((), device=device), 0, G * world * B * T
    t_last = time.perf_counter()
    while step < args.max_steps:
        # The data position is a pure function of the step, so a resumed run continues the same order.
        epoch, u = divmod(step, updates_per_epoch)
        order = epoch_order(train_blocks.n, args.seed, epoch)
        micro = [order[(b * world + rank) * B:(b * world + rank + 1) * B]
                 for b in range(u * G, min((u + 1) * G, batches_per_rank))]
        lr_scale = lr_factor(step, args.warmup_steps, args.max_steps, args.min_lr_rate)
        for group, peak_lr in zip((g for opt in optimizers for g in opt.param_groups), peak_lrs):
            group["lr"] = peak_lr * lr_scale
        for i, idx in enumerate(micro):
            x = train_blocks[idx].to(device, non_blocking=True)
            # Gradient accumulation: the gradients add up in .grad; each loss over the number of micro-batches makes
            # the sum the update's mean. DDP's all-reduce (a mean over processes) runs on the last one only (no_sync).
            with (model.no_sync() if ddp and i < len(micro) - 1 else contextlib.nullcontext()), autocast:
                loss = model(x, labels=x)[1] / len(micro)
            loss.backward()
            loss_sum += loss.detach()  # stays on the device: no synchronisation per step
        # Clip the global gradient norm to max_grad_norm (0: no clipping): one bad batch cannot blow the weights up.
        if args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        step, steps_since_log = step + 1, steps_since_log + 1

        if step % args.logging_steps == 0 or step == args.max_steps:
            if ddp:  # the mean over processes; only at log time, as it synchronises
                dist.all_reduce(loss_sum)
            loss_val, lr = loss_sum.item() / steps_since_log / world, args.learning_rate * lr_scale
            # tokens/s over the steps since the last log line; MFU = the FLOP/s that makes / the peak
            tok_s = steps_since_log * tokens_per_step / (time.perf_counter() - t_last)
            mfu = flops_per_token * tok_s / (peak * world) if peak else None
            log(f"step {step}/{args.max_steps} | loss {loss_val:.4f} | lr {lr:.3e} | {tok_s:,.0f} tok/s"
                + (f" | mfu {100 * mfu:.2f}%" if mfu is not None else ""),
                step=step, loss=loss_val, lr=lr, tokens_per_s=tok_s, mfu=mfu,
                grad_norm=grad_norm.item() if args.max_grad_norm > 0 else None)
            loss_sum.zero_()
            steps_since_log, t_last = 0, time.perf_counter()
        t_pause = time.perf_counter()
        if args.eval_strategy == "steps" and (step % args.eval_steps == 0 or step == args.max_steps):
            # Mean cross-entropy over every validation prediction (each block has T-1); ranks share the batches.
            model.eval()
            E, total = args.per_device_eval_batch_size, torch.zeros((), device=device)
            with torch.no_grad(), autocast:
                for i in range(rank * E, val_blocks.n, world * E):
                    x = val_blocks[i:i + E].to(device)
                    total += raw_model(x, labels=x)[1].float() * len(x)
            if ddp:
                dist.all_reduce(total)
            model.train()
            val = total.item() / val_blocks.n
            ppl, bpb = math.exp(min(val, 50)), val / (math.log(2) * val_bytes_per_token)  # nats/token -> bits/byte
            log(f"step {step} | eval loss {val:.4f} | perplexity {ppl:.2f} | bits per byte {bpb:.4f}",
                step=step, eval_loss=val, eval_perplexity=ppl, eval_bits_per_byte=bpb)
        # A checkpoint (at the last step too, for --resume with more steps), swapped in whole after it is written.
        if args.save_strategy == "steps" and (step % args.save_steps == 0 or step == args.max_steps):
            if master:
                save_hf(raw_model, tokenizer, eos_id, ckpt_dir + ".tmp")
                torch.save({"step": step, "optimizers": [o.state_dict() for o in optimizers],
                            "rng": torch.get_rng_state()}, os.path.join(ckpt_dir + ".tmp", "training_state.pt"))
                shutil.rmtree(ckpt_dir, ignore_errors=True)
                os.replace(ckpt_dir + ".tmp", ckpt_dir)
            if ddp:
                dist.barrier()
        t_last += time.perf_counter() - t_pause  # evaluating and saving is not training time

    # ---- Save the final model (a save_pretrained folder) and show what it learned: the start of a new document.
    if master:
        save_hf(raw_model, tokenizer, eos_id, args.output_dir)
        metrics.close()
        print(f"saved to {args.output_dir}")
        if args.sample_max_new_tokens > 0:
            raw_model.eval()
            with autocast:
                out = raw_model.generate(torch.tensor([[eos_id]], device=device), args.sample_max_new_tokens,
                                         generator=torch.Generator(device=device).manual_seed(args.seed))
            print("sample:", tokenizer.decode(out[0].tolist()))  # decode drops the special EOS
    if ddp:
        # The DDP wrapper goes first: its gradient reducer holds the process group, and if the reducer dropped the last
        # reference, the group's teardown would wait for gloo's threads while holding Python's lock, which a thread
        # still freeing an all-reduce's tensors needs: a hang at exit (pytorch/pytorch#56297). Freed here, then the
        # group's own teardown runs without that lock.
        del model
        gc.collect()
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
