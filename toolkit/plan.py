"""`toolkit plan`: how much memory a GPT-2 training run needs per device, and which recipe to run.

    toolkit plan --model gpt2 --task pretrain --num_devices 4 --device_memory 8GB --batch_size 8 --seq_len 1024
    toolkit plan --model gpt2-medium --task qlora --device cuda --device_memory 8GB --json
    toolkit plan --model path/to/checkpoint --task lora --plot plan.png
    python -m toolkit.plan --help

Why hand-written: accelerate's `estimate-memory` counts weights only (batch 1, no activations, accelerate#2512)
and no framework models the HF GPT-2 implementation's activations, DDP buckets or FSDP2's working set. The
formulas below follow what PyTorch autograd saves for transformers' GPT2LMHeadModel; each term is named
after the tensor it stands for. They were calibrated on CPU (fp32) by counting saved tensors and by peak RSS of
the real recipes (benchmarks/check_plan.py, docs/training_strategies.md). The bf16 (GPU autocast) terms are
derived from CUDA autocast's op lists and are not yet checked on a GPU.

Peak model, per device. Gradients are freed by zero_grad(set_to_none=True) and rebuilt during backward while
activations are freed, so the peak is the largest of three moments, not the sum of all terms:
  backward start        weights + optimizer + buffers + activations + loss-head transients (3 logits-sized tensors)
  after lm_head backward weights + optimizer + buffers + activations + logits grad + embedding grad
  end of backward       weights + optimizer + buffers + all gradients (+ FSDP2 reduce-scatter buffers)
With gradient accumulation (>1 micro-batch per update) gradients are alive during the next forward, so they add.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field

from toolkit.errors import UserError, exit_on_user_error
from toolkit.presets import GPT2_VOCAB_SIZE, NEW_MODEL_ACTIVATION, PRESETS, count_parameters, pad_vocab, parse_config_overrides

GiB = 1024**3
MiB = 1024**2
TASKS = ("pretrain", "full", "lora", "qlora")
STRATEGIES = ("single", "ddp", "fsdp", "fsdp_offload")
STRATEGY_NAMES = {"single": "1 device", "ddp": "DDP", "fsdp": "FSDP2", "fsdp_offload": "FSDP2 + CPU offload"}
OPTIMIZERS = {"adamw": 8.0, "adamw_8bit": 2.0, "sgd": 4.0}  # state bytes per trainable parameter
# GPT-2's four Conv1D projections per block, as LoRA targets ("c_proj" names both), and the target presets of
# recipes/lora.py (toolkit/lora.py TARGET_PRESETS; tests/test_plan.py checks they agree).
LORA_MODULES = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")
LORA_TARGET_PRESETS = {"all": ["c_attn", "c_proj", "c_fc"], "attention": ["c_attn", "attn.c_proj"],
                       "attention-qv": ["c_attn"], "mlp": ["c_fc", "mlp.c_proj"]}

# Framework/runtime memory of one training process, not counted by the tensor formulas.
# CPU: resident set of python + torch + transformers + accelerate + datasets (+ trl, peft, bitsandbytes for the
# LoRA recipes) + the Trainer's runtime: peak RSS minus predicted tensors of the gpt2-nano calibration runs of
# benchmarks/check_plan.py (2-core AVX2 CPU, torch 2.13, 2026-11-25; docs/training_strategies.md). A 2-rank
# gloo launch measured the same per rank (569 vs 570 MiB), so distribution adds nothing here.
CPU_OVERHEAD = {"pretrain": 570 * MiB, "full": 570 * MiB, "lora": 605 * MiB, "qlora": 605 * MiB}
CPU_DISTRIBUTED_OVERHEAD = 0
# GPU: the CUDA context, cuBLAS workspaces and kernels loaded by torch (~0.5 GiB on recent cards, not counted by
# torch.cuda.max_memory_allocated) plus caching-allocator slack. An estimate; not yet measured here.
GPU_CONTEXT = 0.6 * GiB
GPU_ALLOCATOR_SLACK = 0.05  # fraction of tensor memory the caching allocator reserves beyond live tensors

# Model FLOPs utilisation assumed for the throughput estimate (it is an estimate, labelled so everywhere).
# CPU: on the idle 2-core reference machine pretrain.py's fp32 step reached 93% (4x256) and 84% (1x1024) at 124M
# (docs/benchmarks.md section 2), 40-48% while other jobs shared it, and far less for tiny models whose steps are
# per-op overhead; 35% stays the conservative figure. GPU: an assumption for eager-mode bf16 HF training of GPT-2 sizes, not measured in this project.
ASSUMED_MFU = {"cpu": 0.35, "cuda": 0.35}

# Memory of well-known cards (GiB), so `--gpu A100-40GB` works without --device_memory.
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "A100-80GB": 80, "A100-40GB": 40, "A100": 80, "L40S": 48, "A10G": 24,
                  "L4": 24, "RTX 4090": 24, "RTX 3090": 24, "V100": 16, "T4": 16}


@dataclass
class Shape:
    """The GPT-2 numbers that memory depends on."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    # Dropout keeps masks for backward. recipes/pretrain.py trains with 0; OpenAI's GPT-2 checkpoints (and
    # GPT2Config's defaults) have 0.1, which fine-tuning keeps.
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    source: str = ""

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def block_params(self) -> int:
        d, f = self.n_embd, self.inner
        return (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d  # c_attn, c_proj, c_fc, c_proj, 2 LN

    @property
    def block_linear_weights(self) -> int:
        d, f = self.n_embd, self.inner
        return 4 * d * d + 2 * d * f

    @property
    def n_params(self) -> int:
        if self.n_inner in (None, 4 * self.n_embd):
            return count_parameters(self.n_layer, self.n_embd, self.vocab_size, self.n_positions, self.tie_word_embeddings)
        embed = self.vocab_size * self.n_embd + self.n_positions * self.n_embd
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.n_embd
        return embed + self.n_layer * self.block_params + 2 * self.n_embd + head


@dataclass
class Setup:
    """Everything the plan depends on besides the model shape."""

    task: str = "pretrain"
    device: str = "cuda"  # cuda | cpu
    num_devices: int = 1
    device_memory: float = 80 * GiB  # per GPU; on CPU the RAM all processes share
    gpu_name: str = ""
    batch_size: int = 8  # micro-batch per device
    seq_len: int = 1024
    grad_accum: int = 1
    precision: str = "bf16"  # bf16 | fp16 | fp32
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    attn: str = "sdpa"  # sdpa | eager
    lora_r: int = 16  # recipes/lora.py defaults: r 16, dropout 0.05, all projections
    lora_targets: tuple[str, ...] = LORA_MODULES
    lora_dropout: float = 0.05
    double_quant: bool = True
    cpu_ram: float = 0.0  # host RAM (for offload / the CPU side); 0 = unknown


@dataclass
class Estimate:
    strategy: str
    gradient_checkpointing: bool
    batch_size: int
    grad_accum: int
    components: dict[str, float]  # bytes per device
    details: dict[str, str]
    total: float
    capacity: float
    fits: bool
    host_bytes: float = 0.0  # CPU RAM per rank for offloaded state
    peak_moment: str = ""

    @property
    def name(self) -> str:
        return STRATEGY_NAMES[self.strategy] + (" + grad ckpt" if self.gradient_checkpointing else "")


# --------------------------------------------------------------------------------------------------------------
# Model shape: preset, config.json (local folder or Hub), overrides
# --------------------------------------------------------------------------------------------------------------


def load_shape(model: str, task: str, overrides: dict | None = None, vocab_size: int | None = None,
               pad_vocab_to_multiple_of: int = 64) -> Shape:
    """A preset name, a local folder/config.json, or a Hub name whose config.json can be fetched."""
    overrides = dict(overrides or {})
    if model in PRESETS:
        fields = dict(PRESETS[model])
        # Pretraining pads the vocabulary like recipes/pretrain.py; a pretrained Hub GPT-2 has exactly 50257 rows.
        vocab = vocab_size or GPT2_VOCAB_SIZE
        vocab = pad_vocab(vocab, pad_vocab_to_multiple_of) if task == "pretrain" else vocab
        # A new model (presets.build_gpt2_config): dropout 0 and the fused tanh-GELU; the Hub checkpoints of the
        # same names: dropout 0.1 and transformers' 8-op "gelu_new".
        new = task == "pretrain"
        drop = 0.0 if new else 0.1
        shape = Shape(vocab_size=vocab, source=f"preset {model}", resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop,
                      activation_function=NEW_MODEL_ACTIVATION if new else "gelu_new", **fields)
    else:
        shape = _shape_from_config(_read_config(model), model)
        if vocab_size:
            shape.vocab_size = vocab_size
    known = {"n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_inner", "activation_function", "tie_word_embeddings",
             "resid_pdrop", "embd_pdrop", "attn_pdrop"}
    for key, value in overrides.items():
        if key in known and value is not None:
            setattr(shape, key, value)
    if shape.n_embd % shape.n_head:
        raise UserError(f"n_embd={shape.n_embd} is not divisible by n_head={shape.n_head}; pick n_head dividing n_embd")
    return shape


def _read_config(model: str) -> dict:
    path = model
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read '{path}' as a config.json ({err}); pass a save_pretrained folder or a preset") from None
    if os.path.sep in model or model.startswith("."):
        raise UserError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}) nor an existing folder/config.json; check the path")
    from huggingface_hub import hf_hub_download

    for local_only in (True, False):  # the local Hub cache first: works offline and costs no request
        try:
            with open(hf_hub_download(model, "config.json", local_files_only=local_only), encoding="utf-8") as f:
                return json.load(f)
        except Exception as err:  # offline, unknown repo, gated: all mean "cannot get the config here"
            error = err
    raise UserError(f"cannot fetch config.json of '{model}' from the Hub ({type(error).__name__}); pass a preset "
                    f"({', '.join(PRESETS)}) or a local folder with config.json") from None


