"""The main job against nanoGPT: `python recipes/pretrain.py` and nanoGPT's CPU "baby" Shakespeare run, on the same
machine, one after the other (A B A B with --repeats), on the same 90/10 character split of Tiny Shakespeare; both
models scored on the whole validation text in bits per byte; wall time from process start to exit.

    git clone https://github.com/karpathy/nanoGPT ../nanoGPT
    python benchmarks/vs_nanogpt.py --nanogpt ../nanoGPT                  # one round, writes docs/benchmarks.md
    python benchmarks/vs_nanogpt.py --nanogpt ../nanoGPT --repeats 3      # A B A B A B, medians
    python benchmarks/vs_nanogpt.py --nanogpt ../nanoGPT --quick --doc '' # smoke version: a few steps each

What runs (nanoGPT's checkout is used as it is; its README's commands, nothing patched):
  1. nanoGPT's data prep, `python data/shakespeare_char/prepare.py` (first 90% of the characters train, last 10%
     validate), after copying ../shared/data/tinyshakespeare/input.txt beside it (prepare.py would download it).
     Timed, but not counted in nanoGPT's wall time (a one-off step; ours prepares its data inside the run).
  2. nanoGPT, its README's CPU command: `python train.py config/train_shakespeare_char.py --device=cpu
     --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
     --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`, in the checkout.
  3. Ours, the default job on the same split written as train.txt / val.txt: `python recipes/pretrain.py
     --train_file train.txt --validation_file val.txt --output_dir ...` (every other setting the default). Its packed
     data cache (~/.cache/gpt2-toolkit/packed/<key>) is removed after each run, so every run is a first run;
     a run that found it already there is marked "warm".

Scoring, each on the whole validation text, bits per byte = total nats / (ln 2 x UTF-8 bytes of the scored text):
  - nanoGPT: its saved out-shakespeare-char/ckpt.pt (the best-validation checkpoint, as its sample.py loads it)
    with its own model.py, in this process, non-overlapping windows of its block size (64 characters) over the
    whole val.bin; every character but the first is scored, with 0-63 characters of context (mean 31.5).
  - ours: `toolkit eval OUTPUT_DIR --text_file val.txt --block_size B --json` with B the training block size (128
    BPE tokens, ~370 characters): non-overlapping windows, every token but each window's first is scored, with
    0-126 tokens of context. The two scorers see different context lengths; each is its model's own window.

Where our wall time goes: with benchmarks/phase_trace/ first on PYTHONPATH (default; --no_trace turns it off),
Python loads its sitecustomize.py, which prints a `[phase] NAME start|end` line when the toolkit's data, tokenizer,
Trainer, evaluation, checkpoint, export and sampling functions are entered and left; the recipe itself is
unchanged. The line arrival times give the breakdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness

PHASE_TRACE = Path(__file__).resolve().parent / "phase_trace"
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
                 "data/shakespeare_char/prepare.py")
NANOGPT_BABY = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_QUICK = ["--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10", "--eval_iters=2"]  # later keys win
OURS_QUICK = ["--max_steps", "20", "--eval_steps", "10", "--save_steps", "10", "--logging_steps", "5",
              "--sample_max_new_tokens", "8"]
SECTION = ("vs_nanogpt", "9. The main job against nanoGPT (Tiny Shakespeare, CPU)")


# ---------------------------------------------------------------------------------------------------------
# Data
def char_split(text: str) -> tuple[str, str]:
    """nanoGPT's shakespeare_char rule (data/shakespeare_char/prepare.py): the first int(n * 0.9) characters train,
    the rest validate; characters, not bytes."""
    n = len(text)
    return text[: int(n * 0.9)], text[int(n * 0.9):]


# ---------------------------------------------------------------------------------------------------------
# Scoring nanoGPT's model
def windowed_nll(model, ids, block_size: int, batch_size: int = 64) -> tuple[float, int]:
    """(total nats, targets scored) of a nanoGPT-style model (`model(x, y) -> (logits, mean loss)`) over `ids` in
    non-overlapping windows: inputs ids[i:i+B], targets ids[i+1:i+1+B] for i = 0, B, 2B, ...; the last window is
    shorter, so every id but the first is a target exactly once."""
    import numpy as np
    import torch

    ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    n_targets = len(ids) - 1
    full = n_targets // block_size
    total = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, full, batch_size):
            rows = range(start, min(full, start + batch_size))
            x = torch.stack([ids[r * block_size:(r + 1) * block_size] for r in rows])
            y = torch.stack([ids[r * block_size + 1:(r + 1) * block_size + 1] for r in rows])
            _, loss = model(x, y)
            total += loss.item() * y.numel()
        tail = n_targets - full * block_size
        if tail:
            x, y = ids[full * block_size:-1][None], ids[full * block_size + 1:][None]
            _, loss = model(x, y)
            total += loss.item() * tail
    return total, n_targets


def char_bits_per_byte(model, ids, itos: dict, block_size: int) -> dict:
    """Bits per byte of a character-level model over `ids`: total nats / (ln 2 x UTF-8 bytes of the scored
    characters)."""
    nats, scored = windowed_nll(model, ids, block_size)
    n_bytes = sum(len(itos[int(i)].encode("utf-8")) for i in ids[1:])
    return {"loss": nats / scored, "tokens": scored, "bytes": n_bytes, "bits_per_byte": nats / (math.log(2) * n_bytes),
            "window": block_size}


def score_nanogpt(checkout: Path) -> dict:
    """Load out-shakespeare-char/ckpt.pt with the checkout's model.py and score the whole val.bin."""
    import importlib.util
    import pickle

    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    # nanoGPT's checkpoint: tensors, the optimizer state and config dicts of numbers and strings
    ckpt = torch.load(checkout / "out-shakespeare-char" / "ckpt.pt", map_location="cpu", weights_only=True)
    model = nanogpt.GPT(nanogpt.GPTConfig(**ckpt["model_args"]))
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    data = checkout / "data" / "shakespeare_char"
    with open(data / "meta.pkl", "rb") as f:
        itos = pickle.load(f)["itos"]
    ids = np.fromfile(data / "val.bin", dtype=np.uint16)
    result = char_bits_per_byte(model, ids, itos, ckpt["model_args"]["block_size"])
    result["checkpoint_iter"] = int(ckpt["iter_num"])
    return result


