"""`toolkit plan`'s output: the plan as a text table, as JSON, or as a PNG chart of the memory per strategy."""

from __future__ import annotations

from dataclasses import asdict

from toolkit.errors import UserError
from toolkit.plan.advice import Plan
from toolkit.plan.calibration import GiB
from toolkit.plan.memory import Estimate, Setup
from toolkit.plan.speed import GUIDE_SPEEDUPS

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
