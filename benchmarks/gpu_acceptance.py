"""The GPU acceptance kit: one command that runs every GPU-only path of the toolkit on one CUDA GPU and brings the
numbers back, in at most 7 minutes (docs/gpu_acceptance.md).

On the CPU machine, once (downloads the wheels the GPU image lacks into .whl/, copies the GPT-2 tokenizer and Tiny
Shakespeare from ../shared/data into .gpu_kit/data; both folders are ignored by git and carried to the GPU machine):
    python benchmarks/gpu_acceptance.py --prepare
See the steps, their time limits and the exact commands without running anything:
    python benchmarks/gpu_acceptance.py --dry-run
On the GPU machine, from the repository root:
    python3 benchmarks/gpu_acceptance.py --out DIR                 # everything
    python3 benchmarks/gpu_acceptance.py --out DIR --only tests_core,bench_mfu   # a rerun of some steps
    python3 benchmarks/gpu_acceptance.py --out DIR --rerun-failed OLD/results.json  # the steps that were not ok

Steps, in order of value (each with its own time limit; the limits add up to the 420 s budget; a failing or
timed-out step does not stop the rest):
  install         pip install --no-index --no-deps --target SITE the carried wheels (SITE is emptied first)
  env             versions, GPU, driver, the carried wheels' requirements against what is installed, a CUDA NF4 check
  tests_core      pytest tests/gpu: does each recipe run on CUDA at all - pretrain bf16 + sdpa, QLoRA NF4 with paged
                  AdamW, FSDP2 (+ CPU offload), merge, onefile - and LoRA (items 2-4, 6)
  tests_pretrain  pytest tests/gpu: pretrain.py 124M bf16 + sdpa + torch.compile, alone on the GPU, MFU >= 45% (item 1)
  bench_mfu       124M training step tokens/s and MFU, eager and compiled, at 16x1024 and 4x1024, and where the
                  time goes (kernel classes from torch.profiler)
  tests_plan      pytest tests/gpu: planner vs measured GPU memory, LoRA vs QLoRA step time and memory (item 5)

A step is ok only if its command exited 0 and, for the pytest steps, pytest's JUnit report lists tests and every
one of them passed: a skipped test is a failure here (tests/gpu/conftest.py also fails it under the kit). The targets
are PASS/FAIL lines with their numbers; one not measured is a FAIL. The exit status is 0 only if every step is ok
and every target passed.
Writes DIR/results.json (every step, test outcome, record and target), DIR/gpu_acceptance.log (all output) and
DIR/work_logs.tar.gz (each recipe run's log and probe JSON), rewritten after each step, and prints a summary table
at the end. Models and checkpoints go to a work folder (--work, emptied at the start), never to DIR.

Why hand-written: no tool runs a test suite plus benchmarks against a wall-clock budget on a machine without a
package registry, installs wheels carried beside the code, and returns one JSON of everything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_LIST = REPO / "benchmarks" / "gpu_wheels.txt"
WHEEL_DIR = REPO / ".whl"
FALLBACK_DIR = WHEEL_DIR / "fallback"
KIT_DATA = REPO / ".gpu_kit" / "data"
SHARED_DATA = REPO.parent / "shared" / "data"
CARRY_LIMIT = 64 * 2**20  # what one device-tool call carries: working tree + carried folders
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
MFU_TARGET, QLORA_MEMORY_TARGET, QLORA_TIME_TARGET, PLAN_TOLERANCE = 0.45, 0.6, 1.2, 0.15

# The command a session with the device tool runs (docs/gpu_acceptance.md): the tool's timeout_s leaves the kit's
# 420 s budget plus a margin for the final writes and for killing a hung step; the carried folders are .whl and
# .gpu_kit. The window is ~15 minutes of device time, start-up included: this leaves room to rerun failed steps.
BUDGET_S = 420
DEVICE_COMMAND = "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_acceptance.py --out $OUT"
DEVICE_TIMEOUT_S = 480
JOB_MARGIN_S = 15  # recipe jobs (tests/gpu/kit.py) are killed this long before their step's limit (GPU_KIT_DEADLINE)
DEVICE_CARRY = [".whl", ".gpu_kit"]


# --------------------------------------------------------------------------------------------------------------
# The wheel list
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Pin:
    name: str
    version: str
    override: bool = False  # replaces the image's own version of the package
    fallback_if: str | None = None  # a requirement on an installed package (e.g. "pyarrow<24")

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def parse_wheel_list(text: str) -> tuple[list[Pin], list[Pin], list[str]]:
    """(pins, fallbacks, packages the image has) from benchmarks/gpu_wheels.txt; a malformed line is an error."""
    pins, fallbacks, image = [], [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("image:"):
            image += [normalize(n) for n in line[len("image:") :].split()]
            continue
        words = line.split()
        if "==" not in words[0]:
            raise ValueError(f"gpu_wheels.txt line {number}: '{raw}' does not start with name==version")
        name, version = words[0].split("==", 1)
        pin = Pin(normalize(name), version)
        rest = words[1:]
        while rest:
            word = rest.pop(0)
            if word == "override":
                pin.override = True
            elif word == "fallback-if" and rest:
                pin.fallback_if = rest.pop(0)
            else:
                raise ValueError(f"gpu_wheels.txt line {number}: unknown word '{word}' (override, fallback-if REQ)")
        (fallbacks if pin.fallback_if else pins).append(pin)
    names = [p.name for p in pins]
    if len(set(names)) != len(names):
        raise ValueError("gpu_wheels.txt pins a package twice; keep one version of each (two stop the whole install)")
    for fb in fallbacks:
        if fb.name not in names:
            raise ValueError(f"gpu_wheels.txt: fallback {fb.spec} replaces no pinned package")
    return pins, fallbacks, image


def wheel_file(pin: Pin, folder: Path) -> Path | None:
    """The downloaded wheel of exactly this name and version in folder, or None."""
    for path in sorted(folder.glob("*.whl")):
        name, version = path.name.split("-")[:2]
        if normalize(name) == pin.name and version == pin.version:
            return path
    return None


def install_choice(
    pins: list[Pin], fallbacks: list[Pin], installed, use_image_versions: bool
) -> list[tuple[Pin, str]]:
    """Which pin of each package to install, with why. installed(name) -> the image's version or None."""
    from packaging.requirements import Requirement

    chosen = []
    for pin in pins:
        if pin.override and use_image_versions:
            continue
        why = "carried"
        for fb in fallbacks:
            if fb.name != pin.name:
                continue
            req = Requirement(fb.fallback_if)
            have = installed(req.name)
            if have is not None and req.specifier.contains(have, prereleases=True):
                pin, why = fb, f"fallback: the image has {req.name} {have} ({fb.fallback_if})"
                break
        chosen.append((pin, why))
    return chosen


