"""Write every `toolkit plan` table and scenario verdict in docs/ from the planner itself, so they cannot go stale.

Each generated block sits between two markers in the Markdown file:

    <!-- plan_tables: NAME -->
    ...written by this script...
    <!-- /plan_tables: NAME -->

    python benchmarks/plan_tables.py            # rewrite the blocks from the planner as it is now
    python benchmarks/plan_tables.py --check    # exit 1 and name the blocks that differ (tests/test_plan_tables.py)

Nothing here is measured: the figures are the planner's formulas and calibration.json, computed in a second.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3
GPT2_SIZES = {"gpt2": "gpt2 (124M)", "gpt2-medium": "gpt2-medium (355M)", "gpt2-large": "gpt2-large (774M)",
              "gpt2-xl": "gpt2-xl (1.5B)"}


def plan(argv: list[str]):
    """The Plan `toolkit plan ARGV` prints (no CPU matmul benchmark: GPU plans only)."""
    from toolkit.commands.plan import build_parser
    from toolkit.plan import make_plan, setup_from_args

    args = build_parser().parse_args([*argv, "--no_flops_benchmark"])
    shape, setup, peak = setup_from_args(args)
    return make_plan(shape, setup, args.strategy, peak)


def _g(x: float, digits: int = 2) -> str:
    return f"{x / GiB:.{digits}f}"


def pretrain_table() -> str:
    argv = ["--device", "cuda", "--num_devices", "4", "--device_memory", "80GB", "--batch_size", "4",
            "--seq_len", "1024"]
    rows = ["| model | strategy | parameters | gradients | optimizer | activations | runtime | not alive at once "
            "| **peak** |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"single": "1 GPU", "ddp": "DDP", "fsdp": "FSDP2"}
    for model, label in GPT2_SIZES.items():
        p = plan(["--model", model, *argv])
        for i, e in enumerate(e for e in p.estimates if e.strategy in names):
            c = e.components
            first = f"| {label} |" if i == 0 else "| |"
            rows.append(f"{first} {names[e.strategy]} | {_g(c['parameters'])} | "
                        f"{_g(c['gradients'])} | {_g(c['optimizer'])} | {_g(c['activations'])} | "
                        f"{_g(c['overhead'])} | {_g(c['overlap'])} | **{_g(e.total)}** |")
    return "\n".join(rows)


def finetune_table() -> str:
    from toolkit.plan import estimate

    argv = ["--device", "cuda", "--num_devices", "1", "--device_memory", "24GB", "--batch_size", "4",
            "--seq_len", "1024"]
    rows = ["| model | task | parameters | gradients + optimizer | activations | quantization | runtime | **peak** "
            "| with grad ckpt |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model in ("gpt2", "gpt2-medium", "gpt2-xl"):
        for task in ("lora", "qlora"):
            p = plan(["--model", model, "--task", task, *argv])
            e = p.estimates[0]
            ck = estimate(p.shape, p.setup, e.strategy, True)
            c = e.components
            quant = f"{c['quantization'] / GiB:.3f}" if task == "qlora" else "-"
            peak = f"**{_g(e.total)}**" if e.fits else f"{_g(e.total)} (no)"
            with_ck = _g(ck.total) if e.fits else f"**{_g(ck.total)}**" if ck.fits else f"{_g(ck.total)} (no)"
            rows.append(f"| {model} | {'QLoRA' if task == 'qlora' else 'LoRA'} | {_g(c['parameters'])} | "
                        f"{_g(c['gradients'] + c['optimizer'])} | {_g(c['activations'])} | {quant} | "
                        f"{_g(c['overhead'])} | {peak} | {with_ck} |")
    return "\n".join(rows)


def _k(tokens_per_s: float) -> str:
    k = tokens_per_s / 1000
    return f"{k:.0f}k" if k >= 10 else f"{k:.1f}k"


def speed_table() -> str:
    from toolkit.flops import GPU_PEAK_BF16_FLOPS

    gpus = ["H100", "A100", "A10G", "RTX 4090"]
    head = " | ".join(f"{g} ({GPU_PEAK_BF16_FLOPS[g] / 1e12:.0f} TFLOP/s)" if i == 0 else
                      f"{g} ({GPU_PEAK_BF16_FLOPS[g] / 1e12:.0f})" for i, g in enumerate(gpus))
    rows = [f"| model | FLOPs/token | {head} |", "|---|---:|" + "---:|" * len(gpus)]
    for model, label in GPT2_SIZES.items():
        cells, fpt = [], None
        for i, gpu in enumerate(gpus):
            tp = plan(["--model", model, "--gpu", gpu, "--num_devices", "1", "--seq_len", "1024",
                       "--strategy", "single"]).throughput
            fpt = tp["flops_per_token"]
            cells.append(f"~{_k(tp['tokens_per_s'])}" + (" tokens/s" if i == 0 and model == "gpt2" else ""))
        rows.append(f"| {label} | {fpt / 1e9:#.3g} G | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# The original guide's scenarios: (what, `toolkit plan` arguments).
SCENARIOS = [
    ("124M on 1 GPU (24 GB)", "--model gpt2 --gpu A10G --num_devices 1 --batch_size 8"),
    ("124M on 4 GPUs (24 GB)", "--model gpt2 --gpu A10G --num_devices 4 --batch_size 8"),
    ("1.5B on 4 x 8 GB", "--model gpt2-xl --device_memory 8GB --num_devices 4 --batch_size 1"),
    ("1.5B on 4 x 8 GB, micro-batch 4", "--model gpt2-xl --device_memory 8GB --num_devices 4 --batch_size 4"),
    ("LoRA on 8 GB (gpt2)", "--model gpt2 --task lora --device cuda --device_memory 8GB --batch_size 8"),
    ("QLoRA on 4 GB (gpt2)", "--model gpt2 --task qlora --device cuda --device_memory 4GB --batch_size 8"),
    ("gpt2-medium QLoRA on 8 GB",
     "--model gpt2-medium --task qlora --device cuda --device_memory 8GB --batch_size 8"),
]


def _tried(p) -> list:
    """The estimates the planner tried, in its order, before the one it chose (at the requested micro-batch)."""
    from toolkit.plan import candidates, estimate

    out = []
    for strategy, ck in candidates(p.setup):
        e = estimate(p.shape, p.setup, strategy, ck)
        if e.fits and p.choice.batch_size == p.setup.batch_size:
            break
        if not e.fits:
            out.append(e)
    return out


def verdict(p) -> str:
    """The planner's reasons, shortened to the figures: what does not fit, what fits, the command."""
    s = p.setup
    tried = [e for e in _tried(p)]
    parts = []
    if tried:
        parts.append(", ".join(f"{e.name} {_g(e.total, 1)}" for e in tried)
                     + f" GiB {'does' if len(tried) == 1 else 'do'} not fit")
    c = p.choice
    at = f" at micro-batch {c.batch_size} with gradient accumulation {c.grad_accum}" if c.batch_size != s.batch_size \
        else ""
    tight = ", tight" if c.total / c.capacity > 0.9 else ""
    parts.append(f"{c.name}{at}: {_g(c.total, 1)} GiB fits in {c.capacity / GiB:.0f} GiB "
                 f"({100 * c.total / c.capacity:.0f}%{tight}). `{p.command}`")
    return "; ".join(parts)


