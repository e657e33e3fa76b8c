"""Check `toolkit plan` against reality: run the real recipes for a few steps, read each rank's peak memory,
print prediction vs measurement, and write the table into docs/training_strategies.md.

    python benchmarks/check_plan.py                    # all configurations (~15 min on 2 cores)
    python benchmarks/check_plan.py --only nano-1p,124m-ddp
    python benchmarks/check_plan.py --quick --doc ''   # small: a calibration and a check per recipe (the tests run it)
    python benchmarks/check_plan.py --write-calibration            # refit the planner's CPU runtime term
    python benchmarks/check_plan.py --replan rows.json --write-calibration   # ... from a saved run, no new runs

The calibration rows (nano-*: a few MiB of tensors) measure the runtime term of each recipe, the memory of python,
torch and the HF libraries that no formula predicts; every other row is a held-out check of the formulas. Each check
is reported twice: with the planner's shipped constants (toolkit/plan/calibration.json) and with the runtime term
this run measured, which is what the planner predicts once `--write-calibration` has refit it on this machine.

How memory is measured (CPU). Each rank runs the recipe unchanged (runpy) inside this file's `--child` mode,
which adds one TrainerCallback through a wrapped `Trainer.__init__`. The callback resets the kernel's peak-RSS
counter (`echo 5 > /proc/self/clear_refs`) at the start of every optimizer step from the second on and reads
`VmHWM` from /proc/self/status at its end, so the figure is the steady-state training step (optimizer state
allocated), not model loading or the final export. Runs use glibc's MALLOC_MMAP_THRESHOLD_=131072 so that freed
tensors go back to the kernel at once: peak RSS is then live tensors + runtime, the CPU analogue of
torch.cuda.max_memory_allocated. Without it glibc keeps freed blocks and RSS creeps upward over the first steps,
and pretrain.py on CPU tells glibc to keep all of them (toolkit/cpu_allocator.py; it leaves a MALLOC_* setting
alone) (`--default_malloc` measures that way; training_strategies.md notes how much more it was). On a GPU the child
also records torch.cuda.max_memory_allocated per rank.

Why hand-written: no library measures the peak memory of one training phase of each rank of a torchrun launch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's toolkit, also when run as a script from elsewhere
DOC = REPO / "docs" / "training_strategies.md"
CALIBRATION_FILE = REPO / "toolkit" / "plan" / "calibration.json"  # this checkout's, not an installed copy
SHARED = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
GPT2_TOKENIZER = SHARED / "gpt2-tokenizer"
BEGIN, END = "<!-- check_plan:begin -->", "<!-- check_plan:end -->"
MiB = 1024**2
# the calibration row that measures each recipe's runtime term (one process), and the 2-rank one for its extra
CALIBRATION_ROWS = {"pretrain": "nano-1p", "lora": "nano-lora-1p", "qlora": "nano-qlora-1p", "distributed": "nano-ddp"}
TARGET = 0.15  # the project's target for |predicted / measured - 1| over the checks


# --------------------------------------------------------------------------------------------------------------
# Child mode: one rank of a recipe, with its training-step peak recorded
# --------------------------------------------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _pin_mmap_threshold() -> None:
    """Re-apply MALLOC_MMAP_THRESHOLD_ for the training steps, in case anything changed it while loading
    (toolkit/lora.py's 4-bit loader tunes glibc's threshold, but only when the environment does not set it)."""
    value = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if value and sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(value))  # -3 = M_MMAP_THRESHOLD (malloc.h)


def child(out_prefix: str, recipe: str, recipe_args: list[str]) -> None:
    import atexit
    import runpy

    import transformers
    from transformers import TrainerCallback

    record: dict = {"rank": int(os.environ.get("RANK", "0")), "step_peaks": [], "cuda_peaks": []}

    class PeakCallback(TrainerCallback):
        t0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= 1:  # steady state: from the 2nd optimizer step on
                _reset_peak()
                if self.t0 is None:
                    self.t0, self.step0 = time.perf_counter(), state.global_step
                if _cuda():
                    import torch

                    torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            if self.t0 is not None:
                record["step_peaks"].append(_status("VmHWM"))
                record["rss_anon_file"] = [_status("RssAnon"), _status("RssFile")]  # after the step, for diagnosis
                record["steps_timed"] = state.global_step - self.step0
                record["seconds"] = time.perf_counter() - self.t0
                if _cuda():
                    import torch

                    record["cuda_peaks"].append(torch.cuda.max_memory_allocated())
                    record["gpu_name"] = torch.cuda.get_device_name(0)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            record["before_train_peak"] = _status("VmHWM")
            record["before_train_rss"] = _status("VmRSS")
            _pin_mmap_threshold()
            config = getattr(getattr(model, "base_model", model), "config", None) or getattr(model, "config", None)
            if config is not None:
                record["config"] = {k: v for k, v in config.to_dict().items()
                                    if isinstance(v, (int, float, str, bool))}

        def on_train_end(self, args, state, control, **kwargs):
            # What follows training (evaluation, export, sample) is not what the planner predicts: stop here.
            write()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def write():
        with open(f"{out_prefix}.rank{record['rank']}.json", "w") as f:
            json.dump(record, f)

    original_init = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(PeakCallback())

    transformers.Trainer.__init__ = init

    atexit.register(write)
    sys.argv = [recipe, *recipe_args]
    runpy.run_path(recipe, run_name="__main__")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------------------
# Parent mode: the configurations, the runs, the comparison
# --------------------------------------------------------------------------------------------------------------

# name -> dict(recipe task, launch, model flags, batch, seq, extra flags). Sizes are chosen so the model-dependent
# memory is large next to the ~0.7 GiB runtime (124M: 0.5 GB of weights, 2 GB with gradients and AdamW).
def configurations(work: Path, quick: bool) -> dict[str, dict]:
    gpt2_tok = (["--tokenizer_name", str(GPT2_TOKENIZER), "--train_file", str(SHAKESPEARE)]
                if GPT2_TOKENIZER.exists() else [])
    nano = ["--preset", "gpt2-nano"]
    mini = ["--preset", "gpt2-mini"]
    base = ["--preset", "gpt2"] + gpt2_tok
    if quick:
        # the runtime term on this machine, then a shape and batch no calibration used (tensors ~half of the peak)
        # the same for qlora.py (4-bit base, its default checkpointing, the model's own loss head), the check at a
        # batch and block of its own. Two steps: the second, with the optimizer state allocated, is the one measured
        # (later steps peak at the same RSS)
        return {"quick-nano-1p": {"task": "pretrain", "procs": 1, "model": nano, "batch": 8, "seq": 128, "steps": 2,
                                  "calibration": True},
                "quick-mini-1p": {"task": "pretrain", "procs": 1, "model": mini, "batch": 16, "seq": 128, "steps": 2},
                "quick-nano-qlora-1p": {"task": "qlora", "procs": 1, "model": None, "base": "gpt2-nano", "batch": 8,
                                        "seq": 128, "steps": 2, "calibration": True},
                "quick-mini-qlora-1p": {"task": "qlora", "procs": 1, "model": None, "base": "gpt2-mini", "batch": 16,
                                        "seq": 64, "steps": 2, "ckpt": True}}
    # The nano-* runs calibrate toolkit.plan's constant runtime term (CPU_OVERHEAD: python, torch, HF libraries,
    # Trainer) per recipe kind and for a 2-rank launch: their tensors are a few MiB, so peak RSS there is the runtime.
    # Every other row is a held-out check of the formulas. CALIBRATION_ROWS names them for --write-calibration.
    configs = {
        "nano-1p": {"task": "pretrain", "procs": 1, "model": nano, "batch": 8, "seq": 128, "calibration": True},
        "nano-ddp": {"task": "pretrain", "procs": 2, "launch": "ddp", "model": nano, "batch": 8, "seq": 128,
                     "calibration": True},
        "mini-1p": {"task": "pretrain", "procs": 1, "model": mini, "batch": 16, "seq": 256},
        "mini-eager-1p": {"task": "pretrain", "procs": 1, "model": mini, "batch": 16, "seq": 256, "attn": "eager"},
        "124m-1p": {"task": "pretrain", "procs": 1, "model": base, "batch": 4, "seq": 256},
        "124m-ckpt-1p": {"task": "pretrain", "procs": 1, "model": base, "batch": 8, "seq": 256, "ckpt": True},
        "124m-ddp": {"task": "pretrain", "procs": 2, "launch": "ddp", "model": base, "batch": 2, "seq": 256},
        "124m-fsdp": {"task": "pretrain", "procs": 2, "launch": "fsdp", "model": base, "batch": 2, "seq": 256},
        "124m-full-ft-1p": {"task": "full", "procs": 1, "model": None, "batch": 4, "seq": 256},
    }
    for name in ("lora", "qlora"):
        configs[f"nano-{name}-1p"] = {"task": name, "procs": 1, "model": None, "base": "gpt2-nano", "batch": 8,
                                      "seq": 128, "calibration": True}
        # each recipe's own default: qlora.py checkpoints activations everywhere, lora.py on CUDA only
        configs[f"124m-{name}-1p"] = {"task": name, "procs": 1, "model": None, "batch": 4, "seq": 256,
                                      "ckpt": name == "qlora"}
    return configs


def recipe_command(name: str, c: dict, work: Path, base_model: Path | None) -> tuple[list[str], Path]:
    out = work / name
    recipe = "recipes/pretrain.py" if c["task"] in ("pretrain", "full") else f"recipes/{c['task']}.py"
    steps = c.get("steps", 4)
    if c["task"] in ("pretrain", "full"):
        model = c["model"] if c["task"] == "pretrain" else ["--model_name_or_path", str(base_model)]
        args = [*model, "--per_device_train_batch_size", str(c["batch"]), "--block_size", str(c["seq"]),
                "--max_steps", str(steps), "--warmup_steps", "1", "--logging_steps", "1", "--eval_strategy", "no",
                "--save_strategy", "no", "--report_to", "none", "--output_dir", str(out),
                "--overwrite_output_dir", "true", "--sample_max_new_tokens", "1",
                "--optim", "adamw_torch_fused",  # the planner's optimizer state is AdamW's (auto: Muon, small presets)
                "--data_cache_dir", str(out / "data_cache" / "packed")]
        if c["task"] == "full" and SHAKESPEARE.exists():
            args += ["--train_file", str(SHAKESPEARE)]
        if c.get("attn"):
            args += ["--attn_implementation", c["attn"]]
        if c.get("ckpt"):
            args += ["--gradient_checkpointing", "true"]
    else:
        args = lora_args(c, base_model, out, steps)
    me = [str(Path(__file__).resolve()), "--child", str(out / "_peak"), recipe]
    if c["procs"] == 1:
        cmd = [sys.executable, *me, *args]
    else:
        config = f"accelerate_configs/{c['launch']}_cpu.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
               "--num_processes", str(c["procs"]), *me, *args, "--use_cpu", "true"]
    return cmd, out


def lora_args(c: dict, base_model: Path, out: Path, steps: int) -> list[str]:
    """Flags of recipes/lora.py / qlora.py (trl SFTTrainer): short run on Shakespeare lines."""
    args = ["--model_name_or_path", str(base_model), "--per_device_train_batch_size", str(c["batch"]),
            "--max_length", str(c["seq"]), "--max_steps", str(steps), "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--output_dir", str(out), "--overwrite_output_dir", "true",
            "--max_eval_samples", "8", "--sample_max_new_tokens", "1",
            # said either way: the recipes' defaults differ (qlora.py checkpoints everywhere, lora.py on CUDA only)
            "--gradient_checkpointing", "true" if c.get("ckpt") else "false"]
    if SHAKESPEARE.exists():
        args += ["--train_file", str(SHAKESPEARE)]
    return args + c.get("extra", [])


def make_base_model(path: Path, shape: str = "gpt2") -> Path:
    """A randomly initialised GPT-2 of the given preset with the real GPT-2 tokenizer (or a BPE), saved like a Hub
    model."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from toolkit.presets import PRESETS

    if GPT2_TOKENIZER.exists():
        tok = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    else:
        from pydoc_data import topics

        from toolkit.tokenizer import train_bpe_tokenizer

        tok = train_bpe_tokenizer([topics.topics[k] for k in sorted(topics.topics)], 4096)
    torch.manual_seed(0)
    config = GPT2Config(**PRESETS[shape], vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def measure(name: str, c: dict, work: Path, base_model: Path | None, default_malloc: bool) -> dict:
    cmd, out = recipe_command(name, c, work, base_model)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("_peak.rank*.json"):
        old.unlink()
    # Every run builds its own data caches (datasets' and pretrain.py's packed tokens): what tokenizing leaves in the
    # heap (~15 MiB) is then part of every row, calibration or check, whatever earlier runs left in a shared cache.
    shutil.rmtree(out / "data_cache", ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HF_DATASETS_CACHE=str(out / "data_cache" / "datasets"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"{name}: command failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("_peak.rank*.json"))]
    if not ranks or not all(r["step_peaks"] for r in ranks):
        raise RuntimeError(f"{name}: no training-step peaks recorded (did the recipe train at least 2 steps?)")
    r0 = ranks[0]
    tokens = r0.get("steps_timed", 0) * c["batch"] * c["seq"] * c["procs"]
    return {"cmd": cmd, "wall_s": wall, "config": r0.get("config"), "peaks": [max(r["step_peaks"]) for r in ranks],
            "cuda_peaks": [max(r["cuda_peaks"]) for r in ranks if r["cuda_peaks"]],
            "tokens_per_s": tokens / r0["seconds"] if r0.get("seconds") else None, "out": out}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        cpu = "AVX512" if " avx512f" in flags else "AVX2" if " avx2" in flags else cpu
    except OSError:
        pass
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU"
    return f"{os.cpu_count()}-core {cpu} CPU, torch {torch.__version__.split('+')[0]} {build}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        child(argv[1], argv[2], argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated configuration names")
    p.add_argument("--quick", action="store_true",
                   help="four small runs: a calibration row and a held-out check each for pretrain.py and qlora.py "
                        "(the test suite runs this)")
    p.add_argument("--doc", default=str(DOC), help="markdown file to write the table into ('' = don't)")
    p.add_argument("--work_dir", default=None, help="where run outputs go (default: a temporary folder)")
    p.add_argument("--default_malloc", action="store_true",
                   help="measure with the recipes' own allocator settings (pretrain.py keeps freed memory on CPU)")
    p.add_argument("--json", default=None, help="also write the measurements and predictions to this JSON file")
    p.add_argument("--replan", default=None, metavar="JSON",
                   help="no runs: recompute the predictions for the measurements saved by --json "
                        "(after a formula change)")
    p.add_argument("--tolerance", type=float, default=TARGET,
                   help=f"exit 1 when a check is further than this from its measurement, with the shipped "
                        f"constants or with this run's runtime term (default {TARGET}, the project's target)")
    p.add_argument("--write-calibration", "--write_calibration", dest="write_calibration", nargs="?", default=None,
                   const=str(CALIBRATION_FILE), metavar="PATH",
                   help="refit the planner's constants from this run and write them (default: the package's "
                        "toolkit/plan/calibration.json): the runtime term from the calibration rows, or with "
                        "--default_malloc the margin the recipes' own allocator settings add")
    args = p.parse_args(argv)
    if not 0 < args.tolerance < 1:
        print(f"error: --tolerance must be a fraction in (0, 1), got {args.tolerance}; e.g. 0.15", file=sys.stderr)
        return 2

    if args.replan:
        try:
            saved = json.loads(Path(args.replan).read_text())
            meta, rows = saved["meta"], saved["rows"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"error: cannot read --replan {args.replan} ({err}); pass a file written by --json", file=sys.stderr)
            return 2
        meta["replanned"] = datetime.date.today().isoformat()
        names = [row["name"] for row in rows]
    else:
        names = selected(args)
        if names is None:
            return 2
    if args.write_calibration:
        problem = calibration_problem(names, meta["default_malloc"] if args.replan else args.default_malloc)
        if problem:
            print(f"error: --write-calibration {problem}", file=sys.stderr)
            return 2
    if not args.replan:
        meta, rows = run_all(args, names)
    for row in rows:
        replan(row, meta)
    runtime = fit_runtime(rows)
    for row in rows:
        recalibrate(row, runtime)
        print(f"{row['name']:<18} predicted {row['predicted'] / MiB:7.0f} MiB  measured "
              f"{', '.join(f'{x / MiB:.0f}' for x in row['measured'])} MiB  ratio "
              f"{', '.join(f'{r:.3f}' for r in row['ratio'])}"
              + (f" ({', '.join(f'{r:.3f}' for r in row['ratio_recalibrated'])} with this run's runtime term)"
                 if row.get("ratio_recalibrated") else "") + f"  ({row['peak_moment']})", flush=True)
    checks = [row for row in rows if not row["calibration"]] or rows
    worst = max(abs(r - 1) for row in checks for r in row["ratio"])
    print(f"worst |prediction/measured - 1| over the checks (not the calibration runs) = {worst:.1%} "
          f"(tolerance {args.tolerance:.0%})")
    recalibrated = [r for row in checks for r in row.get("ratio_recalibrated") or []]
    if recalibrated:
        worst = max(worst, max(abs(r - 1) for r in recalibrated))
        print(f"  ... with the runtime term measured by this run's calibration rows: "
              f"{max(abs(r - 1) for r in recalibrated):.1%}")
    for row in rows:
        if row["calibration"]:
            print(f"calibration {row['name']}: runtime term implied = measured - predicted tensors = "
                  f"{(max(row['measured']) - row['predicted'] + row['overhead']) / MiB:.0f} MiB per process")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.doc:
        write_doc(Path(args.doc), rows, meta)
    if args.write_calibration:
        write_calibration(Path(args.write_calibration), rows, runtime, meta)
    return 0 if worst <= args.tolerance else 1


def selected(args) -> list[str] | None:
    """The configuration names to run (None after printing an error)."""
    names = list(configurations(Path("."), args.quick))
    if args.only:
        unknown = set(args.only.split(",")) - set(names)
        if unknown:
            print(f"error: unknown configuration(s) {', '.join(sorted(unknown))}; choose from {', '.join(names)}",
                  file=sys.stderr)
            return None
        names = [n for n in names if n in args.only.split(",")]
    return names


def calibration_problem(names: list[str], default_malloc: bool) -> str:
    """Why these runs cannot refit the calibration ('' when they can), said before anything runs."""
    if default_malloc:
        if not [n for n in names if n not in CALIBRATION_ROWS.values()]:
            return "with --default_malloc needs a check row (e.g. --only 124m-1p,124m-lora-1p) to measure the margin"
        return ""
    missing = [n for n in CALIBRATION_ROWS.values() if n not in names]
    if missing:
        return (f"needs the calibration rows {', '.join(CALIBRATION_ROWS.values())} (missing: {', '.join(missing)}); "
                f"run without --quick, or add them to --only")
    return ""


def fit_runtime(rows: list[dict]) -> dict[str, float]:
    """The runtime term (bytes per process) each calibration row of this run implies: its peak minus the predicted
    tensors, per recipe kind ('full' runs pretrain.py, like 'pretrain'); 'distributed' is what a 2-rank launch adds."""
    implied = {row["name"]: [x - (row["predicted"] - row["overhead"]) for x in row["measured"]]
               for row in rows if row["calibration"]}
    fit: dict[str, float] = {}
    for row in rows:
        if row["calibration"] and row["procs"] == 1:
            for task in ("pretrain", "full") if row["task"] in ("pretrain", "full") else (row["task"],):
                fit.setdefault(task, max(implied[row["name"]]))
    for row in rows:
        if row["calibration"] and row["procs"] > 1 and row["task"] in fit:
            fit.setdefault("distributed", max(0.0, max(implied[row["name"]]) - fit[row["task"]]))
    return fit


def recalibrate(row: dict, runtime: dict[str, float]) -> None:
    """Ratios with this run's runtime term instead of the shipped one, where this run measured it."""
    if row["task"] not in runtime or (row["procs"] > 1 and "distributed" not in runtime):
        row["ratio_recalibrated"] = None
        return
    predicted = row["predicted"] - row["overhead"] + runtime[row["task"]]
    predicted += runtime["distributed"] if row["procs"] > 1 else 0
    row["ratio_recalibrated"] = [predicted / x for x in row["measured"]]


def write_calibration(path: Path, rows: list[dict], runtime: dict[str, float], meta: dict) -> None:
    """Refit the CPU sections of the planner's calibration file from this run, with its date, machine and command."""
    from toolkit.plan.calibration import update_section

    source = {"date": meta["date"], "machine": meta["machine"], "command": meta["command"]}
    refit = f"; refit {meta['replanned']} from its saved measurements (--replan)" if meta.get("replanned") else ""
    if meta["default_malloc"]:
        checks = [row for row in rows if not row["calibration"]]
        worst = max(x / row["predicted"] for row in checks for x in row["measured"])
        above = ", ".join(f"{row['name']} {max(row['measured']) / row['predicted'] - 1:+.0%}" for row in checks)
        update_section("cpu_default_malloc_margin", {"fraction": round(worst - 1, 2)}, **source,
                       notes=f"How far peak RSS ran above the prediction with the recipes' own allocator settings "
                             f"(freed blocks stay in the heap): {above}{refit}. `toolkit plan` prints it on CPU.",
                       path=path)
        print(f"calibration: default-allocator margin {worst - 1:.0%} written to {path}")
        return
    # to 5 MiB, like the values fitted before: finer would only record how this run's heap happened to fall
    mib = {task: 5 * round(value / MiB / 5) for task, value in runtime.items()}
    if meta.get("torch_cuda_build"):
        # a CUDA build of torch: only what it adds to the CPU build's term (measured with a CPU build) is refitted
        from toolkit.plan.calibration import read

        cpu = read(path)["sections"]["cpu_runtime"]["values"]  # the file being refit, not the imported copy
        extra = {t: mib[t] - cpu["overhead_mib"][t] for t in ("pretrain", "full", "lora", "qlora")}
        ranks = mib["distributed"] - cpu["distributed_overhead_mib"]
        update_section("cpu_runtime_cuda_build", {"extra_mib": extra}, **source,
                       notes=f"What a CUDA build of torch adds to cpu_runtime's term when training on a CPU (its CUDA "
                             f"libraries are resident too): this run's runtime term {mib} minus cpu_runtime's (a CPU "
                             f"build); a 2-rank launch's extra per rank differed from the CPU build's by "
                             f"{ranks:+d} MiB (not applied). MALLOC_MMAP_THRESHOLD_=131072, rounded to 5 MiB{refit}.",
                       path=path)
        print(f"calibration: CUDA-build extra {extra} written to {path}")
        return
    implied = ", ".join(f"{CALIBRATION_ROWS.get(t, t)} {v / MiB:.0f} MiB" for t, v in runtime.items() if t != "full")
    update_section("cpu_runtime", {"overhead_mib": {t: mib[t] for t in ("pretrain", "full", "lora", "qlora")},
                                   "distributed_overhead_mib": mib["distributed"]}, **source,
                   notes=f"Resident set of python + torch + HF libraries + the Trainer that the tensor formulas do "
                         f"not count: peak RSS of the training steps minus the predicted tensors of the calibration "
                         f"rows (implied: {implied}; 'distributed' is the extra per rank of the 2-rank launch), with "
                         f"MALLOC_MMAP_THRESHOLD_=131072, rounded to 5 MiB{refit}. "
                         f"Table: docs/training_strategies.md.",
                   path=path)
    print(f"calibration: runtime term {mib} written to {path}")


def run_all(args, names: list[str]) -> tuple[dict, list[dict]]:
    """Run the named configurations; rows hold what was measured and what is needed to predict it."""
    import psutil

    from toolkit.flops import measure_cpu_peak_flops
    from toolkit.plan.hardware import torch_is_cuda_build

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="check_plan_"))
    configs = {k: v for k, v in configurations(work, args.quick).items() if k in names}
    cmd = "python benchmarks/check_plan.py" + (" --quick" if args.quick else "") + \
        (f" --only {args.only}" if args.only else "") + (" --default_malloc" if args.default_malloc else "")
    meta = {"date": datetime.date.today().isoformat(), "machine": machine(),
            "ram": float(psutil.virtual_memory().total),
            "peak_flops": measure_cpu_peak_flops(), "default_malloc": args.default_malloc, "command": cmd,
            "torch_cuda_build": torch_is_cuda_build()}
    rows = []
    for name, c in configs.items():
        base_model = None
        if c["model"] is None:  # fine-tuning: a saved random-init base of the preset, like a Hub checkpoint
            preset = c.get("base", "gpt2")
            base_model = make_base_model(work / f"base-{preset}", preset)
        m = measure(name, c, work, base_model, args.default_malloc)
        rows.append({"name": name, "calibration": bool(c.get("calibration")), "task": c["task"], "procs": c["procs"],
                     "launch": c.get("launch") or "single", "batch": c["batch"], "seq": c["seq"],
                     "ckpt": bool(c.get("ckpt")), "attn": c.get("attn", "sdpa"), "config": m["config"],
                     "measured": m["peaks"], "cuda_measured": m["cuda_peaks"], "tokens_per_s": m["tokens_per_s"],
                     "wall_s": m["wall_s"], "command": portable_command(m["cmd"], work)})
        print(f"{name}: measured {', '.join(f'{x / MiB:.0f}' for x in m['peaks'])} MiB ({m['wall_s']:.0f} s)",
              flush=True)
    meta["loadavg"] = os.getloadavg()[0]
    return meta, rows


