"""onefile_train.py: train GPT-2 from scratch in one file you can read from top to bottom.

The educational twin of recipes/pretrain.py (HF Trainer + toolkit/), in the manner of nanoGPT's train.py: the GPT-2
model, data and batching, AdamW with weight-decay groups (or Muon), warmup + cosine schedule, clipping, accumulation,
evaluation (loss, bits per byte), sampling, checkpoints and DDP, written out by hand with torch, numpy, `tokenizers`
and `safetensors` (nothing from toolkit/). The same model config, tokenizer, data, seed and initial weights give
pretrain.py's loss curve (tests/test_onefile.py); docs/training_architecture.md maps each section to the modular
version. For a separate validation file, a sampling prompt, parquet or Hub data, FSDP2 or a Hub push: pretrain.py.

    python recipes/onefile_train.py                        # gpt2-micro on the embedded pydoc corpus (CPU: minutes)
    python recipes/onefile_train.py --train_file ../shared/data/tinyshakespeare/input.txt \
        --tokenizer_name ../shared/data/gpt2-tokenizer --output_dir out/shakespeare
    python recipes/onefile_train.py --token_store data/fineweb --preset gpt2   # a store from `toolkit prepare`
    python recipes/onefile_train.py --init_from out/onefile --output_dir out/more   # start from HF GPT-2 weights
    python recipes/onefile_train.py --output_dir out/onefile --resume        # continue from OUTPUT_DIR/checkpoint
    torchrun --nproc_per_node 2 recipes/onefile_train.py   # DDP: gloo on CPU, nccl on GPUs
The output folder loads with transformers' GPT2LMHeadModel / AutoTokenizer.from_pretrained. To compare CPU speed
with pretrain.py (which keeps freed memory: 20-30% faster small steps), run this one with
GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1000000000000000000.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import re
import shutil
import sys
import time

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


# -----------------------------------------------------------------------------------------------------
# Configuration. Flag names and defaults are recipes/pretrain.py's, so one command line fits both: the parity tests
# (tests/test_onefile.py), the GPU test and the benchmarks pass the same flags to the two recipes, which is why
# --eval_strategy, --save_strategy and --per_device_eval_batch_size are here. Default: gpt2-micro, embedded corpus.
# Peak learning rate by model width when --learning_rate is not given, as in toolkit/presets.py: 3e-3 for the small
# CPU models (best for gpt2-micro at a fixed CPU budget), 1e-3 up to 512 wide, then GPT-3's values for GPT-2's widths.
LEARNING_RATE_BY_WIDTH = ((256, 3e-3), (512, 1e-3), (768, 6e-4), (1024, 3e-4), (1280, 2.5e-4), (10**9, 2e-4))
MUON_UP_TO_WIDTH = 256  # --optim auto picks Muon up to this width, as pretrain.py does (toolkit/presets.py)
PRESETS = {"gpt2-nano": (2, 2, 64, 256), "gpt2-micro": (4, 4, 128, 256), "gpt2-mini": (6, 6, 384, 256),
           "gpt2": (12, 12, 768, 1024), "gpt2-medium": (24, 16, 1024, 1024), "gpt2-large": (36, 20, 1280, 1024),
           "gpt2-xl": (48, 25, 1600, 1024)}  # (n_layer, n_head, n_embd, n_positions), as in toolkit/presets.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train GPT-2 in one file (see the module docstring).")
    a = p.add_argument
    a("--output_dir", default="out/onefile", help="the final model; OUTPUT_DIR/checkpoint: the latest checkpoint")
    a("--train_file", "--data", help=".txt/.md (one document) or .json/.jsonl (a 'text' per row); default: pydoc")
    a("--token_store", help="a folder written by `toolkit prepare` (train and validation shards, tokenizer)")
    a("--tokenizer_name", help="tokenizer.json or vocab.json + merges.txt folder; default: the model's, or a new BPE")
    a("--init_from", help="start from this save_pretrained GPT-2 folder")
    a("--model", help="other guides' form: a preset name, else a folder to start from (--init_from)")
    a("--preset", choices=PRESETS, help="model shape when training from scratch (default gpt2-micro; with a shape "
      "flag, gpt2: the guide's --n_layer 48 --n_head 16 --n_embd 1600 is GPT-2 1.5B, as in pretrain.py)")
    for name in ("n_layer", "n_head", "n_embd", "n_positions"):
        a(f"--{name}", type=int, help="override the preset")
    a("--max_steps", "--steps", type=int, default=400, help="optimizer updates")
    a("--vocab_size", type=int, help="size of the BPE trained when no tokenizer is given (4096; GPT-2's 50257 for a "
      "GPT-2 shape, whose embedding keeps GPT-2's rows however many the BPE learns)")
    a("--learning_rate", type=float, help="peak learning rate; default: by model width (LEARNING_RATE_BY_WIDTH)")
    a("--optim", choices=["auto", "adamw_torch_fused", "muon"], default="auto",
      help="muon: Muon for the blocks' matrices, AdamW for the rest; auto: muon up to MUON_UP_TO_WIDTH wide")
    a("--warmup_steps", type=float, default=50, help="linear warmup updates (below 1: a fraction of max_steps)")
    a("--eval_strategy", choices=["steps", "no"], default="steps")
    a("--save_strategy", choices=["steps", "no"], default="steps")
    a("--overwrite_output_dir", action="store_true", help="replace a finished or interrupted run in output_dir")
    a("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint (nanoGPT's init_from='resume')")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--compile", action="store_true", help="torch.compile the model (slow start, faster GPU steps)")
    for name, default in (("block_size", 128), ("per_device_train_batch_size", 16), ("per_device_eval_batch_size", 32),
                          ("gradient_accumulation_steps", 1), ("validation_split_percentage", 5),
                          ("logging_steps", 10), ("eval_steps", 200), ("save_steps", 200), ("seed", 42),
                          ("sample_max_new_tokens", 64)):
        a(f"--{name}", type=int, default=default, help=f"default: {default}")
    for name, default in (("muon_learning_rate", 0.05), ("min_lr_rate", 0.1), ("weight_decay", 0.1),
                          ("adam_beta1", 0.9), ("adam_beta2", 0.95), ("max_grad_norm", 1.0), ("dropout", 0.0)):
        a(f"--{name}", type=float, default=default, help=f"default: {default}")
    # Other guides write options with dashes: --n-layer 48 and --max-steps=10 mean --n_layer 48 and --max_steps=10.
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args([re.sub(r"^--[\w-]+", lambda m: "--" + m[0][2:].replace("-", "_"), t) for t in argv])
    for name in ("block_size", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "max_steps", "logging_steps", "eval_steps", "save_steps"):
        if getattr(args, name) < 1:
            die(f"--{name} must be at least 1; pass a positive integer")
    if args.model:  # other guides' --model: a preset name, else a folder to start from
        setattr(args, "preset" if args.model in PRESETS else "init_from", args.model)
    # Shape flags without a preset start from GPT-2's own shape and vocabulary (pretrain.py's rule).
    args.gpt2_shape = (args.preset is None and not args.init_from
                       and any(getattr(args, n) is not None for n in ("n_layer", "n_head", "n_embd")))
    args.preset = args.preset or ("gpt2" if args.gpt2_shape else "gpt2-micro")
    args.vocab_size = args.vocab_size or (50257 if args.gpt2_shape else 4096)
    for name, value in zip(("n_layer", "n_head", "n_embd", "n_positions"), PRESETS[args.preset]):
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    w = args.warmup_steps
    args.warmup_steps = int(w) if w >= 1 else math.ceil(args.max_steps * w)
    return args


# -----------------------------------------------------------------------------------------------------
# The model: GPT-2 exactly as transformers' GPT2LMHeadModel computes it. Module names are the HF names
# (transformer.h.0.attn.c_attn, ...) so checkpoints convert by name; the only difference is that HF's
# Conv1D stores weights as (in, out) where nn.Linear stores (out, in): we transpose on save/load.
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # query, key, value for all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): every head attends independently.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Fused kernel (flash/memory-efficient on GPU, a fused CPU kernel otherwise): softmax(q k^T / sqrt(d)) v
        # with the causal mask applied inside, so position t only sees positions <= t.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd, dropout):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # GPT-2 uses the tanh approximation of GELU ("gelu_new" in transformers)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):  # pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))
    def __init__(self, n_embd, n_head, dropout, eps):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd, eps=eps), CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2, self.mlp = nn.LayerNorm(n_embd, eps=eps), MLP(n_embd, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        d, drop, eps = cfg["n_embd"], cfg.get("dropout", 0.0), cfg["layer_norm_epsilon"]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg["vocab_size"], d),  # token embeddings
            wpe=nn.Embedding(cfg["n_positions"], d),  # learned position embeddings
            drop=nn.Dropout(drop),
            h=nn.ModuleList(Block(d, cfg["n_head"], drop, eps) for _ in range(cfg["n_layer"])),
            ln_f=nn.LayerNorm(d, eps=eps),
        ))
        self.lm_head = nn.Linear(d, cfg["vocab_size"], bias=False)
        # Weight tying: the output projection IS the token embedding (saves V*d parameters, as in GPT-2).
        self.lm_head.weight = self.transformer.wte.weight
        # GPT-2 initialisation: N(0, 0.02) for every weight matrix and embedding, zero biases, LayerNorm
        # (1, 0); the projections that write into the residual stream (c_proj) get std 0.02/sqrt(2*n_layer)
        # so the residual's variance does not grow with depth (2 residual additions per block).
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg["n_layer"]) if "c_proj" in name else 0.02)
            else:
                nn.init.ones_(p) if ".ln_" in name and name.endswith(".weight") else nn.init.zeros_(p)

    def forward(self, idx, labels=None):
        """Logits (B, T, V); with labels (== idx for packed blocks), (logits of positions 0..T-2, loss)."""
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if labels is None:
            return self.lm_head(x)
        # Position t predicts token t+1, so the last position has no target: like HF's shifted loss, the
        # mean cross-entropy over the B*(T-1) predictions (we skip computing the unused last logits).
        logits = self.lm_head(x[:, :-1])
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


# -----------------------------------------------------------------------------------------------------
# Checkpoints in Hugging Face format: config.json + model.safetensors with HF parameter names and the
# Conv1D (in, out) layout, so transformers.GPT2LMHeadModel.from_pretrained loads what we write and we load
# what it writes. lm_head.weight is not stored: it is tied to wte, as in HF's own files.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_SHAPE = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")  # config.json's names, and our cfg's


def save_hf(model: GPT, tokenizer, eos_id: int, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    cfg, drop = model.cfg, model.cfg.get("dropout", 0.0)
    config = dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", n_inner=None, activation_function="gelu_new",
        resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop, tie_word_embeddings=True, bos_token_id=eos_id,
        eos_token_id=eos_id, dtype="float32", **{k: cfg[k] for k in GPT2_SHAPE + ("layer_norm_epsilon",)},
        training_block_size=cfg.get("block_size"),  # `toolkit eval` scores windows of the trained length
    )
    tensors = {name: (t.t() if name.endswith(CONV1D) else t).detach().float().cpu().contiguous()
               for name, t in model.state_dict().items() if name != "lm_head.weight"}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    # The tokenizer travels with the model so AutoTokenizer.from_pretrained(folder) gives back the same one.
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=EOS, eos_token=EOS, unk_token=EOS,
                       model_max_length=cfg["n_positions"]), f, indent=2)


def load_hf(folder: str, dropout: float = 0.0) -> GPT:
    cfg_path, weights = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(weights)):
        die(f"'{folder}' lacks config.json or model.safetensors; pass a GPT-2 save_pretrained folder")
    with open(cfg_path) as f:
        hf = json.load(f)
    # Only what this GPT computes: no wider MLP, other activation, untied head, scaled or cross attention.
    if hf.get("model_type") != "gpt2" or hf.get("n_inner") not in (None, 4 * hf["n_embd"]) \
            or hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh") \
            or not hf.get("tie_word_embeddings", True) or hf.get("scale_attn_by_inverse_layer_idx") \
            or hf.get("add_cross_attention"):
        die(f"'{folder}' is not a plain GPT-2; train it with recipes/pretrain.py instead")
    model = GPT(dict({k: hf[k] for k in GPT2_SHAPE}, layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                     dropout=dropout))
    state = {}
    for name, t in load_file(weights).items():
        name = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name  # OpenAI's files
        if not name.endswith((".attn.bias", ".attn.masked_bias")) and name != "lm_head.weight":  # old mask buffers
            state[name] = t.t() if name.endswith(CONV1D) else t
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:  # the tied head is wte
        die(f"'{folder}' does not match GPT-2's layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


# -----------------------------------------------------------------------------------------------------
# Tokenizer: a byte-level BPE (GPT-2's scheme: any text round-trips, one special token <|endoftext|>).
def load_tokenizer(folder: str):
    file = functools.partial(os.path.join, folder)
    if os.path.isfile(file("tokenizer.json")):
        tok = Tokenizer.from_file(file("tokenizer.json"))
    elif os.path.isfile(file("vocab.json")) and os.path.isfile(file("merges.txt")):
        # The original GPT-2 files: rebuild the fast tokenizer transformers builds from them.
        tok = Tokenizer(models.BPE.from_file(file("vocab.json"), file("merges.txt")))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.add_special_tokens([EOS])
    else:
        die(f"'{folder}' holds neither tokenizer.json nor vocab.json + merges.txt; pass a GPT-2 tokenizer folder")
    if tok.token_to_id(EOS) is None:
        die(f"the tokenizer in '{folder}' has no {EOS} token to separate documents; use a GPT-2 style tokenizer")
    return tok


def train_tokenizer(documents, vocab_size: int):
    # The same steps as toolkit/tokenizer.py's train_bpe_tokenizer (copied so this file stands alone):
    # identical settings give an identical tokenizer, so default runs of both recipes see the same tokens.
    if vocab_size < 257:
        die(f"--vocab_size {vocab_size} is too small for a byte-level BPE; use at least 257 (256 bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


# -----------------------------------------------------------------------------------------------------
# Data: documents -> token stream (EOS after every document) -> fixed-length blocks.
def read_documents(path):
    """A .txt/.md file is ONE document (like datasets' text loader with sample_by='document'); .json/.jsonl rows
    are documents (their 'text' field); no file: the standard library's pydoc topics, one per topic."""
    if path is None:
        import pydoc_data.topics as topics

        return [topics.topics[k] for k in sorted(topics.topics)]
    if not os.path.isfile(path) or not path.endswith((".txt", ".text", ".md", ".json", ".jsonl")):
        die(f"'{path}' is not an existing .txt/.md/.json/.jsonl file; use recipes/pretrain.py for parquet or Hub data")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith((".json", ".jsonl")):
        return [text]
    lines = [line for line in text.splitlines() if line.strip()]
    try:  # a JSON array, or one JSON object per line
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in lines]
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