def qlora_vs_lora_cpu() -> str:
    """docs/benchmarks.md section 4's sentence: the planner's QLoRA and LoRA peaks at 350M on CPU, checkpointed."""
    argv = ["--model", "gpt2-medium", "--batch_size", "4", "--seq_len", "128", "--device", "cpu", "--num_devices",
            "1", "--device_memory", "16GB", "--gradient_checkpointing"]
    lora, qlora = (plan([*argv, "--task", task]).choice for task in ("lora", "qlora"))
    return (f"{_g(qlora.total)} vs {_g(lora.total)} GiB ({qlora.total / lora.total:.2f}x), of which "
            f"{_g(qlora.components['overhead'])} GiB of Python, torch and HF runtime and "
            f"{_g(qlora.components['activations'])} GiB of activations")


def preflight_example() -> str:
    """The line recipes/pretrain.py --preset gpt2 --per_device_train_batch_size 16 --block_size 1024 stops with on a
    CPU (torch's CPU build) given 2 GB (toolkit/preflight.py's own wording)."""
    from toolkit import preflight
    from toolkit.plan import Setup, estimate, load_shape, make_plan

    shape = load_shape("gpt2", "pretrain", vocab_size=4096)
    setup = Setup(task="pretrain", device="cpu", num_devices=1, device_memory=2 * GiB, batch_size=16,
                  seq_len=1024, precision="fp32")
    run = estimate(shape, setup, "single", False)
    line = preflight.verdict(run, setup, setup.device_memory, f"{preflight.MEMORY_ENV}=2GB", make_plan(shape, setup))
    return f"```text\nerror: {line}\n```"