def read_wheel_list() -> tuple[list[Pin], list[Pin], list[str]]:
    return parse_wheel_list(WHEEL_LIST.read_text())


# --------------------------------------------------------------------------------------------------------------
# --prepare (CPU machine)
# --------------------------------------------------------------------------------------------------------------


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def tree_size() -> int:
    """Bytes of what travels besides the carried folders: tracked files and untracked files git does not ignore."""
    cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    try:
        files = subprocess.run(cmd, cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return folder_size(REPO / "toolkit") + folder_size(REPO / "recipes") + folder_size(REPO / "tests")
    return sum((REPO / f.decode()).stat().st_size for f in set(files) if f and (REPO / f.decode()).is_file())


def wheel_requirements(path: Path) -> list[str]:
    """Requires-Dist lines of a wheel that apply without extras."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    reqs = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r and "extra==" not in r]


def prepare() -> int:
    pins, fallbacks, image = read_wheel_list()
    if not (SHARED_DATA / "gpt2-tokenizer").is_dir() or not (SHARED_DATA / "tinyshakespeare" / "input.txt").is_file():
        print(
            f"error: {SHARED_DATA} lacks gpt2-tokenizer/ or tinyshakespeare/input.txt; --prepare copies them from "
            "there",
            file=sys.stderr,
        )
        return 2
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)]]
    for folder, group in ((WHEEL_DIR, pins), (FALLBACK_DIR, fallbacks)):
        folder.mkdir(parents=True, exist_ok=True)
        missing = [p.spec for p in group if wheel_file(p, folder) is None]
        if missing:
            print(f"downloading into {folder.relative_to(REPO)}: {' '.join(missing)}", flush=True)
            subprocess.run([*base, "-d", str(folder), *missing], check=True)
        for path in folder.glob("*.whl"):  # one version of each: a stale one would stop the whole install
            if not any(wheel_file(p, folder) == path for p in group):
                print(f"removing {path.relative_to(REPO)} (not in {WHEEL_LIST.name})")
                path.unlink()
    carried = {p.name for p in pins}
    problems = []
    print("\nwheel                                             MiB  requires (without extras)")
    for pin in pins + fallbacks:
        path = wheel_file(pin, FALLBACK_DIR if pin.fallback_if else WHEEL_DIR)
        reqs = wheel_requirements(path)
        print(f"{path.name[:48]:<48} {path.stat().st_size / 2**20:5.1f}  {'; '.join(reqs) or '-'}")
        for req in reqs:
            name = normalize(re.split(r"[;\[<>=!~ ]", req, maxsplit=1)[0])
            if name not in carried and name not in image:
                problems.append(f"{pin.spec} requires {req}: neither carried nor in the image's list")
    if (SHARED_DATA / "gpt2-tokenizer").is_dir():
        shutil.rmtree(KIT_DATA, ignore_errors=True)
        shutil.copytree(SHARED_DATA / "gpt2-tokenizer", KIT_DATA / "gpt2-tokenizer")
        (KIT_DATA / "tinyshakespeare").mkdir(parents=True)
        shutil.copy2(SHARED_DATA / "tinyshakespeare" / "input.txt", KIT_DATA / "tinyshakespeare" / "input.txt")
        for path in KIT_DATA.rglob("*"):  # ../shared is read-only; the copies must be removable by the next --prepare
            path.chmod(0o755 if path.is_dir() else 0o644)
    wheels, data, tree = folder_size(WHEEL_DIR), folder_size(KIT_DATA), tree_size()
    total = wheels + data + tree
    print(
        f"\ncarried: wheels {wheels / 2**20:.1f} MiB (.whl), data {data / 2**20:.1f} MiB (.gpu_kit), "
        f"working tree {tree / 2**20:.1f} MiB: {total / 2**20:.1f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB "
        "a call carries"
    )
    for problem in problems:
        print(f"warning: {problem}")
    print("\n" + device_invocation())
    if total > CARRY_LIMIT:
        print(
            "error: over the limit; drop a carried override (see gpu_wheels.txt) or untracked files", file=sys.stderr
        )
        return 1
    return 0


def device_invocation(command: str = DEVICE_COMMAND, timeout_s: int = DEVICE_TIMEOUT_S) -> str:
    return f"device tool: run(command={command!r}, timeout_s={timeout_s}, carry={json.dumps(DEVICE_CARRY)})"


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    cmd: list[str]
    cap_s: int  # this step's own time limit (the overall budget may cut it shorter)
    what: str
    result: dict = field(default_factory=dict)


def junit_path(work: Path, step: str) -> Path:
    return work / f"junit-{step}.xml"


def pytest_cmd(work: Path, step: str, *files: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfEs",
        "-m",
        "gpu",
        "--junitxml",
        str(junit_path(work, step)),
        *[f"tests/gpu/{f}" for f in files],
    ]


def junit_verdict(path: Path) -> tuple[bool, str]:
    """(ok, why) from pytest's JUnit report: ok only when it lists tests and each one passed (a skip is not a pass)."""
    import xml.etree.ElementTree as ET

    if not path.exists():
        return False, "no JUnit report (pytest did not finish)"
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return False, f"unreadable JUnit report ({err})"
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        kind = "failed" if "failure" in kinds else "error" if "error" in kinds else "skipped" if kinds else "passed"
        counts[kind] += 1
    if not sum(counts.values()):
        return False, "no tests ran"
    bad = {k: n for k, n in counts.items() if n and k != "passed"}
    text = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    return not bad, text


STEP_NAMES = ("install", "env", "tests_core", "tests_pretrain", "bench_mfu", "tests_plan")


def build_steps(args) -> list[Step]:
    """The steps in order of value, each with its cap: the first ~2 minutes answer whether each recipe runs on CUDA
    at all, then MFU, then the planner. The caps add up to BUDGET_S."""
    me = str(Path(__file__).resolve().relative_to(REPO))
    work = Path(args.work)
    steps = [
        Step(
            "install",
            [sys.executable, me, "--child", "install", "--site", args.site]
            + (["--use_image_versions"] if args.use_image_versions else []),
            20,
            f"empty {args.site}; pip install --no-index --no-deps --target {args.site} the wheels of .whl/ "
            "chosen by benchmarks/gpu_wheels.txt",
        ),
        Step(
            "env",
            [sys.executable, me, "--child", "env", "--json", str(work / "env.json"), "--site", args.site],
            20,
            "versions, GPU and driver, carried wheels' requirements, a CUDA NF4 quantize/dequantize",
        ),
        Step(
            "tests_core",
            pytest_cmd(work, "tests_core", "test_fsdp_gpu.py", "test_finetune_gpu.py", "test_onefile_gpu.py"),
            130,
            "does each recipe run on CUDA: pretrain bf16+sdpa, QLoRA NF4 + paged AdamW, FSDP2 (+offload), merge, "
            "onefile; LoRA (items 2-4, 6; runs 4 at a time)",
        ),
        Step(
            "tests_pretrain",
            pytest_cmd(work, "tests_pretrain", "test_pretrain_gpu.py"),
            110,
            "item 1: pretrain.py 124M bf16 + sdpa + torch.compile, 30 steps of 16x1024, MFU >= 45% from its log",
        ),
        Step(
            "bench_mfu",
            [sys.executable, me, "--child", "mfu", "--json", str(work / "mfu.json"), "--go_file",
             str(bench_go_file(args))] + (["--smoke"] if getattr(args, "smoke", False) else []),
            40,
            "124M step: tokens/s and MFU, eager vs compiled, 16x1024 and 4x1024; kernel time by class",
        ),
        Step(
            "tests_plan",
            pytest_cmd(work, "tests_plan", "test_plan_gpu.py"),
            100,
            "item 5: toolkit plan vs torch.cuda.max_memory_allocated (9 configurations), LoRA vs QLoRA benchmark",
        ),
    ]
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(wanted) - {s.name for s in steps}
        if unknown:
            raise SystemExit(
                f"error: unknown step(s) {', '.join(sorted(unknown))} in --only; choose from "
                f"{', '.join(s.name for s in steps)}"
            )
        steps = [s for s in steps if s.name in wanted or s.name == "install" or s.name == "env"]
    return steps


def failed_steps(results_file: Path) -> list[str]:
    """The steps of an earlier results.json that were not ok (never install and env, which every run repeats)."""
    try:
        results = json.loads(results_file.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read {results_file} ({type(err).__name__}); pass the results.json an "
                         "earlier kit run wrote") from None
    return [s["name"] for s in results.get("steps", [])
            if s.get("status") != "ok" and s["name"] not in ("install", "env")]


def rerun_command(names: list[str], budget_s: int) -> str:
    return device_invocation(f"{DEVICE_COMMAND} --only {','.join(names)} --budget_s {budget_s}",
                             min(budget_s + DEVICE_TIMEOUT_S - BUDGET_S, 600))


def bench_go_file(args) -> Path:
    """Created when bench_mfu's turn comes: its processes compiled in the background and wait for it."""
    return Path(args.work) / "bench_mfu.go"


def step_env(args) -> dict:
    env = dict(os.environ)
    data = KIT_DATA if (KIT_DATA / "gpt2-tokenizer").is_dir() else SHARED_DATA
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), args.site, env.get("PYTHONPATH", "")) if p)
    # GPU_KIT_LAUNCHED: tests/gpu fail where they would skip or rehearse on CPU
    env.update(GPU_KIT_LAUNCHED="1", GPU_KIT_WORK=args.work, GPU_KIT_DATA=str(data),
               GPU_KIT_RESULTS=str(Path(args.work) / "records.jsonl"),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_HOME=str(Path(args.work) / "hf_home"))
    return env