def portable_command(cmd: list[str], work: Path) -> str:
    """The command as another checkout can rerun it: `python`, paths relative to the repository (../shared/data
    for the shared data), $WORK for the run folder; never this machine's absolute paths."""
    words = []
    for arg in cmd:
        arg = "python" if arg == sys.executable else arg.replace(str(work), "$WORK")
        if arg.startswith(str(REPO.parent) + os.sep):
            arg = os.path.relpath(arg, REPO)
        words.append("$WORK" + shlex.quote(arg[5:]) if arg.startswith("$WORK") else shlex.quote(arg))
    return " ".join(words)


def replan(row: dict, meta: dict) -> None:
    """toolkit.plan's prediction (and throughput estimate) for one measured row, with the current formulas."""
    from toolkit import plan

    shape = plan.shape_from_config(row["config"], "recorded config")
    s = plan.Setup(task=row["task"], device="cpu", num_devices=row["procs"], device_memory=meta["ram"],
                   batch_size=row["batch"], seq_len=row["seq"], precision="fp32", gradient_checkpointing=row["ckpt"],
                   attn=row["attn"], torch_cuda_build=meta.get("torch_cuda_build", False))
    est = plan.estimate(shape, s, {"single": "single", "ddp": "ddp", "fsdp": "fsdp"}[row["launch"]])
    # the whole machine's measured peak, shared by the processes
    tps = plan.throughput(shape, s, est, meta["peak_flops"] / row["procs"])["tokens_per_s"]
    row.update(n_params=shape.n_params, predicted=est.total, overhead=est.components["overhead"],
               peak_moment=est.peak_moment, ratio=[est.total / x for x in row["measured"]], est_tokens_per_s=tps)


