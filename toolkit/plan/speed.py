"""The throughput estimate: tokens/s from the peak FLOP/s of the devices, an assumed MFU and FLOPs per token.

It is an estimate, labelled so in every output: the MFU is assumed (calibration.json), not measured per run.
"""

from __future__ import annotations

from toolkit.plan.calibration import ASSUMED_MFU
from toolkit.plan.memory import Estimate, Setup
from toolkit.plan.shapes import Shape


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