def kill_family(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL the step and every process under it (torchrun starts its workers in new sessions)."""
    try:
        import psutil

        family = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - psutil missing or the process already gone: kill what we know
        family = []
    pids = [proc.pid] + [p.pid for p in family]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
            if sig == signal.SIGTERM and all(not _alive(pid) for pid in pids[1:]):
                return
        except subprocess.TimeoutExpired:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@dataclass
class Running:
    step: Step
    proc: subprocess.Popen
    reader: threading.Thread
    tail: list[str]
    start: float


def start_step(step: Step, env: dict, log, note: str = "", limit_s: float | None = None) -> Running:
    """Start one step; a thread appends its output to the log, each line prefixed with the step's name. The step's
    processes learn its deadline (GPU_KIT_DEADLINE): tests/gpu/kit.py kills its jobs before it, so the tests fail
    with the job's log and pytest still writes every outcome."""
    log.write(f"\n===== {step.name}{note}: {shlex.join(step.cmd)}\n")
    log.flush()
    tail: list[str] = []
    env = dict(env, GPU_KIT_DEADLINE=str(time.time() + (limit_s or step.cap_s) - JOB_MARGIN_S))
    proc = subprocess.Popen(step.cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            log.write(f"[{step.name}] {line}")
            tail.append(line)
            del tail[:-60]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return Running(step, proc, reader, tail, time.perf_counter())


def wait_step(run: Running, timeout: float, log, junit: Path | None = None) -> dict:
    """Wait for a started step (killing it and everything under it past the timeout); rc, status, seconds, tail.
    With a JUnit report (the pytest steps) the step is ok only if every test in it passed."""
    try:
        rc = run.proc.wait(timeout=max(timeout, 0.1))
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        kill_family(run.proc)
        rc, status = run.proc.returncode, "timeout"
    run.reader.join(timeout=10)
    seconds = time.perf_counter() - run.start
    tests = None
    if junit is not None:
        passed, tests = junit_verdict(junit)
        if status == "ok" and not passed:
            status = f"failed: {tests}"
    log.write(f"===== {run.step.name}: {status} (rc {rc}) after {seconds:.0f} s\n")
    log.flush()
    return {
        "status": status,
        "rc": rc,
        "seconds": round(seconds, 1),
        "limit_s": round(timeout),
        "tests": tests,
        "tail": "".join(run.tail)[-3000:],
    }


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------


def read_records(path: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    tests, records = [], {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if "record" in entry:
                records.setdefault(entry["record"], []).append(entry)
            elif "test" in entry:
                tests.append(entry)
    return tests, records


TARGETS = (  # (what, the step that measures it, the comparison, the threshold)
    ("pretrain.py 124M bf16+compile 16x1024 MFU (its log)", "tests_pretrain", ">=", MFU_TARGET),
    ("124M training step bf16+compile 16x1024 MFU (bench)", "bench_mfu", ">=", MFU_TARGET),
    ("QLoRA / LoRA peak GPU memory at 350M", "tests_plan", "<=", QLORA_MEMORY_TARGET),
    ("QLoRA / LoRA step time at 350M", "tests_plan", "<=", QLORA_TIME_TARGET),
    ("toolkit plan vs max_memory_allocated, worst |ratio - 1|", "tests_plan", "<=", PLAN_TOLERANCE),
)


def evaluate_targets(
    records: dict[str, list[dict]], mfu: dict | None, steps_run: set[str] | None = None
) -> list[dict]:
    """The issue's targets against what was measured (the last record of each kind): each is met (PASS), missed or
    not measured although its step ran (FAIL), or its step did not run in this call (not run)."""
    values: dict[str, float | None] = {}
    for r in records.get("pretrain_compiled_124m", [])[-1:]:
        values[TARGETS[0][0]] = r.get("mfu_median_after_compile")
    run = ((mfu or {}).get("runs") or {}).get("compiled-16") or {}
    values[TARGETS[1][0]] = run.get("mfu")
    for r in records.get("bench_lora_vs_qlora", [])[-1:]:
        big = r.get("350m") or {}
        values[TARGETS[2][0]], values[TARGETS[3][0]] = big.get("peak_ratio"), big.get("step_time_ratio")
    for r in records.get("plan_gpu_summary", [])[-1:]:
        values[TARGETS[4][0]] = r.get("worst")
    rows = []
    for what, step, op, threshold in TARGETS:
        value = values.get(what)
        if value is None:
            verdict = "not run" if steps_run is not None and step not in steps_run else "FAIL"
            met = None if verdict == "not run" else False
        else:
            met = value >= threshold if op == ">=" else value <= threshold
            verdict = "PASS" if met else "FAIL"
        rows.append({"target": what, "step": step, "value": value, "threshold": f"{op} {threshold}", "met": met,
                     "verdict": verdict})
    return rows


def target_lines(targets: list[dict]) -> list[str]:
    """One line per target: PASS/FAIL, what, the measured number against the threshold."""
    lines = []
    for t in targets:
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"{t['verdict']:<7} {t['target']}: {value} (target {t['threshold']}; step {t['step']})")
    return lines


def write_results(out: Path, meta: dict, steps: list[Step], work: Path) -> dict:
    tests, records = read_records(work / "records.jsonl")
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else None
    mfu = json.loads((work / "mfu.json").read_text()) if (work / "mfu.json").exists() else None
    results = {
        "kit": meta,
        "machine": env,
        "steps": [{"name": s.name, "what": s.what, "command": shlex.join(s.cmd), **s.result} for s in steps],
        "tests": tests,
        "records": records,
        "bench_mfu": mfu,
        "targets": evaluate_targets(records, mfu, {s.name for s in steps if s.result.get("status")}),
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out / "results.json")
    archive_logs(work, out / "work_logs.tar.gz")
    return results


def archive_logs(work: Path, target: Path, max_file_bytes: int = 4 * 2**20) -> None:
    """Every run's log and probe/measurement JSON (not models): the work folder stays on the GPU machine."""
    import tarfile

    tmp = target.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file() and path.suffix in (".log", ".json", ".jsonl") and path.stat().st_size <= max_file_bytes:
                tar.add(path, arcname=str(path.relative_to(work)))
    tmp.replace(target)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def summary(results: dict) -> str:
    """The console's closing table: machine, steps, test outcomes, the MFU benchmark, the targets."""
    m = results.get("machine") or {}
    versions = m.get("versions", {})
    machine = (f"GPU: {m.get('gpu_name', '?')}, driver {m.get('driver', '?')}, torch {versions.get('torch', '?')}, "
               f"transformers {versions.get('transformers', '?')}")
    out = [machine]
    rows = [[s["name"], s.get("status", "not run"), s.get("seconds", ""), s.get("limit_s", ""), s.get("tests") or ""]
            for s in results["steps"]]
    out.append(table(["step", "status", "seconds", "limit", "tests"], rows))
    finals = {t["test"]: t for t in results["tests"] if t["when"] == "call" or t["outcome"] != "passed"}
    counts: dict[str, int] = {}
    for t in finals.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    out.append("tests: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none ran"))
    skips: dict[str, int] = {}
    for t in finals.values():
        message = (t.get("message") or "").strip().splitlines()
        last = message[-1][:200] if message else ""
        if t["outcome"] == "skipped":  # a failure under the kit: listed, and its step is not ok
            skips[last] = skips.get(last, 0) + 1
        elif t["outcome"] != "passed":
            out.append(f"  {t['outcome'].upper()} {t['test'].split('tests/gpu/')[-1]}: {last}")
    out += [f"  {n} skipped (a failure here): {reason}" for reason, n in skips.items()]
    runs = (results.get("bench_mfu") or {}).get("runs") or {}
    rows = [[k, f"{r['tokens_per_s']:,.0f}", f"{r.get('mfu') or 0:.1%}", f"{r['ms_per_step']:.1f}",
             f"{r['peak_gib']:.1f}", f"{r['compile_s']:.0f}" if r.get("compile_s") else "-"]
            for k, r in sorted(runs.items()) if "tokens_per_s" in r]
    if rows:
        out.append(table(["124M step", "tokens/s", "MFU", "ms/step", "peak GiB", "compile s"], rows))
    out.append("targets:")
    out += [f"  {line}" for line in target_lines(results["targets"])]
    return "\n".join(out)


def run_kit(args) -> int:
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)  # fresh every run: nothing of an earlier run is reused
    work.mkdir(parents=True)
    steps = build_steps(args)
    env = step_env(args)
    meta = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python3", "benchmarks/gpu_acceptance.py", *sys.argv[1:]]),
        "budget_s": args.budget_s,
        "work": str(work),
        "site": args.site,
    }
    deadline = time.perf_counter() + args.budget_s
    with open(out / "gpu_acceptance.log", "w", encoding="utf-8") as log:
        log.write(f"gpu_acceptance {meta}\n")
        bench = next((s for s in steps if s.name == "bench_mfu"), None)
        background = None
        for step in steps:
            left = deadline - time.perf_counter()
            if bench is not None and background is None and step.name not in ("install", "env") and left >= 20:
                # The benchmark compiles (CPU work) while the correctness tests run, then waits, holding its GPU
                # memory idle, until its turn: its timed steps run alone on the GPU (bench_go_file).
                background = start_step(bench, env, log, " (started in the background: compile, then wait)",
                                        limit_s=left)
            if left < 20:
                step.result = {"status": "skipped: time budget spent", "seconds": 0}
            else:
                print(
                    f"[{time.strftime('%H:%M:%S')}] {step.name}: {step.what} (limit {min(step.cap_s, left):.0f} s)",
                    flush=True,
                )
                limit = min(step.cap_s, left)
                junit = junit_path(work, step.name) if "--junitxml" in step.cmd else None
                if step is bench and background is not None:
                    go = time.perf_counter()
                    bench_go_file(args).write_text("go")
                    step.result = wait_step(background, limit, log)
                    step.result.update(
                        seconds=round(time.perf_counter() - go, 1), background_s=round(go - background.start, 1)
                    )
                else:
                    step.result = wait_step(start_step(step, env, log, limit_s=limit), limit, log, junit)
                print(
                    f"[{time.strftime('%H:%M:%S')}] {step.name}: {step.result['status']} "
                    f"after {step.result['seconds']:.0f} s",
                    flush=True,
                )
                if step.result["status"] != "ok":
                    print("".join(step.result["tail"].splitlines(keepends=True)[-15:]), flush=True)
            meta["elapsed_s"] = round(args.budget_s - (deadline - time.perf_counter()), 1)
            results = write_results(out, meta, steps, work)
        if background is not None and background.proc.poll() is None:  # its turn never came: stop it
            kill_family(background.proc)
        text = summary(results)
        log.write("\n" + text + "\n")
    print("\n" + text, flush=True)
    failed = [s.name for s in steps if s.result.get("status") != "ok" and s.name not in ("install", "env")]
    missed = {t["step"] for t in results["targets"] if t["met"] is False}
    redo = [name for name in STEP_NAMES if name in set(failed) | missed]
    if redo:
        budget = max(60, min(BUDGET_S, 40 + sum(s.cap_s for s in steps if s.name in redo)))
        print(f"\nrerun only these steps ({', '.join(redo)}), or --rerun-failed {out / 'results.json'}:\n"
              f"{rerun_command(redo, budget)}", flush=True)
    ok = all(s.result.get("status") == "ok" for s in steps) and not any(t["met"] is False for t in results["targets"])
    return 0 if ok else 1


