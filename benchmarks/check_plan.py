"""Check `toolkit plan` against reality: run the real recipes for a few steps, read each rank's peak memory,
print prediction vs measurement, and write the table into docs/training_strategies.md.

    python benchmarks/check_plan.py                    # all configurations (~15 min on 2 cores)
    python benchmarks/check_plan.py --only nano-1p,124m-ddp
    python benchmarks/check_plan.py --quick --doc ''   # tiny smoke version (the test suite runs this)

How memory is measured (CPU). Each rank runs the recipe unchanged (runpy) inside this file's `--child` mode,
which adds one TrainerCallback through a wrapped `Trainer.__init__`. The callback resets the kernel's peak-RSS
counter (`echo 5 > /proc/self/clear_refs`) at the start of every optimizer step from the second on and reads
`VmHWM` from /proc/self/status at its end, so the figure is the steady-state training step (optimizer state
allocated), not model loading or the final export. Runs use glibc's MALLOC_MMAP_THRESHOLD_=131072 so that freed
tensors go back to the kernel at once: peak RSS is then live tensors + runtime, the CPU analogue of
torch.cuda.max_memory_allocated. Without it glibc keeps freed blocks and RSS creeps upward over the first steps,
and pretrain.py on CPU tells glibc to keep all of them (toolkit/cpu_allocator.py; it leaves a MALLOC_* setting
alone) (`--default_malloc` measures that way; training_strategies.md notes how much more it was). On a GPU the child also records
torch.cuda.max_memory_allocated per rank.

Why hand-written: no library measures the peak memory of one training phase of each rank of a torchrun launch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "training_strategies.md"
SHARED = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
GPT2_TOKENIZER = SHARED / "gpt2-tokenizer"
BEGIN, END = "<!-- check_plan:begin -->", "<!-- check_plan:end -->"
MiB = 1024**2


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

    record: dict = {"rank": int(os.environ.get("RANK", 0)), "step_peaks": [], "cuda_peaks": []}

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
                record["config"] = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}

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
    gpt2_tok = ["--tokenizer_name", str(GPT2_TOKENIZER), "--train_file", str(SHAKESPEARE)] if GPT2_TOKENIZER.exists() else []
    nano = ["--preset", "gpt2-nano"]
    mini = ["--preset", "gpt2-mini"]
    base = ["--preset", "gpt2"] + gpt2_tok
    if quick:
        return {"quick-1p": dict(task="pretrain", procs=1, model=nano, batch=4, seq=64, steps=3)}
    # The nano-* runs calibrate toolkit.plan's constant runtime term (CPU_OVERHEAD: python, torch, HF libraries,
    # Trainer) per recipe kind and for a 2-rank launch: their tensors are a few MiB, so peak RSS there is the runtime.
    # Every other row is a held-out check of the formulas.
    configs = {
        "nano-1p": dict(task="pretrain", procs=1, model=nano, batch=8, seq=128, calibration=True),
        "nano-ddp": dict(task="pretrain", procs=2, launch="ddp", model=nano, batch=8, seq=128, calibration=True),
        "mini-1p": dict(task="pretrain", procs=1, model=mini, batch=16, seq=256),
        "mini-eager-1p": dict(task="pretrain", procs=1, model=mini, batch=16, seq=256, attn="eager"),
        "124m-1p": dict(task="pretrain", procs=1, model=base, batch=4, seq=256),
        "124m-ckpt-1p": dict(task="pretrain", procs=1, model=base, batch=8, seq=256, ckpt=True),
        "124m-ddp": dict(task="pretrain", procs=2, launch="ddp", model=base, batch=2, seq=256),
        "124m-fsdp": dict(task="pretrain", procs=2, launch="fsdp", model=base, batch=2, seq=256),
        "124m-full-ft-1p": dict(task="full", procs=1, model=None, batch=4, seq=256),
    }
    for name in ("lora", "qlora"):
        configs[f"nano-{name}-1p"] = dict(task=name, procs=1, model=None, base="gpt2-nano", batch=8, seq=128, calibration=True)
        configs[f"124m-{name}-1p"] = dict(task=name, procs=1, model=None, batch=4, seq=256)
    return configs


def recipe_command(name: str, c: dict, work: Path, base_model: Path | None) -> tuple[list[str], Path]:
    out = work / name
    recipe = "recipes/pretrain.py" if c["task"] in ("pretrain", "full") else f"recipes/{c['task']}.py"
    steps = c.get("steps", 4)
    if c["task"] in ("pretrain", "full"):
        model = c["model"] if c["task"] == "pretrain" else ["--model_name_or_path", str(base_model)]
        args = [*model, "--per_device_train_batch_size", str(c["batch"]), "--block_size", str(c["seq"]),
                "--max_steps", str(steps), "--warmup_steps", "1", "--logging_steps", "1", "--eval_strategy", "no",
                "--save_strategy", "no", "--report_to", "none", "--output_dir", str(out), "--overwrite_output_dir", "true",
                "--sample_max_new_tokens", "1"]
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
            "--max_eval_samples", "8", "--sample_max_new_tokens", "1"]
    if SHAKESPEARE.exists():
        args += ["--train_file", str(SHAKESPEARE)]
    return args + c.get("extra", [])


def make_base_model(path: Path, shape: str = "gpt2") -> Path:
    """A randomly initialised GPT-2 of the given preset with the real GPT-2 tokenizer (or a BPE), saved like a Hub model."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from toolkit.presets import PRESETS

    if GPT2_TOKENIZER.exists():
        tok = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    else:
        import pydoc_data.topics as topics

        from toolkit.tokenizer import train_bpe_tokenizer

        tok = train_bpe_tokenizer([topics.topics[k] for k in sorted(topics.topics)], 4096)
    torch.manual_seed(0)
    config = GPT2Config(**PRESETS[shape], vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def measure(name: str, c: dict, work: Path, base_model: Path | None, default_malloc: bool) -> dict:
    cmd, out = recipe_command(name, c, work, base_model)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("_peak.rank*.json"):
        old.unlink()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
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
    return f"{os.cpu_count()}-core {cpu} CPU, torch {torch.__version__.split('+')[0]} CPU"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        child(argv[1], argv[2], argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated configuration names")
    p.add_argument("--quick", action="store_true", help="one tiny configuration (smoke test)")
    p.add_argument("--doc", default=str(DOC), help="markdown file to write the table into ('' = don't)")
    p.add_argument("--work_dir", default=None, help="where run outputs go (default: a temporary folder)")
    p.add_argument("--default_malloc", action="store_true", help="measure with the recipes' own allocator settings (pretrain.py keeps freed memory on CPU)")
    p.add_argument("--json", default=None, help="also write the measurements and predictions to this JSON file")
    p.add_argument("--replan", default=None, metavar="JSON",
                   help="no runs: recompute the predictions for the measurements saved by --json (after a formula change)")
    args = p.parse_args(argv)

    if args.replan:
        saved = json.loads(Path(args.replan).read_text())
        meta, rows = saved["meta"], saved["rows"]
        meta["replanned"] = datetime.date.today().isoformat()
    else:
        meta, rows = run_all(args)
        if meta is None:
            return 2
    for row in rows:
        replan(row, meta)
        print(f"{row['name']:<18} predicted {row['predicted'] / MiB:7.0f} MiB  measured "
              f"{', '.join(f'{x / MiB:.0f}' for x in row['measured'])} MiB  ratio "
              f"{', '.join(f'{r:.3f}' for r in row['ratio'])}  ({row['peak_moment']})", flush=True)
    checks = [row for row in rows if not row["calibration"]] or rows
    worst = max(abs(r - 1) for row in checks for r in row["ratio"])
    print(f"worst |prediction/measured - 1| over the checks (not the calibration runs) = {worst:.1%} (target <= 15%)")
    for row in rows:
        if row["calibration"]:
            print(f"calibration {row['name']}: runtime term implied = measured - predicted tensors = "
                  f"{(max(row['measured']) - row['predicted'] + row['overhead']) / MiB:.0f} MiB per process")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.doc:
        write_doc(Path(args.doc), rows, meta)
    return 0 if worst <= 0.15 else 1


def run_all(args) -> tuple[dict | None, list[dict]]:
    """Run every selected configuration; rows hold what was measured and what is needed to predict it."""
    import psutil

    from toolkit.flops import measure_cpu_peak_flops

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="check_plan_"))
    configs = configurations(work, args.quick)
    if args.only:
        unknown = set(args.only.split(",")) - set(configs)
        if unknown:
            print(f"error: unknown configuration(s) {', '.join(sorted(unknown))}; choose from {', '.join(configs)}", file=sys.stderr)
            return None, []
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    cmd = "python benchmarks/check_plan.py" + (f" --only {args.only}" if args.only else "") + \
        (" --default_malloc" if args.default_malloc else "")
    meta = {"date": datetime.date.today().isoformat(), "machine": machine(), "ram": float(psutil.virtual_memory().total),
            "peak_flops": measure_cpu_peak_flops(), "default_malloc": args.default_malloc, "command": cmd}
    rows = []
    for name, c in configs.items():
        base_model = None
        if c["model"] is None:  # fine-tuning: a saved random-init base of the preset, like a Hub checkpoint
            preset = c.get("base", "gpt2")
            base_model = make_base_model(work / f"base-{preset}", preset)
        m = measure(name, c, work, base_model, args.default_malloc)
        rows.append({"name": name, "calibration": bool(c.get("calibration")), "task": c["task"], "procs": c["procs"],
                     "launch": c.get("launch") or "single", "batch": c["batch"], "seq": c["seq"], "ckpt": bool(c.get("ckpt")),
                     "attn": c.get("attn", "sdpa"), "config": m["config"], "measured": m["peaks"],
                     "cuda_measured": m["cuda_peaks"], "tokens_per_s": m["tokens_per_s"], "wall_s": m["wall_s"],
                     "command": shlex.join(["python" if a == sys.executable else os.path.relpath(a, REPO)
                                            if a.startswith(str(REPO)) else a for a in m["cmd"]])})
        print(f"{name}: measured {', '.join(f'{x / MiB:.0f}' for x in m['peaks'])} MiB ({m['wall_s']:.0f} s)", flush=True)
    meta["loadavg"] = os.getloadavg()[0]
    return meta, rows


