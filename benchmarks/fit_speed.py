"""The planner's speed model (toolkit/plan/speed.py) against the CPU measurements of docs/benchmarks.md sections 4,
4b and 5, and the fit of its CPU constants from them.

Each check starts from the measured rate of the reference run (1 process; LoRA) and asks the model for the ratio of
the other launch or method at the same settings: DDP x2 and FSDP2 x2 against 1 process (section 5), QLoRA against
LoRA (sections 4 and 4b). What the model adds to the compute (collectives, dequantization) is what is checked.

    python benchmarks/fit_speed.py                        # model vs measured, within 15%?
    python benchmarks/fit_speed.py --write-calibration    # refit calibration.json's cpu_speed_fit first

Nothing is timed here: the measurements are the tables in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "docs" / "benchmarks.md"
TOLERANCE = 0.15


def _table(section: str, text: str) -> list[dict[str, str]]:
    """The first Markdown table after the heading that starts with `section`, as rows of column -> cell."""
    start = text.index(f"\n## {section}")
    lines = [x for x in text[start:].splitlines() if x.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(head):
            break
        rows.append(dict(zip(head, cells)))
    return rows


def measurements(text: str | None = None) -> list[dict]:
    """The measured ratios: what, the planner setup that matches the run, the reference rate and the ratio."""
    text = text or BENCHMARKS.read_text(encoding="utf-8")
    out = []
    dist = {r["launch"]: r for r in _table("5.", text)}
    one = float(dist["1 process"]["tok/s (all ranks)"])
    for launch, strategy in (("DDP x2", "ddp"), ("FSDP2 x2", "fsdp")):
        out.append({"what": f"section 5: gpt2-mini {launch} vs 1 process", "model": "gpt2-mini", "task": "pretrain",
                    "strategy": strategy, "devices": 2, "batch": 4, "seq": 128, "ckpt": False,
                    "reference_tokens_per_s": one,
                    "measured": float(dist[launch]["tok/s (all ranks)"]) / one})
    for section, ckpt in (("4.", False), ("4b.", True)):
        rows = {(r["shape"], r["method"]): r for r in _table(section, text)}
        for shape in ("124M", "350M"):
            if (shape, "lora") not in rows or (shape, "qlora") not in rows:
                continue
            lora, qlora = float(rows[shape, "lora"]["s/step"]), float(rows[shape, "qlora"]["s/step"])
            model = {"124M": "gpt2", "350M": "gpt2-medium"}[shape]
            out.append({"what": f"section {section[:-1]}: {shape} QLoRA vs LoRA (tokens/s)", "model": model,
                        "task": "qlora", "strategy": "single", "devices": 1, "batch": 4, "seq": 128, "ckpt": ckpt,
                        "reference_tokens_per_s": 4 * 128 / lora, "measured": lora / qlora})
    return out


def predicted(m: dict) -> float:
    """The model's ratio for one measurement, its compute pinned to the measured reference rate."""
    from toolkit.flops import flops_per_token
    from toolkit.plan import ASSUMED_MFU, Setup, estimate, load_shape, throughput

    shape = load_shape(m["model"], "pretrain" if m["task"] == "pretrain" else "lora")
    reference_task = "lora" if m["task"] == "qlora" else m["task"]

    def setup(task: str, devices: int) -> Setup:
        return Setup(task=task, device="cpu", num_devices=devices, device_memory=1e15, batch_size=m["batch"],
                     seq_len=m["seq"], precision="fp32", gradient_checkpointing=m["ckpt"])

    fpt = flops_per_token(shape.n_layer, shape.n_embd, shape.vocab_size, m["seq"])
    fpt *= (4 / 6 if reference_task == "lora" else 1) * (8 / 6 if m["ckpt"] else 1)
    peak = m["reference_tokens_per_s"] * fpt / ASSUMED_MFU["cpu"]  # the reference run's compute, as measured

    def rate(task: str, strategy: str, devices: int) -> float:
        s = setup(task, devices)
        # CPU processes share the machine's cores: each of N gets 1/N of the peak, as `toolkit plan` assumes
        return throughput(shape, s, estimate(shape, s, strategy, m["ckpt"]), peak / devices)["tokens_per_s"]

    return rate(m["task"], m["strategy"], m["devices"]) / rate(reference_task, "single", 1)


def compare() -> list[tuple[dict, float]]:
    return [(m, predicted(m)) for m in measurements()]


def fit() -> dict:
    """CPU constants from the measurements: the per-collective latency from FSDP2 x2 (the bandwidth cannot be told
    apart from it in these runs and stays the assumed shared-memory figure), the dequantization bandwidth as the
    value with the smallest largest relative error over the QLoRA rows."""
    from toolkit.plan import calibration

    ms = measurements()
    speed = calibration.SPEED

    def worst(values: dict, rows: list[dict]) -> float:
        old = dict(speed)
        speed.update(values)
        try:
            return max(abs(predicted(m) / m["measured"] - 1) for m in rows)
        finally:
            speed.clear()
            speed.update(old)

    dist = [m for m in ms if m["task"] == "pretrain"]
    qlora = [m for m in ms if m["task"] == "qlora"]
    latency = min((x / 2 for x in range(1, 101)), key=lambda ms_: worst({"cpu_collective_latency_ms": ms_}, dist))
    dequant = min((float(x) for x in range(1, 101)), key=lambda g: worst({"cpu_dequant_gbps": g}, qlora))
    return {"cpu_collective_latency_ms": latency, "cpu_dequant_gbps": dequant}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-calibration", action="store_true",
                        help="refit the cpu_speed_fit section of toolkit/plan/calibration.json first")
    args = parser.parse_args(argv)
    if args.write_calibration:
        import datetime

        from toolkit.plan import calibration

        values = fit()
        calibration.update_section(
            "cpu_speed_fit", {k.removeprefix("cpu_"): v for k, v in values.items()},
            date=datetime.date.today().isoformat(),
            machine="fitted to docs/benchmarks.md sections 4, 4b and 5 (2-core AMD EPYC (AVX-512) CPU, torch 2.13.0 "
                    "CPU)", command="python benchmarks/fit_speed.py --write-calibration")
        calibration.SPEED.update(values)
        print(f"calibration.json, section cpu_speed_fit: {values}")
    ok = True
    print(f"{'measurement':<48} {'measured':>8} {'model':>8} {'error':>7}")
    for m, p in compare():
        error = p / m["measured"] - 1
        ok &= abs(error) <= TOLERANCE
        print(f"{m['what']:<48} {m['measured']:>8.3f} {p:>8.3f} {error:>+7.1%}")
    print(f"every ratio within {TOLERANCE:.0%}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
