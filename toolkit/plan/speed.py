"""The throughput estimate: compute from the peak FLOP/s of the devices and an assumed MFU, plus what the compute
does not cover: the collectives of DDP and FSDP2 (bytes moved over a bandwidth, and a latency per collective) and
QLoRA's dequantization of the 4-bit weights (bytes through memory) in every pass.

It is an estimate, labelled so in every output: the MFU is assumed and the bandwidths are data-sheet figures for
GPUs and fitted to docs/benchmarks.md sections 4, 4b and 5 on CPU (calibration.json: sections gpu, cpu_speed and
cpu_speed_fit).

Per optimizer step, per device:
  compute   tokens x FLOPs per token / (peak x MFU)
  DDP       a ring all-reduce of the fp32 gradients, 2 (n-1)/n x 4 bytes per trainable parameter, once per optimizer
            step (no_sync during accumulation); it overlaps the backward pass except its last bucket
  FSDP2     per micro-batch, all-gather of the parameters in forward and again in backward ((n-1)/n x the parameter
            bytes each) and a reduce-scatter of the gradients ((n-1)/n x 4 bytes per parameter); 3 collectives per
            block and the root unit; on GPUs prefetching hides them behind compute except one block's worth
  QLoRA     per micro-batch and pass (forward, backward, the recompute with checkpointing): every NF4 linear weight
            read (0.5 byte) and written out in the compute dtype
"""

from __future__ import annotations

from toolkit.plan.calibration import ASSUMED_MFU, SPEED
from toolkit.plan.memory import Estimate, Setup, lora_trainable
from toolkit.plan.shapes import Shape

INTERCONNECTS = tuple(SPEED["interconnect_gbps"])  # for GPUs; on CPU the ranks meet over gloo in shared memory
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb: the last bucket is reduced after backward ends

# The guide's speed table (4 GPUs for DDP and FSDP2; LoRA and QLoRA against full training on one), shown beside
# the planner's own ratios.
GUIDE_SPEEDUPS = {"ddp": 3.8, "fsdp": 3.2, "lora": 1.2, "qlora": 0.9}


def link(s: Setup) -> tuple[str, float, float]:
    """(interconnect name, bytes/s, seconds of latency per collective) this setup's collectives run at."""
    if s.device == "cpu":
        name, gbps, latency = "gloo (CPU)", SPEED["cpu_collective_gbps"], SPEED["cpu_collective_latency_ms"]
    else:
        name = s.interconnect if s.interconnect in INTERCONNECTS else "nvlink"
        gbps, latency = SPEED["interconnect_gbps"][name], SPEED["gpu_collective_latency_ms"]
    if s.bandwidth_gbps:
        name, gbps = f"{name}, --bandwidth", s.bandwidth_gbps
    return name, gbps * 1e9, latency / 1e3


def step_costs(shape: Shape, s: Setup, est: Estimate, compute_s: float) -> dict[str, float]:
    """Seconds per optimizer step, per device, beyond the compute: collectives and dequantization."""
    n = s.num_devices if est.strategy in ("ddp", "fsdp", "fsdp_offload") else 1
    _, bandwidth, latency = link(s)
    micro = est.grad_accum
    mixed = s.device == "cuda" and s.precision in ("bf16", "fp16")
    comm = 0.0
    if n > 1 and est.strategy == "ddp":
        trainable = shape.n_params if s.task in ("pretrain", "full") else lora_trainable(shape, s.lora_r,
                                                                                         s.lora_targets)
        total = 2 * (n - 1) / n * 4 * trainable
        exposed = min(total, 2 * (n - 1) / n * DDP_BUCKET_BYTES)
        comm = exposed / bandwidth + latency
    elif n > 1:  # FSDP2
        pbytes = 2 if mixed else 4
        moved = (n - 1) / n * shape.n_params * (2 * pbytes + 4)
        collectives = 3 * (shape.n_layer + 1)
        per_micro = moved / bandwidth + collectives * latency
        if s.device == "cuda":  # prefetch hides the collectives behind compute, all but one unit's worth
            per_micro = max(per_micro / (shape.n_layer + 1), per_micro - compute_s / micro)
        comm = micro * per_micro
    dequant = 0.0
    if s.task == "qlora":
        passes = 3 if est.gradient_checkpointing else 2
        out_bytes = 2 if mixed else 4
        linear = shape.n_layer * shape.block_linear_weights
        gbps = SPEED["gpu_memory_gbps"] if s.device == "cuda" else SPEED["cpu_dequant_gbps"]
        dequant = micro * passes * linear * (0.5 + out_bytes) / (gbps * 1e9)
    return {"communication_s": comm, "dequantization_s": dequant}


def throughput(shape: Shape, s: Setup, est: Estimate, peak_flops: float | None) -> dict:
    """tokens/s = devices x tokens per device step / (compute + collectives + dequantization) (an estimate)."""
    from toolkit.flops import flops_per_token

    fpt = flops_per_token(shape.n_layer, shape.n_embd, shape.vocab_size, s.seq_len)
    if s.task in ("lora", "qlora"):
        fpt *= 4 / 6  # frozen weights: forward (2N) + input gradients (2N), no weight gradients
    if est.gradient_checkpointing:
        fpt *= 8 / 6  # one extra forward
    n = s.num_devices if est.strategy in ("ddp", "fsdp", "fsdp_offload") else 1
    mfu = ASSUMED_MFU[s.device]
    name, bandwidth, _ = link(s)
    out = {"flops_per_token": fpt, "peak_flops_per_device": peak_flops, "assumed_mfu": mfu, "devices": n,
           "tokens_per_s": None, "label": "estimate", "interconnect": name, "bandwidth_gbps": bandwidth / 1e9,
           "compute_s": None, "communication_s": None, "dequantization_s": None}
    if peak_flops:
        tokens = est.batch_size * s.seq_len * est.grad_accum  # per device and optimizer step
        compute = tokens * fpt / (peak_flops * mfu)
        costs = step_costs(shape, s, est, compute)
        out.update(costs, compute_s=compute,
                   tokens_per_s=n * tokens / (compute + costs["communication_s"] + costs["dequantization_s"]))
    return out


def speedups(shape: Shape, s: Setup, peak_flops: float | None) -> dict[str, float]:
    """The planner's ratios that the guide's table gives, at this setup's batch, fitting or not: DDP and FSDP2 on
    this many devices against one; LoRA and QLoRA against full training of the same model on one device."""
    from dataclasses import replace

    from toolkit.plan.memory import estimate

    if not peak_flops:
        return {}

    def rate(task: str, strategy: str, devices: int) -> float:
        setup = replace(s, task=task, num_devices=devices)
        # CPU processes share the cores: one process alone gets them all
        peak = peak_flops * s.num_devices / devices if s.device == "cpu" else peak_flops
        return throughput(shape, setup, estimate(shape, setup, strategy, s.gradient_checkpointing),
                          peak)["tokens_per_s"]

    full = "pretrain" if s.task in ("pretrain", "full") else "full"
    one = rate(full, "single", 1)
    out = {}
    if s.num_devices > 1:
        out["ddp"] = rate(full, "ddp", s.num_devices) / one
        out["fsdp"] = rate(full, "fsdp", s.num_devices) / one
    out["lora"] = rate("lora", "single", 1) / one
    out["qlora"] = rate("qlora", "single", 1) / one
    return out
