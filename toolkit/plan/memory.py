"""The memory formulas: bytes per device of weights, gradients, optimizer state, activations and runtime.

They follow what PyTorch autograd saves for transformers' GPT2LMHeadModel; each term is named after the tensor
it stands for. They were checked on CPU (fp32) by counting saved tensors and by peak RSS of the real recipes
(benchmarks/check_plan.py, docs/training_strategies.md); the runtime terms are fitted and live in
calibration.json. The bf16 (GPU autocast) terms are derived from CUDA autocast's op lists and are not yet
checked on a GPU.

Peak model, per device. Gradients are freed by zero_grad(set_to_none=True) and rebuilt during backward while
activations are freed, so the peak is the largest of three moments, not the sum of all terms:
  backward start        weights + optimizer + buffers + activations + loss-head transients (3 logits-sized tensors)
  after lm_head backward weights + optimizer + buffers + activations + logits grad + embedding grad
  end of backward       weights + optimizer + buffers + all gradients (+ FSDP2 reduce-scatter buffers)
With gradient accumulation (>1 micro-batch per update) gradients are alive during the next forward, so they add.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.errors import UserError
from toolkit.plan.calibration import (
    CPU_CUDA_BUILD_EXTRA,
    CPU_DISTRIBUTED_OVERHEAD,
    CPU_OVERHEAD,
    GPU_ALLOCATOR_SLACK,
    GPU_CONTEXT,
    TRL_CPU_HEAD_TILES,
    GiB,
)
from toolkit.plan.shapes import Shape
from toolkit.presets import LORA_DROPOUT

TASKS = ("pretrain", "full", "lora", "qlora")
STRATEGIES = ("single", "ddp", "fsdp", "fsdp_offload")
STRATEGY_NAMES = {"single": "1 device", "ddp": "DDP", "fsdp": "FSDP2", "fsdp_offload": "FSDP2 + CPU offload"}
OPTIMIZERS = {"adamw": 8.0, "adamw_8bit": 2.0, "sgd": 4.0}  # state bytes per trainable parameter
# GPT-2's four Conv1D projections per block, as LoRA targets ("c_proj" names both), and the target presets of
# recipes/lora.py (toolkit/lora.py TARGET_PRESETS; tests/test_plan.py checks they agree).
LORA_MODULES = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")
LORA_TARGET_PRESETS = {"all": ["c_attn", "c_proj", "c_fc"], "attention": ["c_attn", "attn.c_proj"],
                       "attention-qv": ["c_attn"], "mlp": ["c_fc", "mlp.c_proj"]}


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
    lora_r: int = 16  # recipes/lora.py defaults: r 16, no dropout, all projections
    lora_targets: tuple[str, ...] = LORA_MODULES
    lora_dropout: float = LORA_DROPOUT
    double_quant: bool = True
    cpu_ram: float = 0.0  # host RAM (for offload / the CPU side); 0 = unknown
    torch_cuda_build: bool = False  # CPU: the installed torch is a CUDA build, whose libraries add resident memory
    token_metrics: bool = False  # lora.py/qlora.py --token_metrics: trl's fused LM head instead of the model's loss
    interconnect: str = "nvlink"  # GPUs: what the collectives run over (speed.py); CPU ranks use gloo
    bandwidth_gbps: float = 0.0  # GB/s the collectives get, instead of the interconnect's default; 0 = default


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


def resolve_lora_targets(text: str) -> tuple[str, ...]:
    """'all', 'attention', 'c_attn,c_proj', ... -> the module kinds of LORA_MODULES (recipes/lora.py's presets)."""
    out: list[str] = []
    for item in text.replace(",", " ").split():
        for name in LORA_TARGET_PRESETS.get(item, [item]):
            kinds = [m for m in LORA_MODULES if m == name or m.endswith("." + name)]
            if not kinds:
                raise UserError(f"unknown --lora_targets '{item}'; use a preset ({', '.join(LORA_TARGET_PRESETS)}) "
                                f"or GPT-2 module names (c_attn, c_proj, attn.c_proj, c_fc, mlp.c_proj)")
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
    tensors (log-softmax output, its gradient, the logits gradient), the LoRA recipes too; with --token_metrics
    they score through trl's fused head, which works in tiles.
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
    if lora and s.token_metrics:
        # --token_metrics: trl's chunked, fused LM head scores tokens in tiles of up to 4096 tokens x 32768 vocab,
        # never the whole logits. Without Triton (CPU) its torch fallback keeps ~8.3 fp32 tiles alive in backward
        # (measured: TRL_CPU_HEAD_TILES); with Triton, one bf16 tile plus the fp32 hidden-state gradient.
        tile = min(n_tok, 4096) * min(V, 32768)
        head_inputs = res * u + 4 * n_tok * d  # ln_f input, the hidden states it scores
        head_peak = 2 * tile + 4 * n_tok * d if mixed else TRL_CPU_HEAD_TILES * 4 * tile
        logits = 0.0
    else:
        # the model's own loss (toolkit.trainer.CausalLMLoss, also the fine-tuning recipes' default): full logits
        head_inputs = res * u + (0 if lora else low * u)  # ln_f input, lm_head input (saved for a trained head only)
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
            dtype = "bf16" if mixed else "fp32"
            details["parameters"] = (f"{linear / 1e6:.1f}M NF4 linear weights + {(N - linear) / 1e6:.1f}M "
                                     f"{dtype} + {trainable / 1e6:.2f}M LoRA {dtype}")
            details["quantization"] = "absmax per 64 weights" + (
                " (double-quantised)" if s.double_quant else " (fp32)")
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
        # DDP all-reduce buckets: a second copy of the gradients (gradient_as_bucket_view=False)
        buckets = 4.0 * trainable
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
        if s.torch_cuda_build:
            overhead += CPU_CUDA_BUILD_EXTRA[s.task]
            details["overhead"] += f", +{CPU_CUDA_BUILD_EXTRA[s.task] / 2**20:.0f} MiB for torch's CUDA build"
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
                              f"{'checkpointed' if ckpt else 'no checkpointing'}, "
                              f"{'bf16 autocast' if mixed else 'fp32'}")
    capacity = s.device_memory / (n if s.device == "cpu" else 1)  # CPU processes share the machine's RAM
    fits = total <= capacity and (not host or not s.cpu_ram or host * n <= s.cpu_ram)
    return Estimate(strategy, ckpt, b, ga, components, details, total, capacity, fits, host, peak_moment)