def speed_check_table() -> str:
    """benchmarks/fit_speed.py's comparison: the speed model's ratios against the CPU measurements."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fit_speed", REPO / "benchmarks" / "fit_speed.py")
    fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit)
    rows = ["| measurement (docs/benchmarks.md) | measured | speed model | error |", "|---|---:|---:|---:|"]
    for m, predicted in fit.compare():
        rows.append(f"| {m['what']} | {m['measured']:.3f} | {predicted:.3f} | {predicted / m['measured'] - 1:+.1%} |")
    return "\n".join(rows)


def scenarios_table() -> str:
    rows = ["| scenario | command | verdict |", "|---|---|---|"]
    for what, argv in SCENARIOS:
        rows.append(f"| {what} | `toolkit plan {argv}` | {verdict(plan(argv.split()))} |")
    return "\n".join(rows)


TABLES = {
    "docs/training_strategies.md": {"pretrain": pretrain_table, "finetune": finetune_table, "speed": speed_table,
                                    "scenarios": scenarios_table, "preflight": preflight_example,
                                    "speed-check": speed_check_table},
    "docs/benchmarks.md": {"qlora-vs-lora-cpu": qlora_vs_lora_cpu},
}
INLINE = {"qlora-vs-lora-cpu"}  # a fragment of a sentence; the others are tables on lines of their own


def _block(name: str) -> re.Pattern:
    newline = "" if name in INLINE else "\n"
    return re.compile(rf"(<!-- plan_tables: {re.escape(name)} -->{newline})(.*?)"
                      rf"({newline}<!-- /plan_tables: {re.escape(name)} -->)", re.S)


def regenerate(root: Path = REPO) -> dict[str, tuple[str, list[str]]]:
    """path -> (the file's text with every block written from the planner now, the names of blocks that changed)."""
    out = {}
    for rel, tables in TABLES.items():
        text = original = (root / rel).read_text(encoding="utf-8")
        changed = []
        for name, make in tables.items():
            pattern = _block(name)
            match = pattern.search(text)
            if match is None:
                raise SystemExit(f"error: {rel} has no '<!-- plan_tables: {name} -->' block; add the markers")
            table = make()
            if match.group(2) != table:
                changed.append(name)
                text = text[:match.start(2)] + table + text[match.end(2):]
        out[rel] = (text if text != original else original, changed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a committed block differs from the planner")
    args = parser.parse_args(argv)
    stale = []
    for rel, (text, changed) in regenerate().items():
        stale += [f"{rel}: {name}" for name in changed]
        if changed and not args.check:
            (REPO / rel).write_text(text, encoding="utf-8")
    if args.check and stale:
        print("stale planner tables (run python benchmarks/plan_tables.py): " + ", ".join(stale))
        return 1
    print(("rewrote " + ", ".join(stale)) if stale else "every planner table in docs/ is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
