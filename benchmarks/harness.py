"""What every benchmark script shares: running a recipe as a real subprocess while timing its output lines
and sampling its memory, describing the machine, and writing a result section into docs/benchmarks.md.

Why hand-written: the benchmarks time the real recipes through their real command lines, so they need the
arrival time of each log line and the peak memory of every process of a launch (torchrun starts one per
rank); neither subprocess nor pytest-benchmark gives that.
"""

from __future__ import annotations

import ast
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SHARED_DATA = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
PRETRAIN = REPO / "recipes" / "pretrain.py"
ONEFILE = REPO / "recipes" / "onefile_train.py"


# ---------------------------------------------------------------------------------------------------------
# Running a recipe
@dataclass
class Run:
    cmd: list[str]
    returncode: int
    wall_s: float
    lines: list[tuple[float, str]]  # (seconds since start, line) of stdout+stderr
    peak_rss: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (command line, peak RSS bytes)
    # pid -> peak anonymous RSS bytes (Linux RssAnon): RSS without file-backed pages, e.g. a memory-mapped
    # safetensors checkpoint, which the kernel can drop under memory pressure instead of running out of memory
    peak_anon: dict[int, int] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def check(self) -> "Run":
        if self.returncode != 0:
            # a rank's own error
            errors = [line for _, line in self.lines[:-40] if "Error" in line or "error:" in line]
            tail = "\n".join(errors[-10:] + [line for _, line in self.lines[-40:]])
            raise RuntimeError(f"command failed ({self.returncode}): {shlex.join(self.cmd)}\n{tail}")
        return self

    def rank_peaks(self, marker: str) -> list[int]:
        """Peak RSS of each process whose command line contains `marker` (the recipe: one per rank)."""
        return sorted((rss for cmdline, rss in self.peak_rss.values() if marker in cmdline), reverse=True)

    def rank_anon_peaks(self, marker: str) -> list[int]:
        """Peak anonymous RSS (RssAnon) of each process whose command line contains `marker`."""
        return sorted((self.peak_anon.get(pid, 0) for pid, (cmdline, _) in self.peak_rss.items() if marker in cmdline),
                      reverse=True)


def proc_status(pid: int, key: str) -> int | None:
    """A memory line of /proc/PID/status in bytes (Linux), e.g. RssAnon or VmHWM; None elsewhere or when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def env_for_runs(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    if env.get("TRANSFORMERS_VERBOSITY", "warning") != "warning":  # transformers' default: no info lines in the logs
        env["TRANSFORMERS_VERBOSITY"] = "warning"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def start(cmd: list[str], cwd: Path, env: dict) -> tuple[subprocess.Popen, Callable[[], int | None]]:
    """Start `cmd` with stdout and stderr on one pipe; return the process and a function that gives the pid of the
    process doing the run (None until it is known), whose process tree run() samples: here the Popen itself. The test
    suite swaps in one that forks one-process python runs from its warm start server (tests/conftest.py
    warm_benchmark_runs): the same output and exit status, without ~10 s of imports per run."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)  # text mode: tqdm's \r also ends a line
    return proc, lambda: proc.pid


def run(cmd: list[str], env: dict | None = None, timeout: float = 1800, cwd: Path = REPO,
        sample_memory: bool = True, echo: bool = False) -> Run:
    """Run `cmd`, timestamping each output line as it arrives and sampling the RSS of the whole process tree."""
    import psutil

    begin = time.perf_counter()
    proc, run_pid = start(cmd, cwd, env or env_for_runs())
    peaks: dict[int, tuple[str, int]] = {}
    anon_peaks: dict[int, int] = {}
    done = threading.Event()

    def sample():
        while (pid := run_pid()) is None and not done.is_set():
            done.wait(0.02)
        if pid is None:  # ended before its pid was known
            return
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            return
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    # VmHWM: the kernel's own high-water mark, so a peak between two samples is not missed
                    rss = max(p.memory_info().rss, proc_status(p.pid, "VmHWM") or 0)
                    # the command line read afresh: a child first seen between fork and exec still shows its
                    # launcher's (accelerate's ranks, for one), and would be counted as the launcher; the run's
                    # own process is the command
                    cmdline = " ".join(cmd) if p.pid == pid else " ".join(p.cmdline())
                    peaks[p.pid] = (cmdline, max(rss, peaks.get(p.pid, ("", 0))[1]))
                    anon = proc_status(p.pid, "RssAnon")
                    if anon is not None and anon > anon_peaks.get(p.pid, 0):
                        anon_peaks[p.pid] = anon
                except psutil.Error:
                    pass
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    lines = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - begin, line.rstrip("\n")))
            if echo:
                print("    |", line.rstrip("\n"), flush=True)
        proc.wait()
    finally:
        timer.cancel()
        done.set()
    if sample_memory:
        sampler.join()
    return Run(cmd, proc.returncode, time.perf_counter() - begin, lines, peaks, anon_peaks)


# ---------------------------------------------------------------------------------------------------------
# Reading the recipes' log lines
def trainer_logs(run_: Run) -> list[tuple[float, dict]]:
    """(arrival time, dict) for each log dict the HF Trainer printed ({'loss': '4.1', ...})."""
    out = []
    for t, line in run_.lines:
        i = line.find("{'")
        if i < 0 or not line.rstrip().endswith("}"):
            continue
        try:
            d = ast.literal_eval(line[i:].strip())
        except (ValueError, SyntaxError):
            continue
        if isinstance(d, dict):
            out.append((t, {k: _number(v) for k, v in d.items()}))
    return out


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


ONEFILE_LOG = re.compile(r"^step (\d+)/\d+ \| loss ([\d.]+) \| lr \S+ \| ([\d,]+) tok/s")


def onefile_logs(run_: Run) -> list[tuple[float, dict]]:
    out = []
    for t, line in run_.lines:
        m = ONEFILE_LOG.match(line.strip())
        if m:
            out.append((t, {"step": int(m[1]), "loss": float(m[2]), "tokens_per_s": float(m[3].replace(",", ""))}))
    return out


def loop_throughput(train_logs: list[tuple[float, dict]], logging_steps: int, tokens_per_step: int) -> float:
    """End-to-end tokens/s of the training loop between the first and the last training log line: everything the
    loop did in between (steps, data loading, logging, evaluations) counts; start-up and the first (warm-up)
    logging window do not."""
    if len(train_logs) < 2:
        raise RuntimeError(f"need at least 2 training log lines to time the loop, got {len(train_logs)}")
    (t0, _), (t1, _) = train_logs[0], train_logs[-1]
    steps = (len(train_logs) - 1) * logging_steps
    return steps * tokens_per_step / (t1 - t0)


# ---------------------------------------------------------------------------------------------------------
# The machine
def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    import torch

    cpu = platform.processor() or "CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = open("/proc/cpuinfo").read()
        simd = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    except OSError:
        simd = "?"
    return (f"{os.cpu_count()}-core {cpu} ({simd}) CPU, torch {torch.__version__.split('+')[0]} CPU, "
            f"{torch.get_num_threads()} threads")


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if n else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Reporting
def table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `text`, as dicts (what the smoke tests check the output with)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    if len(rows) < 3:
        return []
    headers = [h.strip() for h in rows[0].strip("|").split("|")]
    return [dict(zip(headers, (c.strip() for c in r.strip("|").split("|")))) for r in rows[2:]]


DOC_HEADER = """# Benchmarks

Each section below is written by one script in `benchmarks/` (`python benchmarks/<name>.py`, `--help` for options);
re-running a script replaces its section. These machines are shared and noisy: the figures that count are
**ratios against a baseline measured in the same run**, interleaved (A B A B), not absolute numbers across runs.
Every section records the date, the machine, the load average when it started and the exact command.

GPU: the CPU sections were measured without a GPU. GPU figures come from the GPU acceptance kit
(`benchmarks/gpu_acceptance.py`, docs/gpu_acceptance.md) and are recorded in their own section.
"""


def shown(cmd: list[str], tmp: str | Path | None = None) -> str:
    """A command line as the docs print it: paths relative to the repository, ../shared/data, $TMP for temporary
    folders, `python` for the interpreter; never a path of the machine that ran it."""
    text = shlex.join(["python" if word == sys.executable else str(word) for word in cmd])
    replacements = [(str(tmp), "$TMP")] if tmp else []
    replacements += [(str(SHARED_DATA), "../shared/data"), (str(REPO) + os.sep, ""), (str(REPO), "."),
                     (tempfile.gettempdir().rstrip(os.sep) + os.sep, "$TMP/")]
    for old, new in replacements:
        text = text.replace(old, new)
    return text


def write_section(name: str, title: str, body: str, command: list[str] | None = None, load: str | None = None,
                  doc: Path | None = DOC) -> None:
    """Replace (or append) the section `name` of docs/benchmarks.md."""
    if doc is None:
        return
    doc = Path(doc)
    command = command or ["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]]
    cmd = shown(command)
    stamp = (f"{datetime.date.today().isoformat()}, {machine()}, load average at start {load or load_average()} "
             f"(1/5/15 min)\n\n    {cmd}\n")
    section = f"<!-- BEGIN {name} -->\n## {title}\n\n{stamp}\n{body.strip()}\n<!-- END {name} -->\n"
    text = doc.read_text() if doc.exists() else DOC_HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    # keep the sections in numbered order (their titles start with the section number), whatever order they ran in;
    # hand-written text after a section (a note on it, or a hand-written section) moves with the section above it
    every = re.compile(r"<!-- BEGIN (\S+) -->\n## (.*?)\n.*?<!-- END \1 -->\n?", re.S)
    found = list(every.finditer(text))
    if found:
        head = text[: found[0].start()]
        ends = [m.start() for m in found[1:]] + [len(text)]
        blocks = [text[m.start():end].rstrip("\n") + "\n" for m, end in zip(found, ends)]
        def number(block: str) -> tuple[int, str]:  # "10. ..." after "9. ...", "1b. ..." after "1. ..."
            title = block.split("\n## ", 1)[1]
            digits = re.match(r"\d*", title).group(0)
            return int(digits or 0), title[len(digits):]

        text = head + "\n".join(sorted(blocks, key=number))
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def save_json(path: str | None, data) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=1, default=str))


def plot(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_common_args(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke version: tiny sizes, seconds (what the tests run)")
    parser.add_argument("--doc", default=str(DOC), help="markdown file to write the section into ('' = none)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--echo", action="store_true", help="show the recipes' output while they run")
