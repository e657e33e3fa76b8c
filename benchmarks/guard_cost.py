"""The training guard's cost per step (toolkit/guard.py), and how far a clean run's loss strays above its running
median (what --spike_threshold must stay clear of).

recipes/pretrain.py runs as a real subprocess, with the guard and without it (its per-step work taken out by a small
wrapper: the loss/grad-norm check, the data positions), interleaved (guarded, unguarded, guarded, ...) so machine
noise hits both alike. The figure is the median time between consecutive optimizer steps after the first
--warmup steps. Each guarded run also reports the largest ratio of a step loss to the median of the 50 accepted
step losses before it (after 10), the figure the guard compares with --spike_threshold.

    python benchmarks/guard_cost.py                          # tiny and small shapes, 3 rounds each
    python benchmarks/guard_cost.py --shapes small --repeats 5 --steps 120
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

# Runs the recipe; without the guard when GUARD_OFF is set. Writes the time of every step end and every step loss.
CHILD = """
import json, os, runpy, sys, time
from transformers import trainer_callback
from toolkit import guard

record = sys.argv.pop(1)
if os.environ.get("GUARD_OFF"):
    def training_step(self, model, inputs, num_items_in_batch=None):
        return super(guard.TrainingGuard, self).training_step(model, inputs, num_items_in_batch)
    def get_grad_norm(self, model, grad_norm=None):
        return super(guard.TrainingGuard, self)._get_grad_norm(model, grad_norm)
    guard.TrainingGuard.training_step = training_step
    guard.TrainingGuard._get_grad_norm = get_grad_norm
    guard.WithPosition.__getitem__ = lambda self, i: self.dataset[i]
times, real = [], trainer_callback.CallbackHandler.on_step_end

def on_step_end(self, args, state, control):
    times.append(time.perf_counter())
    if state.global_step == state.max_steps:
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        with open(record, "w") as f:
            json.dump({"times": times, "losses": losses}, f)
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


def run(shape: str, guarded: bool, steps: int, work: Path) -> dict:
    flags, batch, block = SHAPES[shape]
    out = Path(tempfile.mkdtemp(dir=work))
    record = out / "record.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("GUARD_OFF", None)
    if not guarded:
        env["GUARD_OFF"] = "1"
    data = ["--train_file", str(SHAKESPEARE)] if SHAKESPEARE.is_file() else []
    cmd = [sys.executable, "-c", CHILD, str(record), *flags, "--block_size", str(block),
           "--per_device_train_batch_size", str(batch), "--max_steps", str(steps), "--warmup_steps", "10",
           "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
           "--sample_max_new_tokens", "1", "--output_dir", str(out / "run"), "--data_cache_dir", str(work / "cache"),
           "--vocab_size", "4096", *data]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{shape} guarded={guarded} failed:\n{result.stderr[-3000:]}")
    return json.loads(record.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats, args.steps, args.warmup = ["tiny"], 1, 14, 2
    load = harness.load_average()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for shape in args.shapes:
            step_s = {True: [], False: []}
            ratios = []
            for _ in range(args.repeats):
                for guarded in (True, False):
                    record = run(shape, guarded, args.steps, work)
                    times = record["times"][args.warmup:]
                    gaps = [b - a for a, b in zip(times, times[1:])]
                    step_s[guarded].append(statistics.median(gaps))
                    if guarded:
                        ratios.append(max_spike_ratio(record["losses"]))
            on, off = statistics.median(step_s[True]), statistics.median(step_s[False])
            results.append({"shape": shape, "guarded_s": on, "unguarded_s": off, "cost": on / off - 1,
                            "runs": args.repeats, "timed_steps": args.steps - args.warmup,
                            "max_loss_over_median": max(ratios), "guarded_runs_s": step_s[True],
                            "unguarded_runs_s": step_s[False]})
            print(f"{shape}: step {on * 1e3:.2f} ms guarded vs {off * 1e3:.2f} ms unguarded "
                  f"({(on / off - 1) * 100:+.2f}%; medians of {args.repeats} runs x {args.steps - args.warmup} "
                  f"steps); largest loss / running median in the clean runs: {max(ratios):.3f}", flush=True)
    harness.save_json(args.json, {"load": load, "results": results})
    if not args.quick:
        rows = []
        for r in results:
            flags, batch, block = SHAPES[r["shape"]]
            rows.append([f"{r['shape']} ({' '.join(flags[1::2][:3])}; {batch} x {block} tokens per step)",
                         f"{r['guarded_s'] * 1e3:.1f}", f"{r['unguarded_s'] * 1e3:.1f}", f"{r['cost'] * 100:+.2f}%",
                         f"{r['max_loss_over_median']:.2f}"])
        body = harness.table(["shape (n_layer n_head n_embd)", "step ms, guarded", "step ms, unguarded",
                              "guard's cost", "largest loss / running median"], rows)
        body += (f"\n\nMedians of {args.repeats} interleaved runs per shape, each timed over its last "
                 f"{args.steps - args.warmup} of {args.steps} steps (Tiny Shakespeare, vocabulary 4096). The per-step "
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