def _shape_from_config(cfg: dict, source: str) -> Shape:
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"'{source}' is a {cfg.get('model_type')} model; the planner's formulas are for GPT-2 (model_type gpt2)")
    try:
        return Shape(n_layer=int(cfg["n_layer"]), n_embd=int(cfg["n_embd"]), n_head=int(cfg["n_head"]),
                     vocab_size=int(cfg["vocab_size"]), n_positions=int(cfg.get("n_positions", 1024)),
                     n_inner=cfg.get("n_inner"), activation_function=cfg.get("activation_function", "gelu_new"),
                     tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), source=source,
                     **{k: float(cfg.get(k, 0.1)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")})
    except KeyError as err:
        raise UserError(f"config.json of '{source}' has no {err}; it is not a GPT-2 config") from None


# --------------------------------------------------------------------------------------------------------------
# The memory formulas
# --------------------------------------------------------------------------------------------------------------


def resolve_lora_targets(text: str) -> tuple[str, ...]:
    """'all', 'attention', 'c_attn,c_proj', ... -> the module kinds of LORA_MODULES (recipes/lora.py's presets)."""
    out: list[str] = []
    for item in text.replace(",", " ").split():
        for name in LORA_TARGET_PRESETS.get(item, [item]):
            kinds = [m for m in LORA_MODULES if m == name or m.endswith("." + name)]
            if not kinds:
                raise UserError(f"unknown --lora_targets '{item}'; use a preset ({', '.join(LORA_TARGET_PRESETS)}) or GPT-2 "
                                f"module names (c_attn, c_proj, attn.c_proj, c_fc, mlp.c_proj)")
            out += kinds
    if not out:
        raise UserError("--lora_targets is empty; use e.g. all, attention or c_attn,c_proj")
    return tuple(m for m in LORA_MODULES if m in out)


def _module_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    d, f = shape.n_embd, shape.inner
    return {"c_attn": (d, 3 * d), "attn.c_proj": (d, d), "c_fc": (d, f), "mlp.c_proj": (f, d)}


def lora_trainable(shape: Shape, r: int, targets) -> int:
    """LoRA adds A (in x r) and B (r x out) to each targeted Conv1D of every block."""
    return shape.n_layer * sum(r * (i + o) for m, (i, o) in _module_shapes(shape).items() if m in targets)


def activation_terms(shape: Shape, s: Setup, batch_size: int, checkpointing: bool) -> dict[str, float]:
    """Bytes of activations alive at the peak, for one micro-batch on one device.

    Per block (u = batch x seq x n_embd elements; fp32 = 4 bytes), transformers' GPT2Block saves for backward:
    ln_1 input (u), c_attn input (u), q/k/v (3u), c_proj input (u: the attention output), ln_2 input (u), c_fc
    input (u), four tensors of the python gelu_new at width n_inner (pow input, tanh output, 0.5*x, 1+tanh: 16u
    at 4*n_embd) and mlp c_proj input (4u): 28u. eager attention adds the softmax output (heads x seq^2 per
    sequence); sdpa only its log-sum-exp. A frozen Conv1D (LoRA) does not save its input; a LoRA branch saves it
    for lora_A, and peft's lora_dropout adds a dropped copy and a mask (measured). Under bf16 autocast the matmul
    inputs are bf16 copies; LayerNorm, residual stream, pow and tanh stay fp32 (CUDA autocast op lists); a QLoRA
    base in bf16 makes the residual stream bf16 too. Dropout > 0 (GPT-2 checkpoints have 0.1) keeps masks.
    Loss head: transformers' loss keeps ln_f/lm_head inputs and, at the start of backward, three logits-sized fp32
    tensors (log-softmax output, its gradient, the logits gradient); trl's fused head (LoRA recipes) works in tiles.
    """
    b, T, d, L, V, a = batch_size, s.seq_len, shape.n_embd, shape.n_layer, shape.vocab_size, shape.n_head
    u = b * T * d
    w = shape.inner / d  # MLP width in units of n_embd
    mixed = s.precision in ("bf16", "fp16") and s.device == "cuda"
    low = 2 if mixed else 4  # bytes of a matmul input
    act = 4  # residual stream, LayerNorm, pow/tanh outputs stay fp32 (autocast) or are fp32 (CPU)
    res = 2 if (s.task == "qlora" and mixed) else act  # QLoRA's non-quantized weights are in the compute dtype
    full = s.task in ("pretrain", "full")
    lora = s.task in ("lora", "qlora")
    widths = {"c_attn": 1.0, "attn.c_proj": 1.0, "c_fc": 1.0, "mlp.c_proj": w}
    python_gelu = shape.activation_function in ("gelu_new", "gelu_pytorch_tanh_python")

    per_layer = res * u + 3 * low * u + res * u  # ln_1 input, q/k/v, ln_2 input
    if python_gelu:
        # pow input (fp32 under autocast), tanh output, 0.5*x (matmul dtype), 1+tanh
        per_layer += ((act + act + low + act) if mixed else 16) * w * u
    else:
        per_layer += low * w * u  # a fused activation keeps its input only
    for module, width in widths.items():
        if full or (lora and module in s.lora_targets):
            per_layer += low * width * u  # the Conv1D's (or lora_A's) input
        if lora and module in s.lora_targets and s.lora_dropout > 0:
            # peft's lora_dropout: a dropped copy of the input for lora_A and its mask (measured with the recipe's
            # defaults: 8 x 4u per block for all four projections)
            per_layer += (2.0 if module == "attn.c_proj" else 1.0) * low * width * u
    per_layer += 2 * 2 * 4 * b * T  # LayerNorm mean/rstd, fp32
    mask = 1 if mixed else 4  # CUDA's fused dropout keeps a bool mask; the CPU kernel an fp32 one
    per_layer += (2 * mask * u) if shape.resid_pdrop > 0 else 0  # after attention and after the MLP
    if s.attn == "eager":
        per_layer += (6 if mixed else 4) * a * b * T * T  # softmax output (+ its bf16 copy)
        if shape.attn_pdrop > 0:
            per_layer += (mask + low) * a * b * T * T  # dropout mask + the dropped probabilities
    elif shape.attn_pdrop > 0 and not mixed:
        per_layer += 3 * 4 * a * b * T * T  # CPU sdpa with dropout falls back to the math kernel: T^2 tensors
    else:
        per_layer += 4 * a * b * T  # log-sum-exp (CUDA flash/efficient kernels apply dropout without a mask)
    embd_drop = mask * u if shape.embd_pdrop > 0 else 0

    n_tok = b * (T - 1)
    if lora:
        # trl's SFTTrainer scores tokens through a chunked, fused LM head: tiles of up to 4096 tokens x 32768 vocab,
        # never the whole logits. Without Triton (CPU) its torch fallback keeps ~8.3 fp32 tiles alive in backward
        # (measured); with Triton, one bf16 tile plus the fp32 hidden-state gradient.
        tile = min(n_tok, 4096) * min(V, 32768)
        head_inputs = res * u + 4 * n_tok * d  # ln_f input, the hidden states it scores
        head_peak = 2 * tile + 4 * n_tok * d if mixed else 8.3 * 4 * tile
        logits = 0.0
    else:
        head_inputs = res * u + low * u  # ln_f input, lm_head input
        logits = 4 * b * T * V
        head_peak = 3 * logits  # log-softmax output, its gradient, the logits gradient (fp32)
    # With checkpointing each block keeps only its input; during its backward one block is recomputed in full.
    layers = (L * res * u if checkpointing else L * per_layer) + embd_drop
    recompute = per_layer if checkpointing else 0.0
    return {"layers": layers, "recompute": recompute, "per_layer": per_layer, "head_inputs": head_inputs,
            "head_peak": head_peak, "logits": logits}


def estimate(shape: Shape, s: Setup, strategy: str, checkpointing: bool | None = None, batch_size: int | None = None,
             grad_accum: int | None = None) -> Estimate:
    """Memory per device for one strategy."""
    ckpt = s.gradient_checkpointing if checkpointing is None else checkpointing
    b = s.batch_size if batch_size is None else batch_size
    ga = s.grad_accum if grad_accum is None else grad_accum
    n = max(1, s.num_devices) if strategy in ("ddp", "fsdp", "fsdp_offload") else 1
    shard = n if strategy in ("fsdp", "fsdp_offload") else 1
    mixed = s.precision in ("bf16", "fp16") and s.device == "cuda"
    d, L, V = shape.n_embd, shape.n_layer, shape.vocab_size
    N = shape.n_params
    linear = L * shape.block_linear_weights
    embed = V * d + shape.n_positions * d + 2 * d
    details: dict[str, str] = {}

    # Weights, trainable parameters, quantisation constants.
    quant = 0.0
    if s.task in ("pretrain", "full"):
        trainable = N
        weights = 4.0 * N / shard
        details["parameters"] = f"{N / 1e6:.1f}M fp32" + (f" / {shard} ranks" if shard > 1 else "")
    else:
        trainable = lora_trainable(shape, s.lora_r, s.lora_targets)
        if s.task == "lora":
            # recipes/lora.py keeps the frozen base in fp32 (autocast casts it per matmul, without caching: frozen)
            weights = 4.0 * N + 4.0 * trainable
            details["parameters"] = f"{N / 1e6:.1f}M frozen fp32 + {trainable / 1e6:.2f}M LoRA fp32"
        else:
            # NF4: 4 bits per linear weight; embeddings, LayerNorms and biases in the compute dtype (bf16 on GPU),
            # adapters too (trl); fp32 on CPU.
            cbytes = 2 if mixed else 4
            weights = 0.5 * linear + cbytes * (N - linear) + cbytes * trainable
            # absmax per 64-weight block: fp32 (4/64 bytes per weight), or with double quantisation an 8-bit absmax
            # (1/64) plus an fp32 constant per 256 blocks.
            quant = linear * ((1 / 64 + 4 / (64 * 256)) if s.double_quant else 4 / 64)
            details["parameters"] = (f"{linear / 1e6:.1f}M NF4 linear weights + {(N - linear) / 1e6:.1f}M "
                                     f"{'bf16' if mixed else 'fp32'} + {trainable / 1e6:.2f}M LoRA {'bf16' if mixed else 'fp32'}")
            details["quantization"] = "absmax per 64 weights" + (" (double-quantised)" if s.double_quant else " (fp32)")
    working = 0.0  # weights materialised only while computing
    if mixed and s.task in ("pretrain", "full") and strategy in ("single", "ddp"):
        # autocast caches a bf16 copy of every matmul weight (the tied head too); backward keeps them.
        working = 2.0 * (linear + V * d) if not ckpt else 2.0 * (shape.block_linear_weights + V * d)
        details["parameters"] += f" + bf16 autocast copies {working / GiB:.2f} GiB"
    if strategy in ("fsdp", "fsdp_offload"):
        pbytes = 2 if mixed else 4
        # FSDP2: the root unit (embeddings, ln_f) stays gathered through forward+backward; blocks are gathered one
        # at a time with the next one prefetched.
        working = pbytes * (embed + 2 * shape.block_params)
        details["parameters"] += f" + gathered root and 2 blocks {working / GiB:.2f} GiB"
    if strategy == "fsdp_offload":
        host = weights
        weights = 0.0
    grads = (2.0 if s.task == "qlora" and mixed else 4.0) * trainable / shard
    optim = OPTIMIZERS[s.optimizer] * trainable / shard
    buckets = 0.0
    if strategy == "ddp" and n > 1:
        buckets = 4.0 * trainable  # DDP all-reduce buckets: a second copy of the gradients (gradient_as_bucket_view=False)
    fsdp_grad_transient = 0.0
    if strategy in ("fsdp", "fsdp_offload"):
        rbytes = 2 if mixed else 4
        # root unit's unsharded gradient (its embedding grad arrives last) + one block + reduce-scatter buffer
        fsdp_grad_transient = rbytes * (embed + 2 * shape.block_params) + 4 * embed / shard
    if strategy == "fsdp_offload":
        host += grads + optim
        grads, optim = 0.0, 0.0
    else:
        host = 0.0

    a = activation_terms(shape, s, b, ckpt)
    acts = a["layers"] + a["head_inputs"]
    if s.task not in ("pretrain", "full"):
        head_grad = 0.0  # frozen embedding/head
    elif strategy.startswith("fsdp"):
        head_grad = (2 if mixed else 4) * embed  # the root unit's unsharded gradient, reduce-scattered at the end
    else:
        head_grad = 4.0 * V * d  # the tied embedding/lm_head gradient, allocated at the first backward op
    accum_grads = grads if ga > 1 else 0.0
    fsdp = strategy in ("fsdp", "fsdp_offload")
    static = weights + optim + quant + buckets + (working if fsdp else 0)
    act_like = acts + (0 if fsdp else working)
    moments = {
        "backward start": static + act_like + a["head_peak"] + accum_grads,
        "after lm_head backward": static + act_like + a["logits"] + max(accum_grads, head_grad),
        # the tied embedding's gradient arrives twice (lm_head first, the embedding last): summing them briefly
        # holds a new V x d gradient and the sum next to the others (measured on CPU)
        "end of backward": static + grads + fsdp_grad_transient + (2 * head_grad if not fsdp else 0),
    }
    if ckpt:  # the top block recomputed, with the embedding gradient already allocated
        moments["block recompute"] = static + act_like + a["recompute"] + max(accum_grads, head_grad)
    peak_moment = max(moments, key=moments.get)
    tensors = moments[peak_moment]
    if s.device == "cpu":
        overhead = CPU_OVERHEAD[s.task] + (CPU_DISTRIBUTED_OVERHEAD if n > 1 else 0)
        details["overhead"] = "python + torch + HF libraries + Trainer (measured RSS)"
    else:
        overhead = GPU_CONTEXT + GPU_ALLOCATOR_SLACK * tensors
        details["overhead"] = "CUDA context + allocator slack (estimate)"
    components = {
        "parameters": weights + working,
        "gradients": grads + buckets + fsdp_grad_transient,
        "optimizer": optim,
        "activations": acts + max(a["head_peak"], a["recompute"]),
        "quantization": quant,
        "overhead": overhead,
    }
    total = tensors + overhead
    components["overlap"] = total - sum(components.values())  # <= 0: terms never alive at the same moment
    if buckets:
        details["gradients"] = "fp32 + DDP bucket copy"
    elif strategy.startswith("fsdp"):
        details["gradients"] = f"fp32 / {shard} ranks + unsharded root/block grads in flight"
    details["optimizer"] = f"{s.optimizer} ({OPTIMIZERS[s.optimizer]:g} bytes per trainable parameter)"
    details["activations"] = (f"micro-batch {b} x {s.seq_len} tokens, {s.attn}, "
                              f"{'checkpointed' if ckpt else 'no checkpointing'}, {'bf16 autocast' if mixed else 'fp32'}")
    capacity = s.device_memory / (n if s.device == "cpu" else 1)  # CPU processes share the machine's RAM
    fits = total <= capacity and (not host or not s.cpu_ram or host * n <= s.cpu_ram)
    return Estimate(strategy, ckpt, b, ga, components, details, total, capacity, fits, host, peak_moment)


# --------------------------------------------------------------------------------------------------------------
# Throughput estimate
# --------------------------------------------------------------------------------------------------------------


def throughput(shape: Shape, s: Setup, est: Estimate, peak_flops: float | None) -> dict:
    """tokens/s = devices x peak FLOP/s x assumed MFU / FLOPs per token (an estimate, not a measurement)."""
    from toolkit.flops import flops_per_token

    fpt = flops_per_token(shape.n_layer, shape.n_embd, shape.vocab_size, s.seq_len)
    if s.task in ("lora", "qlora"):
        fpt *= 4 / 6  # frozen weights: forward (2N) + input gradients (2N), no weight gradients
    if est.gradient_checkpointing:
        fpt *= 8 / 6  # one extra forward
    n = s.num_devices if est.strategy in ("ddp", "fsdp", "fsdp_offload") else 1
    mfu = ASSUMED_MFU[s.device]
    out = {"flops_per_token": fpt, "peak_flops_per_device": peak_flops, "assumed_mfu": mfu, "devices": n,
           "tokens_per_s": None, "label": "estimate"}
    if peak_flops:
        out["tokens_per_s"] = n * peak_flops * mfu / fpt
    return out


# --------------------------------------------------------------------------------------------------------------
# The decision tree
# --------------------------------------------------------------------------------------------------------------


def candidates(s: Setup) -> list[tuple[str, bool]]:
    """(strategy, gradient checkpointing) in order of preference: fastest first."""
    ck = [True] if s.gradient_checkpointing else [False, True]
    multi = s.num_devices > 1
    if s.task in ("lora", "qlora"):
        return [("ddp" if multi else "single", c) for c in ck]
    order: list[tuple[str, bool]] = []
    first = "ddp" if multi else "single"
    # DDP is fastest when it fits; FSDP2 shards weights/grads/optimizer (cheaper than recomputing activations on
    # one node); checkpointing next; CPU offload last (PCIe-bound, CPU AdamW).
    order.append((first, ck[0]))
    if multi:
        order.append(("fsdp", ck[0]))
    if len(ck) > 1:
        order.append((first, True))
        if multi:
            order.append(("fsdp", True))
    if s.device == "cuda":
        order += [("fsdp_offload", c) for c in ck]
    return order


@dataclass
class Plan:
    shape: Shape
    setup: Setup
    estimates: list[Estimate]  # one per strategy at the requested settings (the table)
    choice: Estimate | None
    reasons: list[str] = field(default_factory=list)
    command: str = ""
    accelerate_config: str = ""
    throughput: dict = field(default_factory=dict)


def make_plan(shape: Shape, s: Setup, strategy: str = "auto", peak_flops: float | None = None) -> Plan:
    gib = lambda x: f"{x / GiB:.2f} GiB"  # noqa: E731
    where = "GPU" if s.device == "cuda" else "process"
    table_strategies = _table_strategies(s)
    estimates = [estimate(shape, s, st) for st in table_strategies]
    reasons: list[str] = []
    choice = None
    if strategy != "auto":
        if strategy not in table_strategies:
            raise UserError(f"--strategy {strategy} does not apply to task {s.task} on {s.num_devices} {s.device} "
                            f"device(s); choose one of: {', '.join(table_strategies)} or auto")
        choice = estimate(shape, s, strategy)
        reasons.append(f"{choice.name}: {gib(choice.total)}/{where} "
                       f"{'fits' if choice.fits else 'does NOT fit'} in {gib(choice.capacity)} (strategy forced)")
    else:
        # Preference: no CPU offload (several times slower) > the largest micro-batch (gradient accumulation keeps
        # the global batch) > the order of candidates() (fastest strategy first).
        tried = []
        batches = [s.batch_size]
        while batches[-1] > 1:
            batches.append(batches[-1] // 2)
        cands = candidates(s)
        ordered = [(c, b) for offload in (False, True) for b in batches for c in cands if (c[0] == "fsdp_offload") == offload]
        for (st, ck), b in ordered:
            ga = s.grad_accum * max(1, s.batch_size // b)
            est = estimate(shape, s, st, ck, batch_size=b, grad_accum=ga)
            if b == s.batch_size:
                tried.append(est)
            if est.fits:
                choice = est
                break
        for est in tried:
            if est is choice:
                break
            reasons.append(f"{est.name}: {gib(est.total)}/{where} does not fit in {gib(est.capacity)}")
        if choice is not None:
            pct = 100 * choice.total / choice.capacity
            at = ""
            if choice.batch_size != s.batch_size:
                reasons.append(f"micro-batch {s.batch_size} does not fit"
                               f"{'' if choice.strategy == 'fsdp_offload' else ' without CPU offload'}; micro-batch "
                               f"{choice.batch_size} with gradient accumulation {choice.grad_accum} keeps the global batch")
                at = f" at micro-batch {choice.batch_size}"
            reasons.append(f"{choice.name}{at}: {gib(choice.total)}/{where} fits in {gib(choice.capacity)} ({pct:.0f}%)")
            if choice.strategy in ("single", "ddp") and s.task in ("pretrain", "full") and s.num_devices > 1:
                reasons.append("FSDP2 not needed: every device holds the whole model and optimizer, no parameter all-gathers")
            if choice.strategy == "fsdp":
                reasons.append(f"FSDP2 shards parameters, gradients and AdamW state over {s.num_devices} devices "
                               f"(1/{s.num_devices} each); DDP would need "
                               f"{gib(estimate(shape, s, 'ddp', choice.gradient_checkpointing, choice.batch_size, choice.grad_accum).total)}")
            if pct > 90:
                reasons.append("tight: above 90% of the memory; fragmentation may push it over, consider a smaller micro-batch")
            if s.device == "cpu":
                # benchmarks/check_plan.py --default_malloc at 124M: pretrain.py +19% (it tells glibc to keep freed memory,
                # toolkit/cpu_allocator.py; +4% before it did), lora.py +23% (glibc's defaults keep some freed blocks too)
                reasons.append("CPU: with the recipes' allocator defaults the resident set ran up to 23% above this "
                               "(freed blocks stay in the heap for speed); MALLOC_MMAP_THRESHOLD_=131072 gives this figure")
        else:
            reasons.append("nothing fits, even at micro-batch 1 with gradient checkpointing" +
                           ("; use --task qlora (4-bit base weights) or a smaller model" if s.task in ("full", "lora") else
                            "; use a smaller model or more devices" if s.task != "qlora" else "; use a smaller model"))
    plan = Plan(shape, s, estimates, choice, reasons)
    if choice is not None:
        plan.accelerate_config, plan.command = command_for(shape, s, choice)
        plan.throughput = throughput(shape, s, choice, peak_flops)
    return plan


def _table_strategies(s: Setup) -> list[str]:
    if s.task in ("lora", "qlora"):
        return ["ddp" if s.num_devices > 1 else "single"]
    out = ["single"]
    if s.num_devices > 1:
        out += ["ddp", "fsdp"]
    if s.device == "cuda":
        out.append("fsdp_offload")
    return out


def command_for(shape: Shape, s: Setup, est: Estimate) -> tuple[str, str]:
    """The accelerate config file and the exact command line for the chosen recipe."""
    cpu = s.device == "cpu"
    config = {"single": "single_gpu", "ddp": "ddp", "fsdp": "fsdp", "fsdp_offload": "fsdp_offload"}[est.strategy]
    if cpu and est.strategy in ("ddp", "fsdp"):
        config += "_cpu"
    recipe = {"pretrain": "recipes/pretrain.py", "full": "recipes/pretrain.py", "lora": "recipes/lora.py",
              "qlora": "recipes/qlora.py"}[s.task]
    n = s.num_devices
    if est.strategy == "single":
        launch = f"python {recipe}"
        config_path = ""
    else:
        config_path = f"accelerate_configs/{config}.yaml"
        launch = f"accelerate launch --config_file {config_path} --num_processes {n} {recipe}"
    args: list[str] = []
    model = shape.source.removeprefix("preset ")
    if s.task == "pretrain":
        args += [f"--preset {model}"] if shape.source.startswith("preset ") else [f"--config_name {model}"]
        # the planned vocabulary: GPT-2's tokenizer, or a BPE of that size (pretrain.py trains 4096 by default)
        gpt2_vocab = shape.vocab_size in (GPT2_VOCAB_SIZE, pad_vocab(GPT2_VOCAB_SIZE, 64))
        args.append("--tokenizer_name gpt2" if gpt2_vocab else f"--vocab_size {shape.vocab_size}")
    else:
        args += [f"--model_name_or_path {model}"]
    block_flag = "--block_size" if s.task in ("pretrain", "full") else "--max_length"
    args += [f"--per_device_train_batch_size {est.batch_size}", f"{block_flag} {s.seq_len}"]
    if est.grad_accum > 1:
        args.append(f"--gradient_accumulation_steps {est.grad_accum}")
    if est.gradient_checkpointing:
        args.append("--gradient_checkpointing true")
    if s.task in ("lora", "qlora"):
        args.append(f"--lora_r {s.lora_r}")
        if tuple(s.lora_targets) != LORA_MODULES:
            args.append(f"--lora_target_modules {' '.join(s.lora_targets)}")
        if s.lora_dropout != 0.05:
            args.append(f"--lora_dropout {s.lora_dropout:g}")
        if not s.double_quant and s.task == "qlora":
            args.append("--no_use_bnb_nested_quant")
        if (not cpu or s.task == "qlora") and not est.gradient_checkpointing:
            args.append("--gradient_checkpointing false")  # the LoRA recipes checkpoint by default on CUDA, qlora.py on CPU too
    if s.attn != "sdpa":
        args.append(f"--attn_implementation {s.attn}")
    if cpu and est.strategy != "single":
        args.append("--use_cpu true")
    if not cpu and s.precision == "fp32":
        args.append("--bf16 false")
    return config_path, f"{launch} {' '.join(args)}"


# --------------------------------------------------------------------------------------------------------------
# Hardware detection and input parsing
# --------------------------------------------------------------------------------------------------------------


def parse_memory(text: str) -> float:
    """'8GB', '8 GiB', '24g', '512MB' -> bytes. GPU "GB" is binary (an 8 GB card has 8192 MiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)\s*", str(text).upper())
    if not m:
        raise UserError(f"cannot read memory size '{text}'; write e.g. 8GB, 80GiB or 512MB")
    unit = {"": GiB, "K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}[m.group(2)]
    return float(m.group(1)) * unit


def detect_hardware() -> dict:
    """GPUs if torch sees any, else this machine's CPU and RAM."""
    import psutil

    info = {"cpu_ram": float(psutil.virtual_memory().total), "cpu_cores": os.cpu_count() or 1}
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device="cuda", num_devices=torch.cuda.device_count(), device_memory=float(props.total_memory),
                        gpu_name=props.name)
            return info
    except RuntimeError:  # a broken CUDA driver/runtime still leaves the CPU plan useful
        pass
    info.update(device="cpu", num_devices=1, device_memory=info["cpu_ram"], gpu_name="")
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="toolkit plan",
        description="Memory per device (parameters, gradients, optimizer, activations, quantization, overhead) for "
                    "GPT-2 training, the recipe and accelerate config that fit, and the command to run.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default="gpt2", help=f"preset ({', '.join(PRESETS)}), a folder/config.json, or a Hub name")
    m.add_argument("--config_overrides", default=None, help="e.g. 'n_layer=24,n_embd=1024'")
    for key in ("n_layer", "n_head", "n_embd", "n_positions"):
        m.add_argument(f"--{key}", type=int, default=None)
    m.add_argument("--vocab_size", type=int, default=None, help="tokenizer size (default: GPT-2's 50257; pretraining pads it to 64)")
    m.add_argument("--pad_vocab_to_multiple_of", type=int, default=64)
    t = p.add_argument_group("training")
    t.add_argument("--task", default="pretrain", choices=TASKS, help="pretrain (from scratch), full (fine-tune all weights), lora, qlora")
    t.add_argument("--batch_size", type=int, default=None, help="micro-batch per device (default 8 on GPU, 4 on CPU)")
    t.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: n_positions on GPU, 256 on CPU)")
    t.add_argument("--grad_accum", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="auto: bf16 on GPU, fp32 on CPU")
    t.add_argument("--gradient_checkpointing", action="store_true", help="force checkpointing (auto-considered when needed)")
    t.add_argument("--optimizer", default="adamw", choices=tuple(OPTIMIZERS))
    t.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    t.add_argument("--lora_r", type=int, default=16)
    t.add_argument("--lora_targets", default="all", help="recipes/lora.py preset (all, attention, attention-qv, mlp) or "
                   "module names, comma-separated (c_attn,c_proj,c_fc; default all)")
    t.add_argument("--lora_dropout", type=float, default=0.05)
    t.add_argument("--no_double_quant", action="store_true", help="QLoRA without double quantisation of the absmax")
    h = p.add_argument_group("hardware (default: detect)")
    h.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    h.add_argument("--num_devices", type=int, default=None, help="GPUs (or CPU processes)")
    h.add_argument("--device_memory", default=None, help="memory per GPU (e.g. 8GB) or, on CPU, the RAM all processes share")
    h.add_argument("--gpu", default=None, help=f"card name for memory and peak FLOP/s: {', '.join(GPU_MEMORY_GIB)}")
    o = p.add_argument_group("output")
    o.add_argument("--strategy", default="auto", choices=("auto",) + STRATEGIES, help="force one strategy instead of choosing")
    o.add_argument("--json", action="store_true", help="print the plan as JSON")
    o.add_argument("--plot", default=None, help="write a stacked bar chart of the memory per strategy to this PNG")
    o.add_argument("--no_flops_benchmark", action="store_true", help="CPU: skip the 0.5 s matmul benchmark (no tokens/s estimate)")
    return p


def setup_from_args(args) -> tuple[Shape, Setup, float | None]:
    hw = None
    device = args.device
    if device == "auto":
        if args.gpu or (args.device_memory and args.num_devices):
            device = "cuda"
        else:
            hw = detect_hardware()
            device = hw["device"]
    if args.gpu and device == "cpu":
        raise UserError("--gpu names a GPU but --device is cpu; drop one of them")
    memory = None
    if args.device_memory:
        memory = parse_memory(args.device_memory)
    elif args.gpu:
        key = _match_gpu(args.gpu)
        memory = GPU_MEMORY_GIB[key] * GiB
    num = args.num_devices
    if memory is None or num is None:
        hw = hw or detect_hardware()
        if memory is None:
            if device == "cuda" and hw["device"] != "cuda":
                raise UserError("no GPU detected here; pass --device_memory (e.g. 8GB) or --gpu NAME to plan for one")
            memory = hw["device_memory"] if device == hw["device"] else hw["cpu_ram"]
        if num is None:
            num = hw["num_devices"] if device == hw["device"] else 1
    for name in ("batch_size", "seq_len", "grad_accum", "lora_r"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value}")
    if num < 1:
        raise UserError(f"--num_devices must be at least 1, got {num}")
    if memory <= 0:
        raise UserError(f"--device_memory must be positive, got {args.device_memory}")
    overrides = parse_config_overrides(args.config_overrides)
    overrides.update({k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "n_positions") if getattr(args, k)})
    shape = load_shape(args.model, args.task, overrides, args.vocab_size, args.pad_vocab_to_multiple_of)
    targets = resolve_lora_targets(args.lora_targets)
    precision = args.precision if args.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    seq_len = args.seq_len or (shape.n_positions if device == "cuda" else min(256, shape.n_positions))
    if seq_len > shape.n_positions:
        raise UserError(f"--seq_len {seq_len} is longer than the model's n_positions={shape.n_positions}; lower --seq_len")
    cpu_ram = (hw or {}).get("cpu_ram") or 0.0
    s = Setup(task=args.task, device=device, num_devices=num, device_memory=memory,
              gpu_name=args.gpu or (hw or {}).get("gpu_name", ""),
              batch_size=args.batch_size or (8 if device == "cuda" else 4), seq_len=seq_len, grad_accum=args.grad_accum,
              precision=precision, gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
              attn=args.attn, lora_r=args.lora_r, lora_targets=targets, lora_dropout=args.lora_dropout,
              double_quant=not args.no_double_quant, cpu_ram=cpu_ram if device == "cuda" else 0.0)
    peak = None
    if device == "cuda":
        from toolkit.flops import GPU_PEAK_BF16_FLOPS, gpu_peak_flops

        peak = gpu_peak_flops(s.gpu_name) if s.gpu_name else None
        if peak is None and s.gpu_name:
            key = _match_gpu(s.gpu_name, GPU_PEAK_BF16_FLOPS, required=False)
            peak = GPU_PEAK_BF16_FLOPS.get(key) if key else None
        if peak and precision == "fp32":
            peak /= 2  # tf32 tensor cores run at half the bf16 rate on these cards (an approximation)
    elif not args.no_flops_benchmark:
        from toolkit.flops import measure_cpu_peak_flops

        # Each of N processes gets cores/N threads; together they share the measured peak.
        peak = measure_cpu_peak_flops() / num
    return shape, s, peak


def _match_gpu(name: str, table: dict | None = None, required: bool = True) -> str | None:
    table = table or GPU_MEMORY_GIB
    norm = name.upper().replace("_", " ").replace("-", " ")
    for key in sorted(table, key=len, reverse=True):
        if all(part in norm.split() or part in norm for part in key.upper().replace("-", " ").split()):
            return key
    if required:
        raise UserError(f"unknown GPU '{name}'; pass --device_memory (e.g. 24GB) or one of: {', '.join(GPU_MEMORY_GIB)}")
    return None


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------

ROWS = [("parameters", "parameters"), ("gradients", "gradients"), ("optimizer", "optimizer state"),
        ("activations", "activations"), ("quantization", "quantization consts"), ("overhead", "framework/runtime"),
        ("overlap", "not alive at once")]


def render(plan: Plan) -> str:
    sh, s = plan.shape, plan.setup
    dev = (f"{s.num_devices} x {s.gpu_name or 'GPU'} ({s.device_memory / GiB:.0f} GiB each)" if s.device == "cuda"
           else f"CPU, {s.num_devices} process(es) sharing {s.device_memory / GiB:.1f} GiB RAM")
    lines = [
        f"Model: {sh.source}: {sh.n_params:,} parameters (n_layer={sh.n_layer}, n_embd={sh.n_embd}, n_head={sh.n_head}, "
        f"vocab={sh.vocab_size})",
        f"Task: {s.task}; micro-batch {s.batch_size} x {s.seq_len} tokens, grad accum {s.grad_accum}, {s.precision}, "
        f"{s.optimizer}, {s.attn} attention" + (f", LoRA r={s.lora_r} on {','.join(s.lora_targets)}" if s.task in ("lora", "qlora") else ""),
        f"Hardware: {dev}",
        "",
        "Memory per device (GiB)" + (" - per process on CPU" if s.device == "cpu" else ""),
    ]
    ests = _columns(plan)
    width = max(14, *(len(_label(e, s)) + 2 for e in ests))
    lines.append(f"{'':<22}" + "".join(f"{_label(e, s):>{width}}" for e in ests))
    for key, label in ROWS:
        lines.append(f"{label:<22}" + "".join(f"{e.components[key] / GiB:>{width}.3f}" for e in ests))
    lines.append(f"{'total (peak)':<22}" + "".join(f"{e.total / GiB:>{width}.3f}" for e in ests))
    lines.append(f"{'fits':<22}" + "".join(f"{('yes' if e.fits else 'NO'):>{width}}" for e in ests))
    if any(e.host_bytes for e in ests):
        lines.append(f"{'CPU RAM per rank':<22}" + "".join(f"{e.host_bytes / GiB:>{width}.3f}" for e in ests))
    lines += ["", "Recommendation:"]
    lines += [f"  - {r}" for r in plan.reasons]
    if plan.choice is not None:
        if plan.accelerate_config:
            lines.append(f"  accelerate config: {plan.accelerate_config}")
        lines += ["  command:", f"    {plan.command}"]
        tp = plan.throughput
        if tp.get("tokens_per_s"):
            lines.append(f"  throughput (ESTIMATE): ~{tp['tokens_per_s']:,.0f} tokens/s = {tp['devices']} x "
                         f"{tp['peak_flops_per_device'] / 1e12:.3g} TFLOP/s x assumed MFU {tp['assumed_mfu']:.0%} / "
                         f"{tp['flops_per_token'] / 1e9:.3g} GFLOP per token")
    lines.append("")
    lines.append("Details: " + "; ".join(f"{k}: {v}" for k, v in (plan.choice or ests[0]).details.items()))
    return "\n".join(lines)


def _columns(plan: Plan) -> list[Estimate]:
    """The table's strategies at the requested settings, plus the recommendation when it differs from all of them."""
    ests = list(plan.estimates)
    key = lambda e: (e.strategy, e.gradient_checkpointing, e.batch_size)  # noqa: E731
    if plan.choice is not None and key(plan.choice) not in {key(e) for e in ests}:
        ests.append(plan.choice)
    return ests


def _label(e: Estimate, s: Setup) -> str:
    return e.name + (f", mb {e.batch_size}" if e.batch_size != s.batch_size else "")


def to_json(plan: Plan) -> dict:
    def est_dict(e: Estimate) -> dict:
        return {"strategy": e.strategy, "name": e.name, "gradient_checkpointing": e.gradient_checkpointing,
                "batch_size": e.batch_size, "grad_accum": e.grad_accum,
                "components_bytes": {k: round(v) for k, v in e.components.items()}, "total_bytes": round(e.total),
                "capacity_bytes": round(e.capacity), "fits": e.fits, "host_bytes": round(e.host_bytes),
                "peak_moment": e.peak_moment, "details": e.details}

    setup = asdict(plan.setup)
    setup["lora_targets"] = list(plan.setup.lora_targets)
    return {
        "model": {**asdict(plan.shape), "n_params": plan.shape.n_params},
        "setup": setup,
        "strategies": [est_dict(e) for e in plan.estimates],
        "recommendation": None if plan.choice is None else {
            **est_dict(plan.choice), "accelerate_config": plan.accelerate_config, "command": plan.command,
            "reasons": plan.reasons, "throughput": plan.throughput},
        "reasons": plan.reasons,
    }


def plot(plan: Plan, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ests = _columns(plan)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(ests), 4.5))
    labels = [_label(e, plan.setup).replace(" + ", "\n+ ").replace(", ", "\n") for e in ests]
    bottom = [0.0] * len(ests)
    for key, label in ROWS:
        if key == "overlap":
            continue
        vals = [e.components[key] / GiB for e in ests]
        ax.bar(labels, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(labels, [e.total / GiB for e in ests], color="black", marker="_", s=900, zorder=3, label="peak (total)")
    ax.axhline(ests[0].capacity / GiB, color="red", linestyle="--", label="memory per device")
    ax.set_ylabel("GiB per device")
    ax.set_title(f"{plan.shape.source}, {plan.setup.task}, micro-batch {plan.setup.batch_size} x {plan.setup.seq_len}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise UserError(f"cannot write the plot to '{path}' ({err.strerror}); pass a writable --plot path") from None
    finally:
        plt.close(fig)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shape, setup, peak = setup_from_args(args)
    plan = make_plan(shape, setup, args.strategy, peak)
    if args.plot:
        plot(plan, args.plot)
    if args.json:
        print(json.dumps(to_json(plan), indent=2))
    else:
        print(render(plan))
        if args.plot:
            print(f"Plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