def write_doc(path: Path, rows: list[dict], meta: dict) -> None:
    replanned = (f" Predictions recomputed {meta['replanned']} with the current toolkit/plan/ (`--replan`)."
                 if meta.get("replanned") else "")
    malloc_label = "the recipes' own allocator settings" if meta["default_malloc"] else "MALLOC_MMAP_THRESHOLD_=131072"
    lines = [BEGIN, "",
             (f"Measured {meta['date']} on a {meta['machine']}; fp32; peak RSS per rank over training steps 2-4 "
              f"({malloc_label}). "
              f"Generated by `{meta['command']}`.{replanned} CPU fp32 matmul peak measured at the start: "
              f"{meta['peak_flops'] / 1e9:.0f} GFLOP/s; load average at the end {meta['loadavg']:.1f} on "
              f"{os.cpu_count()} cores "
              f"(other jobs share the machine: tokens/s are what these runs got; memory is unaffected)."), "",
             ("| configuration | task | launch | params | micro-batch x seq | predicted (MiB) "
              "| measured per rank (MiB) | predicted / measured | tensors only: predicted / measured "
              "| tokens/s measured | tokens/s estimate |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tensor_ratios = [(r["predicted"] - r["overhead"]) / (x - r["overhead"]) for x in r["measured"]]
        measured = " / ".join(f"{x / MiB:.0f}" for x in r["measured"])
        lines.append(f"| {r['name']}{' (calibration)' if r.get('calibration') else ''} | {r['task']} | "
                     f"{r['launch']} x{r['procs']} | {r['n_params'] / 1e6:.1f}M | "
                     f"{r['batch']} x {r['seq']} | {r['predicted'] / MiB:.0f} | {measured} | "
                     f"{' / '.join(f'{x:.3f}' for x in r['ratio'])} | "
                     f"{' / '.join(f'{x:.3f}' for x in tensor_ratios)} | "
                     f"{r['tokens_per_s'] or float('nan'):.0f} | {r['est_tokens_per_s']:.0f} |")
    lines += ["", ("'tensors only' leaves out the runtime term (`CPU_OVERHEAD`, fitted on the nano rows: "
                   "toolkit/plan/calibration.json) on both sides. "
                   "tokens/s: training steps 2-4 of each run; the estimate is the measured matmul peak x the assumed "
                   "MFU / FLOPs per token (toolkit.plan.throughput), for the whole machine."),
              "", ("Exact commands (each wrapped by `benchmarks/check_plan.py --child` to read the peak; $WORK is the "
                   "run folder, `--work_dir`):"), ""]
    lines += [f"- {r['name']}: `{r['command']}`" for r in rows]
    lines += ["", END]
    block = "\n".join(lines)
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)
    print(f"table written to {path}")


if __name__ == "__main__":
    sys.exit(main())
