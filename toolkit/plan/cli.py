"""`toolkit plan`'s command line: options, hardware detection, and the plan as text, JSON or a PNG chart.

    toolkit plan --model gpt2 --task pretrain --num_devices 4 --device_memory 8GB --batch_size 8 --seq_len 1024
    toolkit plan --model gpt2-medium --task qlora --device cuda --device_memory 8GB --json
    toolkit plan --model path/to/checkpoint --task lora --plot plan.png
    python -m toolkit.plan --help
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import asdict

from toolkit.args.parser import AT_LEAST_1, FRACTION, Range, check_ranges
from toolkit.errors import OneLineArgumentParser, UserError, exit_on_user_error
from toolkit.plan.advice import Plan, make_plan
from toolkit.plan.calibration import GiB, MiB
from toolkit.plan.memory import OPTIMIZERS, STRATEGIES, TASKS, Estimate, Setup, resolve_lora_targets
from toolkit.plan.shapes import Shape, load_shape
from toolkit.plan.speed import GUIDE_SPEEDUPS, INTERCONNECTS
from toolkit.presets import LORA_DROPOUT, PRESETS, parse_config_overrides

# Memory of well-known cards (GiB), so `--gpu A100-40GB` works without --device_memory.
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "A100-80GB": 80, "A100-40GB": 40, "A100": 80, "L40S": 48, "A10G": 24,
                  "L4": 24, "RTX 4090": 24, "RTX 3090": 24, "V100": 16, "T4": 16}


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


def torch_is_cuda_build() -> bool:
    """Whether the installed torch is a CUDA build (PyPI's default wheel on Linux), with or without a GPU: on a CPU its
    CUDA libraries still add to every training process's resident memory."""
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="toolkit plan",
        description="Memory per device (parameters, gradients, optimizer, activations, quantization, overhead) for "
                    "GPT-2 training, the recipe and accelerate config that fit, and the command to run.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default="gpt2",
                   help=f"preset ({', '.join(PRESETS)}), a folder/config.json, or a Hub name")
    m.add_argument("--config_overrides", default=None, help="e.g. 'n_layer=24,n_embd=1024'")
    for key in ("n_layer", "n_head", "n_embd", "n_positions"):
        m.add_argument(f"--{key}", type=int, default=None)
    m.add_argument("--vocab_size", type=int, default=None,
                   help="tokenizer size (default: GPT-2's 50257; pretraining pads it to 64)")
    m.add_argument("--pad_vocab_to_multiple_of", type=int, default=64)
    t = p.add_argument_group("training")
    t.add_argument("--task", default="pretrain", choices=TASKS,
                   help="pretrain (from scratch), full (fine-tune all weights), lora, qlora")
    t.add_argument("--batch_size", type=int, default=None, help="micro-batch per device (default 8 on GPU, 4 on CPU)")
    t.add_argument("--seq_len", type=int, default=None,
                   help="tokens per sequence (default: n_positions on GPU, 256 on CPU)")
    t.add_argument("--grad_accum", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto: bf16 on GPU, fp32 on CPU")
    t.add_argument("--gradient_checkpointing", action="store_true",
                   help="force checkpointing (auto-considered when needed)")
    t.add_argument("--optimizer", default="adamw", choices=tuple(OPTIMIZERS))
    t.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    t.add_argument("--lora_r", type=int, default=16)
    t.add_argument("--lora_targets", default="all",
                   help="recipes/lora.py preset (all, attention, attention-qv, mlp) or "
                        "module names, comma-separated (c_attn,c_proj,c_fc; default all)")
    t.add_argument("--lora_dropout", type=float, default=LORA_DROPOUT)
    t.add_argument("--no_double_quant", action="store_true", help="QLoRA without double quantisation of the absmax")
    t.add_argument("--token_metrics", action="store_true",
                   help="LoRA/QLoRA with --token_metrics: trl's fused LM head (in tiles) instead of the model's loss")
    h = p.add_argument_group("hardware (default: detect)")
    h.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    h.add_argument("--num_devices", type=int, default=None, help="GPUs (or CPU processes)")
    h.add_argument("--device_memory", default=None,
                   help="memory per GPU (e.g. 8GB) or, on CPU, the RAM all processes share")
    h.add_argument("--gpu", default=None, help=f"card name for memory and peak FLOP/s: {', '.join(GPU_MEMORY_GIB)}")
    h.add_argument("--interconnect", default="nvlink", choices=INTERCONNECTS,
                   help="what GPUs' collectives run over, for the speed estimate (CPU ranks: gloo, fitted)")
    h.add_argument("--bandwidth", type=float, default=None,
                   help="GB/s per device the collectives get, instead of the interconnect's default")
    o = p.add_argument_group("output")
    o.add_argument("--strategy", default="auto", choices=("auto", *STRATEGIES),
                   help="force one strategy instead of choosing")
    o.add_argument("--json", action="store_true", help="print the plan as JSON")
    o.add_argument("--plot", default=None, help="write a stacked bar chart of the memory per strategy to this PNG")
    o.add_argument("--no_flops_benchmark", action="store_true",
                   help="CPU: skip the 0.5 s matmul benchmark (no tokens/s estimate)")
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
    if memory <= 0:
        raise UserError(f"--device_memory must be positive, got {args.device_memory}")
    overrides = parse_config_overrides(args.config_overrides)
    overrides.update({k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "n_positions") if getattr(args, k)})
    shape = load_shape(args.model, args.task, overrides, args.vocab_size, args.pad_vocab_to_multiple_of)
    targets = resolve_lora_targets(args.lora_targets)
    precision = args.precision if args.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    seq_len = args.seq_len or (shape.n_positions if device == "cuda" else min(256, shape.n_positions))
    if seq_len > shape.n_positions:
        raise UserError(f"--seq_len {seq_len} is longer than the model's n_positions={shape.n_positions}; "
                        f"lower --seq_len")
    cpu_ram = (hw or {}).get("cpu_ram") or 0.0
    s = Setup(task=args.task, device=device, num_devices=num, device_memory=memory,
              gpu_name=args.gpu or (hw or {}).get("gpu_name", ""),
              batch_size=args.batch_size or (8 if device == "cuda" else 4), seq_len=seq_len,
              grad_accum=args.grad_accum,
              precision=precision, gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
              attn=args.attn, lora_r=args.lora_r, lora_targets=targets, lora_dropout=args.lora_dropout,
              double_quant=not args.no_double_quant, cpu_ram=cpu_ram if device == "cuda" else 0.0,
              torch_cuda_build=device == "cpu" and torch_is_cuda_build(), token_metrics=args.token_metrics,
              interconnect=args.interconnect, bandwidth_gbps=args.bandwidth or 0.0)
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
        raise UserError(f"unknown GPU '{name}'; pass --device_memory (e.g. 24GB) or one of: "
                        f"{', '.join(GPU_MEMORY_GIB)}")
    return None