def plan_lines(steps: list[Step], budget_s: int) -> tuple[list[str], int]:
    """The plan: each step's cap, when it starts at the latest, and the jobs' limit inside it; and the total."""
    lines, start = [], 0
    for step in steps:
        jobs = (f"; its recipe jobs are killed {JOB_MARGIN_S} s before the cap ({step.cap_s - JOB_MARGIN_S} s)"
                if "--junitxml" in step.cmd else "")
        lines.append(f"{step.name:<15} cap {step.cap_s:>3} s, starts by {start:>3} s{jobs}: {step.what}")
        start += step.cap_s
    return lines, start


def dry_run(args) -> int:
    steps = build_steps(args)
    pins, fallbacks, _ = read_wheel_list()
    print(
        f"GPU acceptance kit: {len(steps)} steps within a {args.budget_s} s budget; results in OUT/results.json, "
        f"OUT/gpu_acceptance.log and OUT/work_logs.tar.gz; work folder {args.work} (emptied first)\n"
    )
    lines, total = plan_lines(steps, args.budget_s)
    print("plan, in order of value (a cap is cut shorter when the budget runs low):")
    for line in lines:
        print(f"  {line}")
    print(f"  total of the caps: {total} s (budget {args.budget_s} s)"
          + ("" if total <= args.budget_s else f"; OVER by {total - args.budget_s} s: the last steps get cut"))
    print("  (bench_mfu starts with the first test step, compiles in the background, and times alone at its turn)")
    print("\ncommands:")
    for step in steps:
        print(f"{step.name}  (limit {step.cap_s} s): {step.what}\n    {shlex.join(step.cmd)}")
    print("\nrerun only failed steps: --rerun-failed OLD/results.json, or --only, e.g.\n"
          + rerun_command(["tests_plan"], 160))
    env = step_env(args)
    print(
        "\nenvironment of every step: "
        + " ".join(
            f"{k}={env[k]}"
            for k in ("PYTHONPATH", "GPU_KIT_WORK", "GPU_KIT_DATA", "GPU_KIT_RESULTS", "HF_HUB_OFFLINE", "HF_HOME")
        )
    )
    print("\nwheels (benchmarks/gpu_wheels.txt):")
    for pin in pins + fallbacks:
        path = wheel_file(pin, FALLBACK_DIR if pin.fallback_if else WHEEL_DIR)
        flags = " override" if pin.override else ""
        flags += f" fallback-if {pin.fallback_if}" if pin.fallback_if else ""
        print(f"  {pin.spec}{flags}: {path.relative_to(REPO) if path else 'NOT DOWNLOADED (run --prepare)'}")
    data = KIT_DATA if (KIT_DATA / "gpt2-tokenizer").is_dir() else None
    print(
        f"data: {data.relative_to(REPO) if data else 'NOT PREPARED (run --prepare): the GPU machine has no ../shared'}"
    )
    print("\n" + device_invocation())
    return 0