def replan(row: dict, meta: dict) -> None:
    """toolkit.plan's prediction (and throughput estimate) for one measured row, with the current formulas."""
    from toolkit import plan
    from toolkit.flops import flops_per_token

    shape = plan.shape_from_config(row["config"], "recorded config")
    s = plan.Setup(task=row["task"], device="cpu", num_devices=row["procs"], device_memory=meta["ram"],
                   batch_size=row["batch"], seq_len=row["seq"], precision="fp32", gradient_checkpointing=row["ckpt"],
                   attn=row["attn"])
    est = plan.estimate(shape, s, {"single": "single", "ddp": "ddp", "fsdp": "fsdp"}[row["launch"]])
    fpt = flops_per_token(shape.n_layer, shape.n_embd, shape.vocab_size, row["seq"])
    tps = meta["peak_flops"] * plan.ASSUMED_MFU["cpu"] / fpt
    tps *= (6 / 4 if row["task"] in ("lora", "qlora") else 1) * (6 / 8 if row["ckpt"] else 1)
    row.update(n_params=shape.n_params, predicted=est.total, overhead=est.components["overhead"], peak_moment=est.peak_moment,
               ratio=[est.total / x for x in row["measured"]], est_tokens_per_s=tps)


def write_doc(path: Path, rows: list[dict], meta: dict) -> None:
    replanned = f" Predictions recomputed {meta['replanned']} with the current toolkit/plan.py (`--replan`)." if meta.get("replanned") else ""
    malloc_label = "the recipes' own allocator settings" if meta["default_malloc"] else "MALLOC_MMAP_THRESHOLD_=131072"
    lines = [BEGIN, "",
             f"Measured {meta['date']} on a {meta['machine']}; fp32; peak RSS per rank over training steps 2-4 "
             f"({malloc_label}). "
             f"Generated by `{meta['command']}`.{replanned} CPU fp32 matmul peak measured at the start: "
             f"{meta['peak_flops'] / 1e9:.0f} GFLOP/s; load average at the end {meta['loadavg']:.1f} on {os.cpu_count()} cores "
             f"(other jobs share the machine: tokens/s are what these runs got; memory is unaffected).", "",
             "| configuration | task | launch | params | micro-batch x seq | predicted (MiB) | measured per rank (MiB) | predicted / measured | tensors only: predicted / measured | tokens/s measured | tokens/s estimate |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tensor_ratios = [(r["predicted"] - r["overhead"]) / (x - r["overhead"]) for x in r["measured"]]
        lines.append(f"| {r['name']}{' (calibration)' if r.get('calibration') else ''} | {r['task']} | {r['launch']} x{r['procs']} | {r['n_params'] / 1e6:.1f}M | "
                     f"{r['batch']} x {r['seq']} | {r['predicted'] / MiB:.0f} | {' / '.join(f'{x / MiB:.0f}' for x in r['measured'])} | "
                     f"{' / '.join(f'{x:.3f}' for x in r['ratio'])} | "
                     f"{' / '.join(f'{x:.3f}' for x in tensor_ratios)} | "
                     f"{r['tokens_per_s'] or float('nan'):.0f} | {r['est_tokens_per_s']:.0f} |")
    lines += ["", "'tensors only' leaves out the runtime term (`CPU_OVERHEAD`, calibrated on the nano rows) on both sides. "
              "tokens/s: training steps 2-4 of each run; the estimate is the measured matmul peak x the assumed MFU / "
              "FLOPs per token (toolkit.plan.throughput), for the whole machine.",
              "", "Exact commands (each wrapped by `benchmarks/check_plan.py --child` to read the peak):", ""]
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
