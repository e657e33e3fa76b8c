"""The decision: which strategy to recommend, why, and the exact command and accelerate config to run it.

Strategies are tried fastest first (candidates()); the first that fits at the largest micro-batch wins, with
gradient accumulation keeping the global batch when the micro-batch has to shrink, and CPU offload only when
nothing else fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toolkit.errors import UserError
from toolkit.plan.calibration import CPU_DEFAULT_MALLOC_MARGIN, GiB
from toolkit.plan.memory import LORA_MODULES, Estimate, Setup, estimate
from toolkit.plan.shapes import Shape
from toolkit.plan.speed import speedups, throughput
from toolkit.presets import GPT2_VOCAB_SIZE, LORA_DROPOUT, PRESETS, pad_vocab


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
    speedups: dict = field(default_factory=dict)  # the guide's ratios by the planner's speed model


def make_plan(shape: Shape, s: Setup, strategy: str = "auto", peak_flops: float | None = None) -> Plan:
    def gib(x: float) -> str:
        return f"{x / GiB:.2f} GiB"

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
        ordered = [(c, b) for offload in (False, True) for b in batches for c in cands
                   if (c[0] == "fsdp_offload") == offload]
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
                               f"{choice.batch_size} with gradient accumulation {choice.grad_accum} keeps the "
                               f"global batch")
                at = f" at micro-batch {choice.batch_size}"
            reasons.append(f"{choice.name}{at}: {gib(choice.total)}/{where} fits in {gib(choice.capacity)} "
                           f"({pct:.0f}%)")
            if choice.strategy in ("single", "ddp") and s.task in ("pretrain", "full") and s.num_devices > 1:
                reasons.append("FSDP2 not needed: every device holds the whole model and optimizer, "
                               "no parameter all-gathers")
            if choice.strategy == "fsdp":
                ddp = estimate(shape, s, "ddp", choice.gradient_checkpointing, choice.batch_size, choice.grad_accum)
                reasons.append(f"FSDP2 shards parameters, gradients and AdamW state over {s.num_devices} devices "
                               f"(1/{s.num_devices} each); DDP would need {gib(ddp.total)}")
            if pct > 90:
                reasons.append("tight: above 90% of the memory; fragmentation may push it over, "
                               "consider a smaller micro-batch")
            if s.device == "cpu":
                # measured by benchmarks/check_plan.py --default_malloc (calibration.json: cpu_default_malloc_margin)
                reasons.append(f"CPU: with the recipes' allocator defaults the resident set ran up to "
                               f"{CPU_DEFAULT_MALLOC_MARGIN:.0%} above this "
                               "(freed blocks stay in the heap for speed); "
                               "MALLOC_MMAP_THRESHOLD_=131072 gives this figure")
        else:
            fix = ("; use --task qlora (4-bit base weights) or a smaller model" if s.task in ("full", "lora") else
                   "; use a smaller model or more devices" if s.task != "qlora" else "; use a smaller model")
            reasons.append("nothing fits, even at micro-batch 1 with gradient checkpointing" + fix)
    plan = Plan(shape, s, estimates, choice, reasons)
    if choice is not None:
        plan.accelerate_config, plan.command = command_for(shape, s, choice)
        plan.throughput = throughput(shape, s, choice, peak_flops)
        plan.speedups = speedups(shape, s, peak_flops)
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
        preset = PRESETS.get(model, {})
        args += [f"--{key} {getattr(shape, key)}" for key in ("n_layer", "n_head", "n_embd", "n_positions")
                 if key in preset and getattr(shape, key) != preset[key]]  # the shape flags it was planned with
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
        if s.lora_dropout != LORA_DROPOUT:
            args.append(f"--lora_dropout {s.lora_dropout:g}")
        if not s.double_quant and s.task == "qlora":
            args.append("--no_use_bnb_nested_quant")
        if s.token_metrics:
            args.append("--token_metrics true")
        if (not cpu or s.task == "qlora") and not est.gradient_checkpointing:
            # the LoRA recipes checkpoint by default on CUDA, qlora.py on CPU too
            args.append("--gradient_checkpointing false")
    if s.attn != "sdpa":
        args.append(f"--attn_implementation {s.attn}")
    if not cpu and s.precision == "fp32":
        args.append("--bf16 false")
    return config_path, f"{launch} {' '.join(args)}"