# --------------------------------------------------------------------------------------------------------------
# Children: install, env, mfu
# --------------------------------------------------------------------------------------------------------------


def installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def child_install(args) -> int:
    pins, fallbacks, _ = read_wheel_list()
    chosen = install_choice(pins, fallbacks, installed_version, args.use_image_versions)
    files, missing = [], []
    for pin, why in chosen:
        path = wheel_file(pin, FALLBACK_DIR if pin.fallback_if else WHEEL_DIR)
        print(f"{pin.spec}: {why} ({path.name if path else 'MISSING'})")
        (files if path else missing).append(str(path or pin.spec))
    if missing:
        print(
            f"error: wheels not found: {' '.join(missing)}; run `python benchmarks/gpu_acceptance.py --prepare` "
            "on the CPU machine and carry .whl",
            flush=True,
        )
    shutil.rmtree(args.site, ignore_errors=True)  # a rerun installs into an empty folder: the same result every time
    if files:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--target",
            args.site,
            *files,
        ]
        print(shlex.join(cmd), flush=True)
        rc = subprocess.run(cmd, check=False).returncode
        if rc:
            return rc
    return 2 if missing else 0


def child_env_report(args) -> int:
    """Versions, the GPU, the carried wheels' requirements against what is installed, a CUDA NF4 round trip."""
    from importlib import metadata

    report: dict = {"python": sys.version.split()[0], "versions": {}, "loaded_from": {}, "checks": {}}
    for name in (
        "torch",
        "transformers",
        "accelerate",
        "peft",
        "trl",
        "datasets",
        "bitsandbytes",
        "huggingface_hub",
        "tokenizers",
        "safetensors",
        "pyarrow",
        "pandas",
        "fsspec",
        "numpy",
        "triton",
        "dill",
        "multiprocess",
        "xxhash",
        "pytest",
        "pytest-timeout",
        "psutil",
        "nvidia-ml-py",
    ):
        report["versions"][name] = installed_version(name)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
        report["nvidia_smi"] = out
        report["driver"] = out.split(",")[1].strip() if "," in out else None
    except (OSError, subprocess.TimeoutExpired) as err:
        report["nvidia_smi"] = f"unavailable ({type(err).__name__})"
    problems = []
    site = Path(args.site)
    if site.is_dir():
        from packaging.requirements import Requirement

        for dist in metadata.distributions(path=[str(site)]):
            for req in dist.requires or []:
                r = Requirement(req)
                if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                    continue
                have = installed_version(r.name)
                if have is None or not r.specifier.contains(have, prereleases=True):
                    problems.append(f"{dist.metadata['Name']} {dist.version} requires {req}; installed: {have}")
    report["checks"]["carried_requirements"] = problems or "all satisfied"
    try:
        import torch

        report["torch_cuda"] = torch.version.cuda
        report["gpu_name"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        report["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        report["capability"] = f"{props.major}.{props.minor}"
        report["bf16"] = torch.cuda.is_bf16_supported()
        for name in ("transformers", "trl", "bitsandbytes", "datasets", "peft"):
            try:
                report["loaded_from"][name] = str(Path(__import__(name).__file__).parent)
            except Exception as err:  # noqa: BLE001 - a broken import is the finding
                report["loaded_from"][name] = f"import failed: {type(err).__name__}: {err}"[:300]
        import bitsandbytes.functional as bnbf

        w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        back = bnbf.dequantize_4bit(packed, state)
        report["checks"]["nf4_round_trip_rel_error"] = ((back - w).abs().mean() / w.abs().mean()).item()
        report["checks"]["nf4_packed_device"] = str(packed.device)
    except Exception as err:  # noqa: BLE001 - reported, and the step fails
        report["checks"]["gpu"] = f"{type(err).__name__}: {err}"[:500]
    print(json.dumps(report, indent=1))
    Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if "gpu" not in report["checks"] else 1


def child_mfu(args) -> int:
    """Two processes, one per batch size, compile at the same time (CPU work) and then time one after the other."""
    import queue

    work = Path(args.json).parent
    procs, lines = {}, {}
    for batch in (16, 4):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            "mfu_shape",
            "--batch",
            str(batch),
            "--json",
            str(work / f"mfu-{batch}.json"),
        ] + (["--smoke"] if args.smoke else [])
        procs[batch] = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines[batch] = queue.Queue()

        def pump(b=batch):
            for line in procs[b].stdout:
                print(f"[{b}x1024] {line}", end="", flush=True)
                lines[b].put(line.strip())
            lines[b].put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(batch: int, word: str, seconds: float) -> bool:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            try:
                line = lines[batch].get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                return False
            if line == word:
                return True
        return False

    ready = {b: wait_for(b, "READY", 170) for b in procs}
    if args.go_file:  # compiled in the background of other steps: time only when the GPU is ours
        print("compiled; waiting for the go file", flush=True)
        while not Path(args.go_file).exists():
            time.sleep(0.5)
    for batch, proc in procs.items():  # timing one at a time: the other process waits without using the GPU
        if ready[batch]:
            proc.stdin.write("GO\n")
            proc.stdin.flush()
            wait_for(batch, "DONE", 18)  # both within bench_mfu's 40 s cap
    for p in procs.values():
        try:
            p.stdin.close()
            p.wait(timeout=30)
        except (subprocess.TimeoutExpired, OSError):
            p.kill()
    result = {"runs": {}, "profile": None}
    for batch in procs:
        path = work / f"mfu-{batch}.json"
        if path.exists():
            part = json.loads(path.read_text())
            result["runs"].update(part["runs"])
            result["profile"] = result["profile"] or part.get("profile")
            result.setdefault("meta", part.get("meta"))
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if len(result["runs"]) == 4 else 1


def child_mfu_shape(args) -> int:
    """124M GPT-2 training steps exactly as PretrainTrainer computes them (bf16 autocast, sdpa, loss on T-1 positions
    via logits_to_keep + shift_labels, fused AdamW, clipping at 1.0) on random tokens; eager, then torch.compile."""
    import torch
    from transformers import AutoModelForCausalLM

    from toolkit import flops, presets

    # --smoke: the same code on a CPU at a tiny shape, without inductor (tests the harness, measures nothing)
    device, preset, T, timed = ("cpu", "gpt2-nano", 64, 2) if args.smoke else ("cuda", "gpt2", 1024, 20)
    batch = args.batch
    torch.manual_seed(0)
    config = presets.build_gpt2_config(preset, 50257)
    model = (
        AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").to(device).train()
    )
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    gen = torch.Generator(device=device).manual_seed(0)
    data = [torch.randint(0, 50257, (batch, T), device=device, generator=gen) for _ in range(4)]
    keep = torch.arange(T - 1, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fpt = flops.flops_per_token_for(config, T)
    peak, peak_source = flops.peak_flops()
    result = {
        "meta": {
            "flops_per_token": fpt,
            "peak_flops": peak,
            "peak_source": peak_source,
            "block": T,
            "params": model.num_parameters(),
            "torch": torch.__version__,
        },
        "runs": {},
    }

    def step(m, i):
        x = data[i % len(data)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = m(input_ids=x, labels=x, shift_labels=x[:, 1:].contiguous(), logits_to_keep=keep).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def measure(m, name, warmup):
        start = time.perf_counter()
        for i in range(warmup):
            step(m, i)
        sync()
        warm_s = time.perf_counter() - start
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for i in range(timed):
            step(m, i)
        sync()
        seconds = (time.perf_counter() - start) / timed
        tps = batch * T / seconds
        result["runs"][name] = {
            "batch": batch,
            "tokens_per_s": tps,
            "ms_per_step": 1000 * seconds,
            "mfu": tps * fpt / peak if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
            "warmup_s": warm_s,
            "timed_steps": timed,
        }
        return result["runs"][name]

    compiled = torch.compile(model, backend="eager" if args.smoke else "inductor")
    start = time.perf_counter()
    for i in range(2):  # compile forward and backward while the other batch size's process compiles too
        step(compiled, i)
    sync()
    compile_s = time.perf_counter() - start
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return 1
    measure(model, f"eager-{batch}", warmup=3)
    measure(compiled, f"compiled-{batch}", warmup=2)["compile_s"] = compile_s
    if batch == 16:
        matmul_flops = (fpt - 12 * config.n_layer * config.n_embd * T) * batch * T  # 6 x matmul parameters per token
        result["profile"] = profile(lambda i: step(compiled, i), matmul_flops, peak)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print("DONE", flush=True)
    return 0


def profile(step, matmul_flops_per_step: float, peak: float | None, steps: int = 3) -> dict:
    """Where the compiled step's time goes: GPU kernel time by class (torch.profiler), idle GPU time, and the rate the
    matmul kernels reach (the weight matmuls' FLOPs over the time of the kernels classed as matmul)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    try:
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for i in range(steps):
                step(i)
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - start) * 1e6
        classes = {
            "matmul": ("gemm", "cutlass", "nvjet", "sm90", "xmma", "cublas", "matmul"),
            "attention": ("flash", "fmha", "attention", "efficient"),
            "optimizer": ("adam", "multi_tensor", "foreach"),
            "fused elementwise (triton)": ("triton",),
        }
        times = dict.fromkeys([*classes, "other kernels"], 0.0)
        for evt in prof.events():
            if "CUDA" not in str(getattr(evt, "device_type", "")):
                continue
            us = evt.time_range.elapsed_us()
            name = evt.name.lower()
            kind = next((k for k, words in classes.items() if any(w in name for w in words)), "other kernels")
            times[kind] += us
        busy = sum(times.values())
        out = {
            "steps": steps,
            "wall_ms_per_step": wall_us / steps / 1e3,
            "kernel_ms_per_step": {k: v / steps / 1e3 for k, v in times.items()},
            "share_of_wall": {k: v / wall_us for k, v in times.items()},
            "gpu_idle_share": max(0.0, 1 - busy / wall_us),
        }
        if peak and times["matmul"]:
            out["matmul_kernels_fraction_of_peak"] = matmul_flops_per_step * steps / (times["matmul"] / 1e6) / peak
        return out
    except Exception as err:  # noqa: BLE001 - the profile is an explanation, not a result: never lose the timings for it
        return {"error": f"{type(err).__name__}: {err}"[:300]}


# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="docs/gpu_acceptance.md: the steps, the files, the device-tool command",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the steps and commands; run nothing"
    )
    mode.add_argument(
        "--prepare", action="store_true", help="CPU machine: download the wheels, copy the data, check the size"
    )
    p.add_argument(
        "--out", default=None, help="output folder for results.json and gpu_acceptance.log (the device tool's $OUT)"
    )
    p.add_argument(
        "--work", default="/tmp/gpu_kit_work", help="work folder for models and checkpoints (emptied first)"
    )
    p.add_argument("--site", default=os.path.join(tempfile.gettempdir(), "site"),
                   help="where the carried wheels are installed (emptied first; default $TMP/site)")
    p.add_argument(
        "--budget_s", type=int, default=BUDGET_S, help=f"overall wall-clock budget in seconds (default {BUDGET_S})"
    )
    p.add_argument("--only", default="", help="comma-separated steps to run (install and env always run)")
    p.add_argument("--rerun-failed", "--rerun_failed", dest="rerun_failed", default=None, metavar="RESULTS_JSON",
                   help="run only the steps an earlier run's results.json records as not ok (and install, env)")
    p.add_argument(
        "--use_image_versions",
        action="store_true",
        help="keep the image's own versions of the packages gpu_wheels.txt marks `override`",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--go_file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s < 60:
        p.error(f"--budget_s {args.budget_s} is too short to run anything; give at least 60 (default {BUDGET_S})")
    if args.rerun_failed:
        if args.only:
            p.error("--rerun-failed picks the steps itself; drop --only")
        names = failed_steps(Path(args.rerun_failed))
        if not names:
            print(f"nothing to rerun: every step of {args.rerun_failed} was ok")
            return 0
        args.only = ",".join(names)
    # absolute: they go into PYTHONPATH and commands of processes that may run in other folders
    args.site, args.work = os.path.abspath(args.site), os.path.abspath(args.work)
    if args.child:
        child = {"install": child_install, "env": child_env_report, "mfu": child_mfu, "mfu_shape": child_mfu_shape}[
            args.child
        ]
        return child(args)
    if args.prepare:
        return prepare()
    if args.dry_run:
        return dry_run(args)
    if not args.out:
        p.error("--out DIR is required (where results.json and gpu_acceptance.log go); or --dry-run / --prepare")
    return run_kit(args)


if __name__ == "__main__":
    sys.exit(main())
