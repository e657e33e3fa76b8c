"""Shared fixtures: a tiny GPT-2 and a tokenizer made locally (no Hub), and ../shared data paths."""

from __future__ import annotations

import atexit
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Before anything imports huggingface_hub (it reads these once, at import): no test reaches the real Hub, and a
# machine's stored login (HF_HOME/token) or token variables cannot make a test push anywhere. Tests that talk to a
# Hub start a local server and pass its address and a test token to a fresh process (tests/test_hub.py).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="gpt2-toolkit-tests-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN"):
    os.environ.pop(_var, None)
# Under pytest-xdist each worker, and every run it starts, gets its share of the cores: torch's default (one thread
# per core in every process) has the workers' runs contend for the same cores, which costs far more than their
# threads gain at these tiny sizes. Set before torch is imported: OpenMP reads it once.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit() and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"

# CI has ../shared and the [dev] extra: there, a test that needs them fails when they are missing instead of skipping,
# so the only runs with GPT-2's 50,257-token vocabulary (and the lm-eval tests) cannot vanish. Locally they skip.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SHARED_REASON = "needs ../shared/data (tinyshakespeare, gpt2-tokenizer) beside the checkout"

needs_shared = pytest.mark.needs_shared


# The files whose tests take longest (recipe runs, launches), longest first (summed `--durations` of the suite).
# With `-n 2 --dist loadfile` each file is one unit of work, handed out in collection order; pytest-xdist would sort
# the files by their number of tests, which puts the few long multi-process tests last, where one worker runs them
# while the other has nothing left. Longest first lets the short files fill in at the end.
LONGEST_FILES = [
    "test_plan.py", "test_own_output.py", "test_reliability_distributed.py", "test_benchmarks.py",
    "test_token_store.py", "test_finetune_gpu.py", "test_fsdp_gpu.py", "test_plan_gpu.py", "test_pretrain_gpu.py",
    "test_onefile_gpu.py", "test_preflight.py", "test_generate_eval.py", "test_distributed.py", "test_guard.py",
    "test_onefile.py", "test_flags_pretrain.py", "test_pretrain.py", "test_reliability.py", "test_flags_tools.py",
    "test_elastic_resume.py", "test_args.py", "test_lora.py", "test_hub.py", "test_configs.py", "test_core.py",
    "test_imports.py", "test_gpu_kit.py", "test_reliability_lora.py", "test_warm_start.py", "test_flags_finetune.py",
]


def pytest_configure(config):
    if getattr(config.option, "dist", "no") == "loadfile" and hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # the order is LONGEST_FILES' (pytest_collection_modifyitems)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with tests/gpu as one unit of work: its files share the session's core runs (the CPU
    rehearsal's recipe runs, tests/gpu/conftest.py), which one worker then makes once instead of each worker again."""
    if getattr(config.option, "dist", "no") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class TestsGpuTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "tests/gpu" if scope.replace(os.sep, "/").startswith("tests/gpu/") else scope

    return TestsGpuTogether(config, log)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """tests/gpu are `slow` too (on CPU they rehearse the GPU acceptance runs with real recipe runs). Under
    pytest-xdist, the files in LONGEST_FILES come first, in its order (each file's tests stay together and in their
    order); the rest keep theirs. A run in one process keeps the plain collection order."""
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.slow)
    if not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_shared") and not (SHAKESPEARE.exists() and GPT2_TOKENIZER.exists()):
        if IN_CI:
            pytest.fail(f"{SHARED_REASON}, and CI must have it", pytrace=False)
        pytest.skip(SHARED_REASON)


def require_dev(module: str):
    """Import a package of the [dev] extra: a skip with the reason locally, a failure in CI."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{module} is missing: CI installs the [dev] extra (pip install -e '.[dev]')", pytrace=False)
        pytest.skip(f"{module} is part of the [dev] extra (pip install -e '.[dev]')")


@pytest.fixture(autouse=True)
def _environment_restored():
    """What a test leaves in this process's environment is undone after it: a variable an in-process run set (a
    config's `env:` section) or a library imported during it (lm_eval sets HF_XET_HIGH_PERFORMANCE, sklearn
    KMP_DUPLICATE_LIB_OK). The next test's runs then start in the environment they would have had without it, and
    from the same warm start server (conftest.warm_server starts another one when the environment changes)."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