STRATEGY_LABELS = {"ddp": "DDP", "fsdp": "FSDP2", "lora": "LoRA", "qlora": "QLoRA"}
ROWS = [("parameters", "parameters"), ("gradients", "gradients"), ("optimizer", "optimizer state"),
        ("activations", "activations"), ("quantization", "quantization consts"), ("overhead", "framework/runtime"),
        ("overlap", "not alive at once")]


def render(plan: Plan) -> str:
    sh, s = plan.shape, plan.setup
    dev = (f"{s.num_devices} x {s.gpu_name or 'GPU'} ({s.device_memory / GiB:.0f} GiB each)" if s.device == "cuda"
           else f"CPU, {s.num_devices} process(es) sharing {s.device_memory / GiB:.1f} GiB RAM")
    lora = f", LoRA r={s.lora_r} on {','.join(s.lora_targets)}" if s.task in ("lora", "qlora") else ""
    lines = [
        (f"Model: {sh.source}: {sh.n_params:,} parameters (n_layer={sh.n_layer}, n_embd={sh.n_embd}, "
         f"n_head={sh.n_head}, vocab={sh.vocab_size})"),
        (f"Task: {s.task}; micro-batch {s.batch_size} x {s.seq_len} tokens, grad accum {s.grad_accum}, "
         f"{s.precision}, {s.optimizer}, {s.attn} attention" + lora),
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
            lines.append(f"  throughput (ESTIMATE): ~{tp['tokens_per_s']:,.0f} tokens/s on {tp['devices']} device(s) "
                         f"at {tp['peak_flops_per_device'] / 1e12:.3g} TFLOP/s x assumed MFU {tp['assumed_mfu']:.0%}, "
                         f"{tp['flops_per_token'] / 1e9:.3g} GFLOP per token; per optimizer step "
                         f"{tp['compute_s']:.3g} s compute + {tp['communication_s']:.3g} s collectives "
                         f"({tp['interconnect']}, {tp['bandwidth_gbps']:g} GB/s) + {tp['dequantization_s']:.3g} s "
                         f"dequantization")
        if plan.speedups:
            ours = ", ".join(f"{STRATEGY_LABELS[k]} {v:.2f}x (guide {GUIDE_SPEEDUPS[k]}x)"
                             for k, v in plan.speedups.items())
            lines.append(f"  speed vs 1 device of full training (ESTIMATE, at this batch): {ours}")
    lines.append("")
    lines.append("Details: " + "; ".join(f"{k}: {v}" for k, v in (plan.choice or ests[0]).details.items()))
    return "\n".join(lines)


def _columns(plan: Plan) -> list[Estimate]:
    """The table's strategies at the requested settings, plus the recommendation when it differs from all of them."""
    ests = list(plan.estimates)

    def key(e: Estimate) -> tuple:
        return e.strategy, e.gradient_checkpointing, e.batch_size

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
            "reasons": plan.reasons, "throughput": plan.throughput,
            "speedups": {"planner": plan.speedups, "guide": GUIDE_SPEEDUPS}},
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


# Numeric options of `toolkit plan` and their valid ranges (toolkit.args.check_ranges words the error).
RANGES = {"n_layer": AT_LEAST_1, "n_head": AT_LEAST_1, "n_embd": AT_LEAST_1, "n_positions": AT_LEAST_1,
          "vocab_size": AT_LEAST_1, "pad_vocab_to_multiple_of": AT_LEAST_1, "batch_size": AT_LEAST_1,
          "seq_len": AT_LEAST_1, "grad_accum": AT_LEAST_1, "lora_r": AT_LEAST_1, "lora_dropout": FRACTION,
          "num_devices": AT_LEAST_1, "bandwidth": Range(0, low_open=True)}


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_ranges(vars(args), RANGES)
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