def score_ours(output_dir: Path, val_file: Path, block_size: int) -> dict:
    """`toolkit eval OUTPUT_DIR --text_file val.txt --block_size B --json` in a subprocess; its report's text
    scores."""
    cmd = [sys.executable, "-m", "toolkit", "eval", str(output_dir), "--text_file", str(val_file), "--block_size",
           str(block_size), "--json", "--no_progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=harness.REPO, env=harness.env_for_runs(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"toolkit eval failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    text = json.loads(proc.stdout)["text"]
    return {"loss": text["loss"], "tokens": text["tokens"], "bytes": text["bytes"],
            "bits_per_byte": text["bits_per_byte"], "window": text["block_size"],
            "eval_s": time.perf_counter() - start, "cmd": cmd}


# ---------------------------------------------------------------------------------------------------------
# Timelines from the runs' output lines
def _first(lines, pattern: str) -> float | None:
    rx = re.compile(pattern)
    return next((t for t, line in lines if rx.search(line)), None)


def _last(lines, pattern: str) -> float | None:
    rx = re.compile(pattern)
    return next((t for t, line in reversed(lines) if rx.search(line)), None)


NANOGPT_ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")


def nanogpt_timeline(run: harness.Run, eval_interval: int = 250) -> dict:
    """nanoGPT's phases from its prints: start-up = until its first eval at step 0 is done (the first training step
    starts right after); loop = first eval start (model and optimizer ready) to the last `iter` line; evals and
    checkpoint saves = the extra time of the steps that follow an eval (its per-step `time` includes them)."""
    ready = _first(run.lines, r"^using fused AdamW")
    first_eval_done = _first(run.lines, r"^step 0: train loss")
    iters = [(t, *m.groups()) for t, line in run.lines if (m := NANOGPT_ITER.match(line.strip()))]
    if ready is None or first_eval_done is None or not iters:
        raise RuntimeError("nanoGPT's output lacks its set-up, eval or iter lines; see the log (--echo)")
    step_ms = [float(ms) for _, it, _, ms in iters]
    plain = [float(ms) for _, it, _, ms in iters if int(it) % eval_interval and int(it) > 5]  # steps without an eval
    typical = harness.median(plain) if plain else harness.median(step_ms)
    after_eval = [float(ms) - typical for _, it, _, ms in iters if int(it) % eval_interval == 0 and int(it) > 0]
    return {"startup_s": first_eval_done, "first_step_done_s": iters[0][0], "loop_s": iters[-1][0] - ready,
            "evals_and_saves_s": max(0.0, sum(after_eval)) / 1000, "steps": len(iters),
            "step_ms_median": typical,
            "saves": sum(1 for _, line in run.lines if line.startswith("saving checkpoint")),
            "final_loss": float(iters[-1][2]), "after_loop_s": run.wall_s - iters[-1][0]}


PHASE_LINE = re.compile(r"\[phase\] (\S+) (start|end)$")


def phase_events(run: harness.Run) -> list[tuple[float, str, str]]:
    return [(t, m[1], m[2]) for t, line in run.lines if (m := PHASE_LINE.search(line.strip()))]


def _spans(events, name: str) -> list[tuple[float, float]]:
    """(start, end) of each call of `name`; end None for a call still running when the output stopped."""
    spans: list[list] = []
    for t, n, what in events:
        if n == name and what == "start":
            spans.append([t, None])
        elif n == name and what == "end" and spans and spans[-1][1] is None:
            spans[-1][1] = t
    return [tuple(s) for s in spans]


def ours_timeline(run: harness.Run) -> dict:
    """Our recipe's phases, from the [phase] marker lines (benchmarks/phase_trace) and the Trainer's own log lines.

    The phases are the intervals between consecutive markers in the recipe's order, so they add up to the wall time;
    the evaluations, checkpoint saves and loss plot that run inside the training loop are taken out of the
    training-steps interval and listed on their own. A marker that never came (a killed run) leaves its two
    neighbouring phases unknown (None)."""
    ev = phase_events(run)
    logs = harness.trainer_logs(run)
    out: dict = {"train_runtime_s": next((d["train_runtime"] for _, d in logs if "train_runtime" in d), None),
                 "wall_s": run.wall_s}
    # without markers: the Trainer's progress bar shows 0/N when the loop starts and 1/N after the first step
    out["first_step_start_s"] = _first(run.lines, r"\b0/\d+ \[")
    out["first_step_done_s"] = _first(run.lines, r"\b1/\d+ \[")
    if not ev:
        return out
    s = {name: _spans(ev, name) for name in {n for _, n, _ in ev}}

    def at(name, which=0, call=0):  # start (0) or end (1) of a call (-1: the last one)
        calls = s.get(name) or []
        return calls[call][which] if calls else None

    def total(name, within=(0.0, math.inf)):
        return sum(e - b for b, e in s.get(name, []) if e is not None and within[0] <= b < within[1])

    train_start, train_end = at("PretrainTrainer.train"), at("PretrainTrainer.train", 1)
    evals = s.get("PretrainTrainer.evaluate", [])
    final_evals = [(b, e) for b, e in evals if train_end is not None and b >= train_end]
    boundaries = [
        ("imports and argument parsing", 0.0),
        ("heavy imports (torch, transformers models, Trainer)", at("parse", 1)),
        ("data: read text, train the BPE, tokenize and pack", at("training_corpus") or at("train_bpe_tokenizer")),
        ("model init, FLOP peak probe, Trainer set-up", at("cached_store", 1)),
        ("Trainer.train() until the first step", train_start),
        ("first training step", at("PretrainTrainer.training_step")),
        ("training steps (2nd to last)", at("PretrainTrainer.training_step", 1)),
        ("final evaluation", train_end),
        ("save state and export the model", final_evals[-1][1] if final_evals else None),
        ("loss-curve plot", at("plot_loss_curve", 0, -1) if final_evals else None),
        ("closing sample (load the saved model, generate)", at("load_for_inference")),
        ("model card and closing prints", at("continuation", 1, -1)),
        ("process exit after the last line (interpreter shut-down)", run.lines[-1][0] if run.lines else None),
        (None, run.wall_s),
    ]
    phases = {}
    for (name, begin), (_, end) in zip(boundaries, boundaries[1:]):
        phases[name] = end - begin if begin is not None and end is not None else None
    inner = (train_start, train_end if train_end is not None else math.inf) if train_start is not None else (0.0, -1.0)
    in_loop = {"evaluations during training": total("PretrainTrainer.evaluate", inner),
               "checkpoint saves": total("PretrainTrainer._save_checkpoint", inner),
               "loss-curve plot at the end of training (callback)": total("plot_loss_curve", inner)}
    if phases["training steps (2nd to last)"] is not None:
        phases["training steps (2nd to last)"] -= sum(in_loop.values())
    out["phases"] = {**phases, **in_loop}
    out["first_step_start_s"] = at("PretrainTrainer.training_step")
    out["first_step_done_s"] = at("PretrainTrainer.training_step", 1)
    out["details"] = {"peak_flops_probe_s": total("peak_flops"), "bpe_training_s": total("train_bpe_tokenizer"),
                      "read_documents_s": total("training_corpus"), "tokenize_and_pack_s": total("cached_store"),
                      "trainer_init_s": total("PretrainTrainer.__init__"), "evaluations": len(evals),
                      "checkpoint_saves": len(s.get("PretrainTrainer._save_checkpoint", [])),
                      "export_s": total("export_full_model"), "model_card_s": total("write_pretrain_card"),
                      "sample_generation_s": total("continuation")}
    return out


# ---------------------------------------------------------------------------------------------------------
# Runs
def check_checkout(checkout: Path) -> None:
    missing = [f for f in NANOGPT_FILES if not (checkout / f).is_file()]
    if missing:
        sys.exit(f"error: {checkout} is not a nanoGPT checkout (missing {', '.join(missing)}); "
                 "git clone https://github.com/karpathy/nanoGPT and pass its folder as --nanogpt")


def prepare_nanogpt_data(checkout: Path, text_file: Path) -> dict:
    """Copy the text beside nanoGPT's prepare.py (it downloads it otherwise) and run prepare.py."""
    data = checkout / "data" / "shakespeare_char"
    target = data / "input.txt"
    if target.exists() and target.read_bytes() != text_file.read_bytes():
        sys.exit(f"error: {target} differs from {text_file}; remove it so both runs use the same text")
    if not target.exists():
        shutil.copyfile(text_file, target)
    cmd = [sys.executable, "data/shakespeare_char/prepare.py"]
    r = harness.run(cmd, cwd=checkout, sample_memory=False).check()
    return {"cmd": cmd, "wall_s": r.wall_s}


def run_nanogpt(checkout: Path, quick: bool, echo: bool) -> dict:
    ckpt = checkout / "out-shakespeare-char" / "ckpt.pt"
    ckpt.unlink(missing_ok=True)  # never score a checkpoint an earlier run left
    cmd = [sys.executable, "train.py", *NANOGPT_BABY, *(NANOGPT_QUICK if quick else [])]
    r = harness.run(cmd, cwd=checkout, echo=echo).check()
    timeline = nanogpt_timeline(r, eval_interval=10 if quick else 250)
    score = score_nanogpt(checkout)
    return {"who": "nanoGPT", "cmd": cmd, "shown": "python " + " ".join(cmd[1:]) + "   (in the nanoGPT checkout)",
            "wall_s": r.wall_s, "peak_rss_mb": max((v for _, v in r.peak_rss.values()), default=0) / 2**20,
            "train_s": timeline["loop_s"], "startup_s": timeline["startup_s"], "timeline": timeline, "score": score}


def recipe_env(trace: bool) -> dict:
    """The environment of a user's run (offline, unbuffered output for the timestamps), plus the phase markers.
    Unlike the other benchmarks, tokenizers keep their threads (TOKENIZERS_PARALLELISM unset), as for a user."""
    env = harness.env_for_runs()
    env.pop("TOKENIZERS_PARALLELISM", None)
    if trace:
        env["PYTHONPATH"] = os.pathsep.join([str(PHASE_TRACE), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_ours(workdir: Path, tag: str, quick: bool, echo: bool, trace: bool) -> dict:
    out = workdir / f"ours-{tag}"
    train, val = workdir / "train.txt", workdir / "val.txt"
    cmd = [sys.executable, str(harness.PRETRAIN), "--train_file", str(train), "--validation_file", str(val),
           "--output_dir", str(out), *(OURS_QUICK if quick else [])]
    env = recipe_env(trace)
    env["HF_DATASETS_CACHE"] = str(workdir / f"datasets-cache-{tag}")  # datasets' cache of the text: cold each run
    started = time.time()
    r = harness.run(cmd, env=env, echo=echo).check()
    cache_state = _drop_packed_cache(r, started)  # so the next run starts cold too
    block = next((int(m[1]) for _, line in r.lines if (m := re.search(r"^Data: .* blocks of (\d+) tokens", line))),
                 None)
    timeline = ours_timeline(r)
    score = score_ours(out, val, block or 128)
    score["shown"] = harness.shown(score.pop("cmd"), workdir).replace("python -m toolkit", "toolkit")
    peak = max((v for c, v in r.peak_rss.values() if "pretrain.py" in c), default=0) / 2**20
    return {"who": "ours", "cmd": cmd, "shown": harness.shown(cmd, workdir), "wall_s": r.wall_s, "peak_rss_mb": peak,
            "train_s": timeline.get("train_runtime_s"), "startup_s": timeline.get("first_step_start_s"),
            "data_cache": cache_state, "timeline": timeline, "score": score,
            "recipe_eval_bpb": next((d.get("eval_bits_per_byte") for _, d in reversed(harness.trainer_logs(r))
                                     if "eval_bits_per_byte" in d), None)}


# ---------------------------------------------------------------------------------------------------------
# Start-up: --help, and the default job (`python recipes/pretrain.py`) until its first training step
STARTUP_PHASES = ["imports and argument parsing", "heavy imports (torch, transformers models, Trainer)",
                  "data: read text, train the BPE, tokenize and pack", "model init, FLOP peak probe, Trainer set-up",
                  "Trainer.train() until the first step", "first training step"]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_until(cmd: list[str], marker: str, env: dict, timeout: float = 600) -> harness.Run:
    """Run `cmd`, timestamping its output lines like harness.run, and kill it once a line contains `marker`."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=harness.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines, seen = [], False
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            if marker in line:
                seen = True
                proc.kill()
                break
        proc.wait()
    finally:
        timer.cancel()
    run = harness.Run(cmd, 0 if seen else proc.returncode, time.perf_counter() - start, lines)
    if not seen:
        raise RuntimeError(f"no line with {marker!r} before exit {proc.returncode}: {harness.shown(cmd)}\n"
                           + "\n".join(line for _, line in lines[-30:]))
    return run


def import_profile(cmd: list[str], top: int = 8) -> dict:
    """`python -X importtime` of a command: seconds of import per top-level package (self time), the largest first,
    and the cumulative time of the first few top-level imports."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *cmd[1:]], cwd=harness.REPO, env=harness.env_for_runs(),
                          capture_output=True, text=True)
    per_package: dict[str, float] = {}
    cumulative = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if not m:
            continue
        name = m[4]
        per_package[name.split(".")[0]] = per_package.get(name.split(".")[0], 0.0) + int(m[1]) / 1e6
        if name in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate"):
            cumulative.setdefault(name, int(m[2]) / 1e6)  # the first import of it: its whole subtree
    ranked = sorted(per_package.items(), key=lambda kv: -kv[1])
    return {"total_s": sum(per_package.values()), "self_s_by_package": dict(ranked[:top]),
            "first_import_cumulative_s": cumulative}


def measure_startup(repeats: int, workdir: Path, echo: bool) -> dict:
    """--help wall and CPU seconds, and the default job's start-up to its first training step (killed there), each
    `repeats` times, alternating; plus one -X importtime profile of --help."""
    help_cmd = [sys.executable, str(harness.PRETRAIN), "--help"]
    helps, jobs = [], []
    for i in range(repeats):
        cpu = children_cpu_s()
        r = harness.run(help_cmd, sample_memory=False).check()
        helps.append({"wall_s": r.wall_s, "cpu_s": children_cpu_s() - cpu})
        cmd = [sys.executable, str(harness.PRETRAIN), "--output_dir", str(workdir / f"default-{i}")]
        env = recipe_env(trace=True)
        cpu = children_cpu_s()
        r = run_until(cmd, "[phase] PretrainTrainer.training_step end", env)
        job_cpu = children_cpu_s() - cpu
        if echo:
            print("\n".join(f"    | {t:6.2f} {line}" for t, line in r.lines))
        _drop_packed_cache(r)
        t = ours_timeline(r)
        jobs.append({"first_step_start_s": t["first_step_start_s"], "first_step_done_s": t["first_step_done_s"],
                     "cpu_s": job_cpu, "phases": {k: t.get("phases", {}).get(k) for k in STARTUP_PHASES},
                     "details": t.get("details", {})})
        print(f"    --help {helps[-1]['wall_s']:.1f} s; the default job's first step starts at "
              f"{_fmt(jobs[-1]['first_step_start_s'])} s", flush=True)
    return {"help_cmd": help_cmd, "job_cmd": cmd, "help": helps, "job": jobs, "imports": import_profile(help_cmd),
            "workdir": str(workdir)}


def _drop_packed_cache(run: harness.Run, started: float | None = None) -> str:
    """Remove the packed-data cache folder the run named in its `Data:` line; "warm" if it predates `started`."""
    m = next((re.search(r"\(cache: (.+)\)$", line) for _, line in run.lines if line.startswith("Data: ")), None)
    cache = Path(m[1]) if m else None
    warm = bool(started and cache and cache.exists() and cache.stat().st_mtime < started)
    if cache and cache.exists() and cache.parent.name == "packed":
        shutil.rmtree(cache)
    return "warm" if warm else "cold"


def startup_report(st: dict) -> str:
    med = harness.median
    helps, jobs = st["help"], st["job"]
    rows = [["`python recipes/pretrain.py --help`", _fmt(med([h["wall_s"] for h in helps]), 2),
             _fmt(med([h["cpu_s"] for h in helps]), 2), "< 2 s"],
            ["default job: process start to the first training step",
             _fmt(med([j["first_step_start_s"] for j in jobs]), 2), "", "< 10 s"],
            ["default job: first training step done", _fmt(med([j["first_step_done_s"] for j in jobs]), 2),
             _fmt(med([j["cpu_s"] for j in jobs]), 2), ""]]
    for name in STARTUP_PHASES:
        vals = [j["phases"][name] for j in jobs if j["phases"].get(name) is not None]
        rows.append([f"&nbsp;&nbsp;{name}", _fmt(med(vals), 2) if vals else "n/a", "", ""])
    d = jobs[0]["details"]
    imp = st["imports"]
    top = ", ".join(f"{k} {v:.2f}" for k, v in imp["self_s_by_package"].items())
    cum = ", ".join(f"{k} {v:.2f}" for k, v in imp["first_import_cumulative_s"].items())
    return (f"Start-up ({len(helps)} runs each, alternating, medians; the default job killed after its first step; "
            "CPU = user + system seconds of the process):\n\n"
            + harness.table(["measure", "wall s", "CPU s", "target"], rows)
            + "\n\nInside the default job's start-up (first run): CPU FLOP-peak probe "
              f"{d.get('peak_flops_probe_s', 0):.2f} s, BPE training {d.get('bpe_training_s', 0):.2f} s, tokenize and "
              f"pack {d.get('tokenize_and_pack_s', 0):.2f} s. `python -X importtime recipes/pretrain.py --help`: "
              f"{imp['total_s']:.2f} s of imports; by package (self time, s): {top}; whole subtree at first import "
              f"(s): {cum}. Default job: `{harness.shown(st['job_cmd'], st['workdir'])}`.")


# ---------------------------------------------------------------------------------------------------------
# Report
def _fmt(x, digits=1):
    return "n/a" if x is None else f"{x:,.{digits}f}"


def report(results: list[dict], prep: dict, quick: bool, startup: dict | None = None) -> str:
    """The markdown body of the section: per-run table, medians and ratio, our wall-time breakdown, start-up,
    scoring and commands."""
    rows = []
    for r in results:
        unit = "chars" if r["who"] == "nanoGPT" else "tokens"
        rows.append([r["who"], r["round"], _fmt(r["wall_s"]), _fmt(r["startup_s"]), _fmt(r["train_s"]),
                     f"{r['score']['bits_per_byte']:.4f}", f"{r['score']['window']} {unit}",
                     _fmt(r["peak_rss_mb"], 0), r.get("data_cache", "")])
    table = harness.table(["run", "round", "wall s (start to exit)", "start-up to first step s", "training loop s",
                           "val bits/byte (whole text)", "scoring window", "peak RSS MiB", "our data cache"], rows)
    who = ("nanoGPT", "ours")
    med = {w: {k: harness.median([r[k] for r in results if r["who"] == w and r[k] is not None])
               for k in ("wall_s", "startup_s", "train_s")} for w in who}
    bpb = {w: harness.median([r["score"]["bits_per_byte"] for r in results if r["who"] == w]) for w in who}
    ratio = med["ours"]["wall_s"] / med["nanoGPT"]["wall_s"]
    verdict = "met" if bpb["ours"] < bpb["nanoGPT"] and ratio <= 1.0 else "not met"
    summary = (f"Medians: ours **{bpb['ours']:.4f}** bits/byte in {med['ours']['wall_s']:.1f} s, nanoGPT "
               f"**{bpb['nanoGPT']:.4f}** bits/byte in {med['nanoGPT']['wall_s']:.1f} s: ours/nanoGPT wall time "
               f"**{ratio:.2f}x**, bits/byte {bpb['ours'] - bpb['nanoGPT']:+.4f}. Target (lower bits/byte at equal "
               f"or less wall time): **{verdict}**"
               + (" (smoke run: --quick, a few steps each; not a result)" if quick else "")
               + f". Start-up to the first training step: ours {_fmt(med['ours']['startup_s'])} s, nanoGPT "
               f"{_fmt(med['nanoGPT']['startup_s'])} s (after its step-0 evaluation). nanoGPT's data prep "
               f"(`python data/shakespeare_char/prepare.py`, run once) took {prep['wall_s']:.1f} s, not counted "
               "above.")
    ours = [r for r in results if r["who"] == "ours" and r["timeline"].get("phases")]
    breakdown = ""
    if ours:
        wall = harness.median([r["wall_s"] for r in ours])
        brows = []
        for name in ours[0]["timeline"]["phases"]:
            vals = [v for r in ours if (v := r["timeline"]["phases"].get(name)) is not None]
            m = harness.median(vals) if vals else None
            brows.append([name, _fmt(m, 2), "n/a" if m is None else f"{100 * m / wall:.0f}%"])
        d = ours[0]["timeline"]["details"]
        breakdown = ("\n\nWhere our wall time goes (median over rounds, from the `[phase]` markers of "
                     "benchmarks/phase_trace; phases in the recipe's order, the evaluations, checkpoint saves and "
                     "plot inside the training loop taken out of the training-steps interval):\n\n"
                     + harness.table(["phase", "seconds", "share of wall"], brows)
                     + f"\n\nInside those (first round): CPU FLOP-peak probe {d['peak_flops_probe_s']:.2f} s, BPE "
                       f"training {d['bpe_training_s']:.2f} s, reading the text files (datasets) "
                       f"{d['read_documents_s']:.2f} s, tokenize and pack {d['tokenize_and_pack_s']:.2f} s, Trainer "
                       f"construction {d['trainer_init_s']:.2f} s; {d['evaluations']} evaluations and "
                       f"{d['checkpoint_saves']} checkpoint saves in all; model export {d['export_s']:.2f} s; sample "
                       f"generation {d['sample_generation_s']:.2f} s; model card {d['model_card_s']:.2f} s.")
    n = next(r for r in results if r["who"] == "nanoGPT")
    o = next(r for r in results if r["who"] == "ours")
    ns, os_ = n["score"], o["score"]
    scoring = (f"\n\nScoring: nanoGPT's best-validation checkpoint (iteration {ns['checkpoint_iter']}) with its own "
               f"model.py over the whole val.bin in non-overlapping {ns['window']}-character windows "
               f"({ns['tokens']:,} characters scored, {ns['bytes']:,} bytes); ours with `{os_['shown']}` "
               f"({os_['tokens']:,} tokens scored, {os_['bytes']:,} bytes, windows of {os_['window']} tokens, "
               f"{os_['eval_s']:.0f} s). Different context lengths: nanoGPT's characters see 0-{ns['window'] - 1} "
               f"characters of context, our tokens 0-{os_['window'] - 2} tokens (~{os_['bytes'] / os_['tokens']:.1f} "
               "bytes each); each model is scored in its own training window. Our recipe's own final eval reports "
               f"{_fmt(o.get('recipe_eval_bpb'), 4)} bits/byte on its packed validation blocks.")
    commands = ("\n\nCommands, one after the other in each round (nanoGPT first):\n"
                "- nanoGPT data prep (once): `python data/shakespeare_char/prepare.py` in the checkout, after "
                "copying ../shared/data/tinyshakespeare/input.txt to data/shakespeare_char/input.txt\n"
                f"- nanoGPT: `{n['shown']}`\n"
                f"- ours: `{o['shown']}` ($TMP/train.txt and $TMP/val.txt: the same 90/10 character split of "
                "input.txt; the packed-data and datasets caches start empty in every run)\n\n"
                "Wall = process start to exit as seen by the parent (benchmarks/harness.py); training loop = nanoGPT: "
                "model ready to its last `iter` line, ours: the Trainer's train_runtime (both include their in-loop "
                "evaluations and checkpoint saves). Start-up = process start to the first training step's start "
                "(ours: the first `training_step` call; nanoGPT: after its step-0 evaluation).")
    start = "\n\n" + startup_report(startup) if startup and startup["job"] else ""
    return f"{table}\n\n{summary}{breakdown}{start}{scoring}{commands}"


def shown_command(argv: list[str] | None, checkout: Path) -> list[str]:
    """This script's command line for the docs, the checkout's folder relative to the repository."""
    argv = list(sys.argv[1:] if argv is None else argv)
    where = os.path.relpath(checkout, harness.REPO)
    for i, word in enumerate(argv):
        if word == "--nanogpt" and i + 1 < len(argv):
            argv[i + 1] = where
        elif word.startswith("--nanogpt="):
            argv[i] = f"--nanogpt={where}"
    return ["python", "benchmarks/vs_nanogpt.py", *argv]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(p)
    p.add_argument("--nanogpt", required=True, help="a checkout of https://github.com/karpathy/nanoGPT (git clone it)")
    p.add_argument("--text_file", default=str(harness.SHAKESPEARE), help="Tiny Shakespeare's input.txt")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (nanoGPT, ours), interleaved; medians reported")
    p.add_argument("--no_trace", action="store_true",
                   help="run ours without the [phase] markers (no wall-time breakdown)")
    p.add_argument("--startup_repeats", type=int, default=3,
                   help="runs of --help and of the default job until its first step (0: skip; --quick: 1)")
    args = p.parse_args(argv)
    checkout, text_file = Path(args.nanogpt).resolve(), Path(args.text_file)
    check_checkout(checkout)
    if not text_file.is_file():
        sys.exit(f"error: {text_file} not found; put ../shared/data beside the checkout or pass --text_file")
    if args.repeats < 1 or args.startup_repeats < 0:
        sys.exit("error: --repeats must be at least 1 and --startup_repeats at least 0")
    if args.quick:
        args.startup_repeats = min(args.startup_repeats, 1)
    load = harness.load_average()
    print(f"load average {load}; nanoGPT data prep ...", flush=True)
    prep = prepare_nanogpt_data(checkout, text_file)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-nanogpt-") as tmp:
        workdir = Path(tmp)
        startup = None
        if args.startup_repeats:
            print(f"start-up: --help and the default job to its first step, x{args.startup_repeats} ...", flush=True)
            startup = measure_startup(args.startup_repeats, workdir, args.echo)
            harness.save_json(args.json, {"load": load, "partial": True, "prep": prep, "startup": startup})
        train, val = char_split(text_file.read_text(encoding="utf-8"))
        (workdir / "train.txt").write_text(train, encoding="utf-8")
        (workdir / "val.txt").write_text(val, encoding="utf-8")
        for i in range(args.repeats):
            for who in ("nanoGPT", "ours"):
                print(f"[round {i + 1}/{args.repeats}] {who} ...", flush=True)
                r = (run_nanogpt(checkout, args.quick, args.echo) if who == "nanoGPT"
                     else run_ours(workdir, str(i), args.quick, args.echo, not args.no_trace))
                r["round"] = i + 1
                r["load_after"] = harness.load_average()
                results.append(r)
                print(f"    wall {r['wall_s']:.1f} s, start-up {_fmt(r['startup_s'])} s, "
                      f"{r['score']['bits_per_byte']:.4f} bits/byte (load {r['load_after']})", flush=True)
                harness.save_json(args.json, {"load": load, "partial": True, "prep": prep, "startup": startup,
                                              "results": results})
        body = report(results, prep, args.quick, startup)
    print(body)
    harness.write_section(*SECTION, body, command=shown_command(argv, checkout), load=load, doc=args.doc or None)
    harness.save_json(args.json, {"load": load, "prep": prep, "startup": startup, "results": results})
    return results

if __name__ == "__main__":
    main()
