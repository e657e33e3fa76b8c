"""What `toolkit plan` plans for: the hardware (detected, or a card named), memory sizes as written, and the Setup
built from the command's options.
"""

from __future__ import annotations

import os
import re

from toolkit.errors import UserError
from toolkit.plan.calibration import GiB, MiB
from toolkit.plan.memory import Setup, resolve_lora_targets
from toolkit.plan.shapes import Shape, load_shape
from toolkit.presets import parse_config_overrides

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
        key = match_gpu(args.gpu)
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
            key = match_gpu(s.gpu_name, GPU_PEAK_BF16_FLOPS, required=False)
            peak = GPU_PEAK_BF16_FLOPS.get(key) if key else None
        if peak and precision == "fp32":
            peak /= 2  # tf32 tensor cores run at half the bf16 rate on these cards (an approximation)
    elif not args.no_flops_benchmark:
        from toolkit.flops import measure_cpu_peak_flops

        # Each of N processes gets cores/N threads; together they share the measured peak.
        peak = measure_cpu_peak_flops() / num
    return shape, s, peak


def match_gpu(name: str, table: dict | None = None, required: bool = True) -> str | None:
    table = table or GPU_MEMORY_GIB
    norm = name.upper().replace("_", " ").replace("-", " ")
    for key in sorted(table, key=len, reverse=True):
        if all(part in norm.split() or part in norm for part in key.upper().replace("-", " ").split()):
            return key
    if required:
        raise UserError(f"unknown GPU '{name}'; pass --device_memory (e.g. 24GB) or one of: "
                        f"{', '.join(GPU_MEMORY_GIB)}")
    return None