def read_store(store, split):
    """A `toolkit prepare` store: manifest.json + raw token shards, memory-mapped as nanoGPT maps its .bin (read
    only when a batch needs them)."""
    path = os.path.join(store, "manifest.json")
    if not os.path.isfile(path):
        die(f"'{store}' has no manifest.json; pass a folder written by `toolkit prepare`")
    with open(path) as f:
        manifest = json.load(f)
    if not manifest.get("complete"):
        die(f"token store '{store}' is incomplete; rerun the `toolkit prepare` command that writes it to finish it")
    return [np.memmap(os.path.join(store, s["file"]), dtype=manifest["dtype"], mode="r")
            for s in manifest["splits"][split]["shards"]]


class Blocks:
    """A token stream kept in pieces (a store's shards, or one array) cut into rows of block_size tokens, inputs and
    labels at once; a partial tail is dropped. Rows are read per batch, so a 10B-token store trains in flat memory."""

    def __init__(self, pieces, block_size):
        self.pieces, self.T = pieces, block_size
        self.starts = np.cumsum([0] + [len(p) for p in pieces])  # where each piece begins in the stream
        self.n = int(self.starts[-1]) // block_size

    def __len__(self):
        return self.n

    def row(self, i):  # a block may span two shards
        start, end = i * self.T, (i + 1) * self.T
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < end:
            take = min(end, int(self.starts[k + 1])) - start
            parts.append(self.pieces[k][start - self.starts[k]:start - self.starts[k] + take])
            start, k = start + take, k + 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

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


# -----------------------------------------------------------------------------------------------------
# Muon (--optim muon; toolkit/muon.py is pretrain.py's copy): each hidden matrix moves along its orthogonalized
# Nesterov momentum, U V^T of the momentum's SVD, approximated by 5 Newton-Schulz iterations (bf16 on GPUs; fp32 on
# CPUs, where bf16 is slow), with decoupled weight decay and a step sqrt(max(1, fan_out / fan_in)) times the lr.
class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, weight_decay):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - 0.95)
                x = p.grad.lerp(buf, 0.95)
                x = x.bfloat16() if x.is_cuda else x.float()
                x = x if x.size(0) <= x.size(1) else x.T  # iterate on the smaller Gram matrix
                x = x / x.norm().clamp(min=1e-7)
                for _ in range(5):
                    gram = x @ x.T
                    x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
                x = (x if p.size(0) <= p.size(1) else x.T).to(p.dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(x, alpha=-group["lr"] * math.sqrt(max(1.0, p.size(0) / p.size(1))))  # nn.Linear: (out, in)


# -----------------------------------------------------------------------------------------------------
# Learning-rate schedule: linear warmup from 0, then cosine decay to min_lr_rate * learning_rate at
# max_steps (transformers' "cosine_with_min_lr"). Update k uses lr * f(k); f(0) = 0 with warmup, as in HF.
def lr_factor(k, warmup, max_steps, min_lr_rate):
    if k < warmup:
        return float(k) / float(max(1, warmup))
    progress = float(k - warmup) / float(max(1, max_steps - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - min_lr_rate) + min_lr_rate)


# -----------------------------------------------------------------------------------------------------
# MFU (model FLOPs utilisation): training FLOPs per token are 6N for the weight matmuls (2N forward,
# 4N backward; N without the position table, which is only indexed) plus 12*L*d*T for attention
# (PaLM appendix B): 6N + 12LdT. The peak is the dense bf16 data-sheet figure on GPUs, a measured fp32 matmul on CPU.
GPU_PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                 "A100": 312e12, "A10G": 125e12, "L4": 121e12, "L40S": 362e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
                 "V100": 125e12, "T4": 65e12}  # dense bf16 FLOP/s, data sheets; toolkit/flops.py's (a test pins it)


def gpu_peak(name):
    """The entry whose words all appear in the device name, longest first ('NVIDIA H100 NVL' is an H100 NVL)."""
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):
        if all(word in name.upper() for word in key.upper().split()):
            return GPU_PEAK_BF16[key]
    return None


@functools.lru_cache(maxsize=None)  # measure once per process
def peak_flops(device) -> tuple[float | None, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name)
        return peak, f"{name} bf16 data sheet" if peak else f"{name}: unknown peak"
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)  # warm-up
    n, start = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - start < 0.5:
        torch.mm(a, b)
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - start), "CPU fp32 2048x2048 matmul, measured"


def main(argv=None):
    args = parse_args(argv)
    B, T, G = args.per_device_train_batch_size, args.block_size, args.gradient_accumulation_steps

    # ---- Distributed setup. torchrun starts one process per device and sets RANK/WORLD_SIZE; each process
    # trains a full copy of the model on different batches, and DDP averages the gradients during backward.
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
    # bf16 autocast on GPUs that have it (weights and optimizer stay fp32); plain fp32 on CPU, where bf16 is slow.
    bf16 = use_cuda and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights everywhere

    def log(message, **metrics_entry):  # rank 0 prints; an entry also goes to metrics.jsonl (opened below)
        if master:
            print(message)
            if metrics_entry:
                print(json.dumps(metrics_entry), file=metrics)  # line-buffered: on disk at once

    # ---- Resume / init: which weights and tokenizer we start from. Checkpoints go to one fixed folder,
    # OUTPUT_DIR/checkpoint (nanoGPT's ckpt.pt), replaced at every save; --resume continues from it.
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    if args.resume and not os.path.isfile(os.path.join(ckpt_dir, "training_state.pt")):
        die(f"--resume: '{ckpt_dir}' holds no checkpoint; run without --resume to start a new run there")
    if not args.resume and (os.path.exists(ckpt_dir) or os.path.exists(os.path.join(args.output_dir, "config.json"))):
        if not args.overwrite_output_dir:  # never overwrite a run by accident
            die(f"'{args.output_dir}' already holds a run; pass --resume to continue it, --overwrite_output_dir to "
                "replace it, or another --output_dir")
        if master:  # an old checkpoint must not be resumed into the new run later
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    weights_from = ckpt_dir if args.resume else args.init_from
    tok_folder = args.tokenizer_name or weights_from or (args.token_store and f"{args.token_store}/tokenizer")

    # ---- Data and tokenizer: documents -> tokens with EOS after each -> a training and a validation stream -> blocks.
    docs = None if args.token_store else read_documents(args.train_file)
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
        train_pieces, val_pieces = read_store(args.token_store, "train"), read_store(args.token_store, "validation")
        if max(shard.max(initial=0) for shard in train_pieces) >= vocab:  # one pass through the maps, page by page
            die(f"'{args.token_store}' holds ids beyond this tokenizer; drop --tokenizer_name to use the store's own")
    else:
        streams = [np.array(e.ids + [eos_id], dtype=np.int64)  # each document's ids, then EOS
                   for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
        train_pieces, val_pieces = ([stream] for stream in split_validation(streams, args.validation_split_percentage))
    train_blocks, val_blocks = Blocks(train_pieces, T), Blocks(val_pieces, T)
    if len(train_blocks) < B * world or len(val_blocks) == 0:
        die(f"{len(train_blocks)} training, {len(val_blocks)} validation blocks of {T} tokens: under a batch per "
            "process or no validation block; use more text or lower --block_size / --per_device_train_batch_size")
    # Bits per byte (comparable across tokenizers) needs the UTF-8 bytes of the scored validation tokens (all but each
    # block's first). A byte-level BPE writes each byte as one character, so a token's bytes = its length; EOS has 0.
    token_bytes = torch.zeros(vocab, dtype=torch.long)
    for piece, i in tokenizer.get_vocab(with_added_tokens=True).items():
        token_bytes[i] = 0 if i == eos_id else len(piece)
    scored = val_blocks[:][:, 1:]  # the validation split is small (toolkit prepare caps it at 5M tokens)
    val_bytes_per_token = token_bytes[scored].sum().item() / scored.numel()

    # ---- Model: from a checkpoint, or fresh with GPT-2 init. The embedding is padded to a multiple of 64
    # (nanoGPT: 50304 instead of 50257 makes GPU matmuls faster); the extra rows never appear as targets.
    if weights_from:
        model = load_hf(weights_from, args.dropout)
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
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)

    # ---- Optimizer: AdamW with weight decay on the matrices (embeddings and the four Linear weights per
    # block) only; biases and LayerNorm weights are not decayed. p.dim() >= 2 picks exactly the set that
    # transformers' get_decay_parameter_names picks by name. fused=True: one kernel for all parameters.
    params = [p for p in raw_model.parameters() if p.requires_grad]  # the tied head appears once
    if args.learning_rate is None:  # wider models need a smaller step (see LEARNING_RATE_BY_WIDTH)
        args.learning_rate = next(lr for width, lr in LEARNING_RATE_BY_WIDTH if cfg["n_embd"] <= width)
    if args.optim == "auto":  # Muon for the small models, where it beat AdamW at equal CPU time (toolkit/presets.py)
        args.optim = "muon" if cfg["n_embd"] <= MUON_UP_TO_WIDTH else "adamw_torch_fused"
    # With Muon, the blocks' matrices move with Muon (listed first, as pretrain.py's MuonWithAdamW), the rest AdamW.
    hidden = {id(p) for n, p in raw_model.named_parameters() if args.optim == "muon" and ".h." in n and p.dim() == 2}
    groups = [dict(params=[p for p in params if p.dim() >= 2 and id(p) not in hidden], weight_decay=args.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    optimizers = [torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                    fused=device.type in ("cuda", "cpu"))]
    if hidden:
        optimizers.insert(0, Muon([p for p in params if id(p) in hidden], args.muon_learning_rate, args.weight_decay))
    peak_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]  # the schedule scales each group's peak
    step = 0
    if args.resume:
        state = torch.load(os.path.join(ckpt_dir, "training_state.pt"), map_location=device, weights_only=True)
        for opt, saved in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(saved)
        step = state["step"]
        torch.set_rng_state(state["rng"].cpu())  # dropout masks continue as if never interrupted

    # ---- Bookkeeping: throughput, MFU and the metrics file (appended to when resuming).
    batches_per_rank = (len(train_blocks) // B) // world  # per epoch
    updates_per_epoch = math.ceil(batches_per_rank / G)  # the last update may use fewer micro-batches
    n_params, (peak, peak_src) = sum(p.numel() for p in params), peak_flops(device)
    flops_per_token = 6 * (n_params - cfg["n_positions"] * cfg["n_embd"]) + 12 * cfg["n_layer"] * cfg["n_embd"] * T
    if master:
        os.makedirs(args.output_dir, exist_ok=True)
        metrics = open(os.path.join(args.output_dir, "metrics.jsonl"), "a" if args.resume else "w", buffering=1)
    log(f"model: {cfg['n_layer']} layers, {cfg['n_head']} heads, width {cfg['n_embd']}, vocab {cfg['vocab_size']}: "
        f"{n_params:,} parameters | peak lr {args.learning_rate:g} | data: {len(train_blocks)} train / "
        f"{len(val_blocks)} val blocks of {T} tokens | {world} process(es) on {device.type}"
        f"{' (bf16 autocast)' if bf16 else ''} | peak {peak or 0:.3g} FLOP/s ({peak_src})"
        + (f" | resumed from {ckpt_dir} at step {step}" if args.resume else ""))

    @torch.no_grad()
    def evaluate():
        """Mean cross-entropy over every validation prediction; processes share the batches round-robin."""
        model.eval()
        E, total = args.per_device_eval_batch_size, torch.zeros((), device=device)
        for i in range(rank * E, len(val_blocks), world * E):
            x = val_blocks[i:i + E].to(device)
            with autocast:
                total += raw_model(x, labels=x)[1].float() * len(x)  # every block has T-1 predictions
        if ddp:
            dist.all_reduce(total)
        model.train()
        return total.item() / len(val_blocks)

    def save_checkpoint():
        """Weights + tokenizer (a save_pretrained folder) and the optimizer state, written beside the old checkpoint
        and swapped in, so a crash mid-save leaves the previous one."""
        if master:
            save_hf(raw_model, tokenizer, eos_id, ckpt_dir + ".tmp")
            torch.save({"step": step, "optimizers": [o.state_dict() for o in optimizers],
                        "rng": torch.get_rng_state()}, os.path.join(ckpt_dir + ".tmp", "training_state.pt"))
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            os.replace(ckpt_dir + ".tmp", ckpt_dir)
        if ddp:
            dist.barrier()

    # ---- The training loop. One iteration = one optimizer update = G micro-batches per process.
    model.train()
    loss_sum, steps_since_log, tokens_per_step = torch.zeros((), device=device), 0, G * world * B * T
    t_last = time.perf_counter()
    while step < args.max_steps:
        # The data position is a pure function of the step, so a resumed run continues the same order.
        epoch, u = divmod(step, updates_per_epoch)
        order = epoch_order(len(train_blocks), args.seed, epoch)
        micro = [order[(b * world + rank) * B:(b * world + rank + 1) * B]
                 for b in range(u * G, min((u + 1) * G, batches_per_rank))]
        lr_scale = lr_factor(step, args.warmup_steps, args.max_steps, args.min_lr_rate)
        for opt, peaks in zip(optimizers, peak_lrs):
            for group, peak_lr in zip(opt.param_groups, peaks):
                group["lr"] = peak_lr * lr_scale
        for i, idx in enumerate(micro):
            x = train_blocks[idx].to(device, non_blocking=True)
            # Gradient accumulation: gradients of the micro-batches add up in .grad; dividing each loss by
            # their number makes the sum the mean over all tokens of the update. Under DDP the gradient
            # all-reduce (an average over processes) runs only on the last micro-batch; no_sync skips it before.
            sync = not ddp or i == len(micro) - 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                loss = model(x, labels=x)[1] / len(micro)
            loss.backward()
            loss_sum += loss.detach()  # stays on the device: no synchronisation per step
        # Clip the global gradient norm to max_grad_norm (0: no clipping): one bad batch cannot blow the weights up.
        if args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        steps_since_log += 1

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
            val = evaluate()
            ppl, bpb = math.exp(min(val, 50)), val / (math.log(2) * val_bytes_per_token)  # nats/token -> bits/byte
            log(f"step {step} | eval loss {val:.4f} | perplexity {ppl:.2f} | bits per byte {bpb:.4f}",
                step=step, eval_loss=val, eval_perplexity=ppl, eval_bits_per_byte=bpb)
        if args.save_strategy == "steps" and (step % args.save_steps == 0 or step == args.max_steps):
            save_checkpoint()  # at the last step too: --resume with a larger --max_steps trains on from there
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
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