class _CurrentStderr:
    """sys.stderr as it is at each write, not as it was when a logging handler was made."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def _transformers_logs_to_the_current_stderr():
    """transformers' log handler is made once per process, bound to the sys.stderr of that moment: in a test that
    reads stderr (capsys), a stream closed when that test ended. A later test's warning from transformers would then
    print "--- Logging error ---" and a traceback into its own stderr. Bound to the current one instead."""
    if "transformers" in sys.modules:
        import logging

        for handler in logging.getLogger("transformers").handlers:
            if type(handler) is logging.StreamHandler and not isinstance(handler.stream, _CurrentStderr):
                handler.stream = _CurrentStderr()  # (setStream would flush the closed one first)
                handler.flush = handler.stream.flush  # transformers binds flush to the sys.stderr of that moment
    yield


@pytest.fixture(autouse=True)
def _recipes_run_in_this_process_exit_through_sys_exit(monkeypatch):
    """A recipe run here as __main__ (runpy) ends with toolkit.errors.exit_now, whose os._exit would end pytest
    itself, with status 0 and the remaining tests never run: in the test process it raises SystemExit instead."""
    from toolkit import errors

    monkeypatch.setattr(errors, "exit_now", lambda code=0: sys.exit(code))


def embedded_texts(limit: int | None = None) -> list[str]:
    import pydoc_data.topics as topics

    return [topics.topics[k] for k in sorted(topics.topics)][:limit]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE trained on the embedded corpus, saved as a tokenizer folder."""
    from toolkit.tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(embedded_texts(), vocab_size=512).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A randomly initialised 2-layer, 64-wide GPT-2 (fp32, seed 0) with its tokenizer, as a save_pretrained folder."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=len(tok),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_text_file(tmp_path_factory) -> Path:
    """~120k characters of English from the standard library docs, as a .txt training file."""
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n\n".join(embedded_texts(60)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def pretrain_reference(tmp_path_factory):
    """`pretrain_reference(args)`: (output folder, result) of one real `recipes/pretrain.py ARGS` run, made once per
    session for every test module that asks for the same arguments, so modules that compare against an
    uninterrupted reference run can share it instead of each training its own. The run gets its own output folder
    and, beside it, its own token cache (`out.parent / "cache"`)."""
    made: dict[tuple[str, ...], tuple[Path, subprocess.CompletedProcess]] = {}

    def run(args: list[str]) -> tuple[Path, subprocess.CompletedProcess]:
        key = tuple(args)
        if key not in made:
            out = tmp_path_factory.mktemp("pretrain-reference") / "out"
            result = run_script(["recipes/pretrain.py", *args, "--output_dir", str(out),
                                 "--data_cache_dir", str(out.parent / "cache")])
            assert result.returncode == 0, result.stderr[-3000:]
            made[key] = (out, result)
        return made[key]

    return run


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a launcher's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(env: dict | None = None) -> dict:
    """The environment of a recipe run by a test: this one (offline, no Hub token), unbuffered, plus `env`."""
    full_env = dict(os.environ)
    full_env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    return full_env


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a process and everything it started (launchers start workers in sessions of their own)."""
    import warm_start

    warm_start.kill_tree(proc.pid)
    proc.wait(timeout=60)


def run_script(args: list[str], timeout: int = 600, env: dict | None = None, cwd: Path = REPO,
               fresh: bool = False) -> subprocess.CompletedProcess:
    """Run a recipe/command as a real subprocess (fp32 CPU, no network) and return the result. If it outlives
    `timeout`, or the test is stopped (pytest-timeout), the process and its workers are killed.

    The process is forked from this pytest process's warm start server (tests/warm_start.py: torch, transformers,
    peft, trl imported once), a launcher's ranks too, unless `fresh` (a test of what a new interpreter prints, such
    as the import-time lines of a library) or the environment asks for imports of its own."""
    full_env = script_env(env)
    server = None if fresh else warm_server()
    result = server.run(args, full_env, cwd, timeout) if server else None
    if result is not None:
        return result
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        kill_tree(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


_WARM: list = []


def warm_server():
    """This pytest process's warm start server, started on first use; None when GPT2_TOOLKIT_TESTS_FRESH=1. A test
    or an in-process run can change this process's environment for good (a config's `env:` section, a library); a
    server started under another one is replaced, or every later run would start fresh."""
    import warm_start

    if not warm_start.enabled():
        return None
    env = script_env()
    if not _WARM:
        folder = tempfile.mkdtemp(prefix="gpt2-toolkit-warm-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        atexit.register(lambda: [server.stop() for server in _WARM])
    elif changed := warm_start.differing_vars(env, _WARM[-1].env):  # (the old one may still serve a background run)
        folder = os.path.dirname(_WARM[-1].sock_path)
        warm_start.log({"new server, the environment changed in": changed})
    else:
        return _WARM[-1]
    _WARM.append(warm_start.Server(env, folder))
    return _WARM[-1]


class Background:
    """A command running in the background; its stdout and stderr lines are collected as they come.

    `warm`: started from the warm start server through tests/warm_python, which relays signals and the exit status
    to and from the run (a fork of the server, not a child of this process): a test that stops the run or looks into
    its process tree (a launcher's workers) finds it at run_pid(). Not warm where a test signals the process group a
    launcher leads (a scheduler's SIGTERM to a whole job): the run's processes are not in it."""

    def __init__(self, args: list[str], env: dict | None = None, new_session: bool = False, warm: bool = False):
        full_env, command = script_env(env), [sys.executable, *args]
        server = warm_server() if warm else None
        self.pidfile = None
        if server is not None and server.ready:
            command, shim_env, self.pidfile = server.shim_start(args)
            full_env.update(shim_env)
        self.proc = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=new_session)
        self.new_session = new_session
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=lines.extend, args=(stream,), daemon=True)
                         for lines, stream in ((self.out, self.proc.stdout), (self.err, self.proc.stderr))]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run_pid(self, timeout: float = 60) -> int:
        """The pid of the process that runs the command: warm_python's fork of the server (what a test stops or
        kills as the run), or the Popen's own when not warm."""
        import time

        if self.pidfile is None:
            return self.proc.pid
        deadline = time.time() + timeout
        while (run := self._warm_run()) is None:  # warm_python writes the file once the server has answered
            assert self.proc.poll() is None and time.time() < deadline, "the warm run did not start"
            time.sleep(0.05)
        return run.pid

    def poll(self):
        return self.proc.poll()

    def _warm_run(self):
        """The process warm_python relays (None: not warm, or already gone)."""
        import psutil
        import warm_start

        try:
            pid = warm_start.read_pid(self.pidfile) if self.pidfile else None
            return psutil.Process(pid) if pid is not None else None
        except (OSError, ValueError, psutil.NoSuchProcess):
            return None

    def wait(self, timeout: float) -> int:
        """The exit code, once the process has ended and all its output has been read."""
        import psutil

        code = self.proc.wait(timeout=timeout)
        run = self._warm_run()
        if run is not None:  # killed with warm_python: it ends a moment later (it watches warm_python's socket)
            psutil.wait_procs([run], timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=30)
        return code

    def stdout(self) -> str:
        return "".join(self.out)

    def stderr(self) -> str:
        return "".join(self.err)

    def stop(self) -> None:
        if self.new_session:  # the group this run's launcher leads: its workers, even once the launcher is gone
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        run = self._warm_run()
        if self.proc.poll() is None:  # not reaped yet, so the pid is still this run's
            kill_tree(self.proc)
        if run is not None:
            import warm_start

            warm_start.kill_tree(run.pid)


@pytest.fixture
def background():
    """`start = background; run = start([...])`: commands in the background that are killed, with all they started,
    when the test ends, passed or failed, so a failing test leaves no training processes behind."""
    started: list[Background] = []

    def start(args: list[str], env: dict | None = None, new_session: bool = False, warm: bool = False) -> Background:
        run = Background(args, env, new_session, warm)
        started.append(run)
        return run

    yield start
    for run in started:
        if run.poll() is None or run.new_session or run.pidfile:
            run.stop()


@pytest.fixture
def warm_benchmark_runs(monkeypatch):
    """The one-process python runs of a benchmark's --quick mode (benchmarks/harness.py `start`) forked from the warm
    start server, as run_script's are: each still a process of its own, with its output and exit status, whose
    process tree the harness samples (found through warm_python's pid file). Its memory includes the server's imports:
    the quick tests check the pipeline and relations between runs, not sizes. A launcher, whose ranks would not be in
    that tree, and a run whose environment the server refuses, start as before."""
    import importlib

    import warm_start

    sys.path.insert(0, str(REPO / "benchmarks"))
    harness = importlib.import_module("harness")
    plain_start, server = harness.start, warm_server()

    def start(cmd: list[str], cwd, env: dict):
        launcher = cmd[1:2] == ["-m"] and cmd[2] in warm_start.LAUNCHERS
        if server is None or not server.ready or cmd[0] != sys.executable or launcher:
            return plain_start(cmd, cwd, env)
        command, shim_env, pidfile = server.shim_start(cmd[1:])
        proc, _ = plain_start(command, cwd, {**env, **shim_env})

        def run_pid() -> int | None:  # known once the server has answered; the shim's own if it ended first
            pid = warm_start.read_pid(pidfile)
            return pid if pid is not None or proc.poll() is None else proc.pid

        return proc, run_pid

    monkeypatch.setattr(harness, "start", start)


def recipe_in_process(recipe: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run recipes/<recipe>.py as `python recipes/<recipe>.py ARGV` would, in this process (same code path, no
    start-up cost); return its exit code, stdout and stderr."""
    old = sys.argv
    sys.argv = [f"recipes/{recipe}.py", *argv]
    capsys.readouterr()  # what earlier steps of the test printed is not this run's
    try:
        runpy.run_path(str(REPO / "recipes" / f"{recipe}.py"), run_name="__main__")
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_recipe_in_process(recipe: str, argv: list[str], capsys) -> tuple[int, str]:
    """recipe_in_process, for the tests that read only the exit code and the whole of stderr."""
    code, _, err = recipe_in_process(recipe, argv, capsys)
    return code, err


PROGRESS_BAR = re.compile(r"^(?:[^\[]*\[\d+:\d\d[^\]]*\])+")  # tqdm: "12%|#  | 5/40 [00:15<00:01, 28.22it/s]"


def one_error_line(stderr: str) -> str:
    """The whole stderr of a refused run must be one `error: ...` line; return it. Progress bars are not messages
    (the Trainer's, and the one datasets draws while it reads a file), so they are left out: tqdm redraws with
    carriage returns and leaves the cursor after the bar, where the error line then starts. A bar drawn below
    another (tqdm's position > 0, e.g. while a bar of an earlier in-process run is still open) also moves the cursor
    up with ESC[A: part of the bar, not a message."""
    stderr = stderr.replace("\x1b[A", "")
    lines = [text for part in re.split(r"[\r\n]", stderr) if (text := PROGRESS_BAR.sub("", part).strip())]
    assert len(lines) == 1 and lines[0].startswith("error"), f"expected one error line, got:\n{stderr[-3000:]}"
    return lines[0]


def card_rows(output_dir) -> dict[str, str]:
    """The two-column rows of a model card (README.md) in `output_dir`: {name: value}."""
    rows = {}
    for line in (Path(output_dir) / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows
