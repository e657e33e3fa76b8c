"""The training guard's cost per step (toolkit/guard.py), and how far a clean run's loss strays above its running
median (what --spike_threshold must stay clear of).

recipes/pretrain.py runs as a real subprocess whose guard is switched off and on in alternate blocks of --block
optimizer steps (off: its per-step work taken out by a small wrapper: the loss/grad-norm check, the data positions),
so both halves share the process, its memory layout and the machine's noise; separate guarded and unguarded
processes differed by more than the guard's cost from one process to the next. The figure is the median time
between consecutive optimizer steps with the guard on against off, after the first --warmup steps, per run; the
table gives the median over --repeats runs. Each run also reports the largest ratio of a step loss to the median
of the 50 step losses before it (after 10), the figure the guard compares with --spike_threshold.

    python benchmarks/guard_cost.py                          # tiny and small shapes, 3 runs each
    python benchmarks/guard_cost.py --shapes small --repeats 5 --steps 200
    python benchmarks/guard_cost.py --quick --doc ''         # smoke version: it runs, the figures mean nothing

Timings need a machine nobody else is using. The full run writes section 10 of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# name -> model flags, per-device batch, block size
SHAPES = {
    "tiny": (["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--n_positions", "256"], 16, 128),
    "small": (["--n_layer", "6", "--n_head", "6", "--n_embd", "384", "--n_positions", "256"], 8, 256),
}

# Runs the recipe with the guard's per-step work switched off for every other block of BLOCK steps. Writes, for every
# optimizer step, its end time and whether the guard was on for it, and every step loss.
CHILD = """
import json, os, runpy, sys, time
from transformers import trainer_callback
from toolkit import guard

record, block = sys.argv.pop(1), int(sys.argv.pop(1))
on = {"now": True}
guarded_step, guarded_norm, guarded_item = (guard.TrainingGuard.training_step, guard.TrainingGuard._get_grad_norm,
                                            guard.WithPosition.__getitem__)

def training_step(self, model, inputs, num_items_in_batch=None):
    if on["now"]:
        return guarded_step(self, model, inputs, num_items_in_batch)
    inputs = {k: v for k, v in inputs.items() if k != guard.POSITION_KEY}  # a batch fetched while it was on
    return super(guard.TrainingGuard, self).training_step(model, inputs, num_items_in_batch)

def get_grad_norm(self, model, grad_norm=None):
    if on["now"]:
        return guarded_norm(self, model, grad_norm)
    return super(guard.TrainingGuard, self)._get_grad_norm(model, grad_norm)

guard.TrainingGuard.training_step = training_step
guard.TrainingGuard._get_grad_norm = get_grad_norm
guard.WithPosition.__getitem__ = lambda self, i: guarded_item(self, i) if on["now"] else self.dataset[i]
steps, real = [], trainer_callback.CallbackHandler.on_step_end

def on_step_end(self, args, state, control):
    steps.append((time.perf_counter(), on["now"]))
    on["now"] = (state.global_step // block) % 2 == 0  # for the next step
    if state.global_step == state.max_steps:
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        with open(record, "w") as f:
            json.dump({"steps": steps, "losses": losses}, f)
    return real(self, args, state, control)

trainer_callback.CallbackHandler.on_step_end = on_step_end
sys.argv = ["recipes/pretrain.py", *sys.argv[1:]]
runpy.run_path("recipes/pretrain.py", run_name="__main__")
"""


def max_spike_ratio(losses: list[float], window: int = 50, min_history: int = 10) -> float:
    """Largest loss / running median, as the guard computes it (every step accepted: a clean run)."""
    worst = 0.0
    for i in range(min_history, len(losses)):
        history = losses[max(0, i - window):i]
        worst = max(worst, losses[i] / statistics.median(history))
    return worst


def run(shape: str, steps: int, switch_every: int, work: Path) -> dict:
    flags, batch, block = SHAPES[shape]
    out = Path(tempfile.mkdtemp(dir=work))
    record = out / "record.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    data = ["--train_file", str(SHAKESPEARE)] if SHAKESPEARE.is_file() else []
    cmd = [sys.executable, "-c", CHILD, str(record), str(switch_every), *flags, "--block_size", str(block),
           "--per_device_train_batch_size", str(batch), "--max_steps", str(steps), "--warmup_steps", "10",
           "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
           "--sample_max_new_tokens", "1", "--output_dir", str(out / "run"), "--data_cache_dir", str(work / "cache"),
           "--vocab_size", "4096", *data]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{shape} failed:\n{result.stderr[-3000:]}")
    return json.loads(record.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per shape")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block", type=int, default=5, help="steps between switching the guard off or on")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats, args.steps, args.warmup = ["tiny"], 1, 24, 2
    load = harness.load_average()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for shape in args.shapes:
            step_s = {True: [], False: []}
            ratios = []
            for _ in range(args.repeats):
                record = run(shape, args.steps, args.block, work)
                marks = record["steps"][args.warmup:]
                gaps = {True: [], False: []}
                for (t0, _), (t1, guarded) in zip(marks, marks[1:]):
                    gaps[guarded].append(t1 - t0)
                for guarded in (True, False):
                    step_s[guarded].append(statistics.median(gaps[guarded]))
                ratios.append(max_spike_ratio(record["losses"]))
            on, off = statistics.median(step_s[True]), statistics.median(step_s[False])
            costs = [a / b - 1 for a, b in zip(step_s[True], step_s[False])]
            results.append({"shape": shape, "guarded_s": on, "unguarded_s": off, "cost": statistics.median(costs),
                            "runs": args.repeats, "timed_steps": args.steps - args.warmup,
                            "max_loss_over_median": max(ratios), "guarded_runs_s": step_s[True],
                            "unguarded_runs_s": step_s[False], "cost_per_run": costs})
            print(f"{shape}: step {on * 1e3:.2f} ms guard on vs {off * 1e3:.2f} ms off (cost per run "
                  f"{' '.join(f'{c * 100:+.2f}%' for c in costs)}; {args.repeats} runs x {args.steps - args.warmup} "
                  f"steps); largest loss / running median: {max(ratios):.3f}", flush=True)
    harness.save_json(args.json, {"load": load, "results": results})
    if not args.quick:
        rows = []
        for r in results:
            flags, batch, block = SHAPES[r["shape"]]
            rows.append([f"{r['shape']} ({' '.join(flags[1::2][:3])}; {batch} x {block} tokens per step)",
                         f"{r['guarded_s'] * 1e3:.1f}", f"{r['unguarded_s'] * 1e3:.1f}", f"{r['cost'] * 100:+.2f}%",
                         " ".join(f"{c * 100:+.2f}%" for c in r["cost_per_run"]),
                         f"{r['max_loss_over_median']:.2f}"])
        body = harness.table(["shape (n_layer n_head n_embd)", "step ms, guarded", "step ms, unguarded",
                              "guard's cost (median of runs)", "cost in each run",
                              "largest loss / running median"], rows)
        body += (f"\n\n{args.repeats} runs per shape of {args.steps} steps, the guard switched off and on every "
                 f"{args.block} steps within each run, timed after the first {args.warmup} (Tiny Shakespeare, "
                 "vocabulary 4096); step ms are medians over the runs. The per-step "
                 "work is one 2-float all-reduce (several processes) and one read of the step's loss and gradient "
                 "norm to the host; the per-layer norms and the data position are computed only for a reported "
                 "step. The last column is the figure `--spike_threshold` (default 2) must stay clear of in a clean "
                 "run: the largest ratio of a step loss to the median of the 50 accepted step losses before it. "
                 "Reported spikes in other projects were far above it (litgpt#628: 1.70 -> 11.46, 6.7x).")
        harness.write_section("guard_cost", "10. Training guard: cost per step and the spike threshold", body,
                              load=load, doc=Path(args.doc) if args.doc else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
