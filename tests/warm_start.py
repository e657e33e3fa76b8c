"""Warm starts for the recipe runs of the tests: a fork server that has imported torch, transformers, accelerate,
datasets, peft and trl once, and forks a process for each run, which then runs the recipe exactly as
`python ARGS` would (same argv, environment, working directory, stdout/stderr, exit code).

Why: importing that stack costs ~10 s of CPU per process on the CI machine, and the suite starts ~170 processes,
many of them 2-rank launches whose ranks import it twice at once. The tests still run real, separate processes
(a crash, a hang or os._exit stays in its process, and a distributed run still has one process per rank): only
the imports are shared. The run's own code, the recipe and everything it imports from `toolkit`, is imported
afresh in each fork, from the working tree.

Where it applies (conftest.run_script): a run whose environment differs from the server's only in variables read
at run time (RANK, MASTER_PORT, OMP_NUM_THREADS, ...). A launcher (`-m torch.distributed.run`,
`-m accelerate.commands.launch`) started this way starts its ranks through `warm_python`, an executable that asks
the same server for the fork and relays signals and the exit status, so the ranks start warm too. Anything else
(another environment, a python option, the server gone) runs the real interpreter, as before. A run in the
background that a test signals, stops or kills starts warm through warm_python too (conftest.Background(warm=True);
the pid of the run itself, which a test signals, is written to $GPT2_TOOLKIT_WARM_PIDFILE); so do the benchmarks'
quick runs (conftest.warm_benchmark_runs) and the tests/gpu rehearsal's jobs (tests/gpu/kit.py, a server of its own).
Tests that watch what an interpreter prints while it imports, or measure a run's memory, start real ones
(run_script(fresh=True)). GPT2_TOOLKIT_TESTS_FRESH=1 turns warm starts off for a whole run;
GPT2_TOOLKIT_WARM_LOG=FILE logs which runs started warm, and why others did not.

    python tests/warm_start.py SOCKET         # a server (conftest.warm_server starts them)
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path

SOCKET_ENV = "GPT2_TOOLKIT_WARM_SOCKET"
PYTHON_ENV = "GPT2_TOOLKIT_WARM_PYTHON"  # the real interpreter, for warm_python's fallback
PIDFILE_ENV = "GPT2_TOOLKIT_WARM_PIDFILE"  # where warm_python writes the pid of the run it relays
FRESH_ENV = "GPT2_TOOLKIT_TESTS_FRESH"
SHIM = Path(__file__).resolve().parent / "warm_python"
PRELOAD = ("numpy", "torch", "torch.distributed.run", "transformers", "transformers.trainer",
           "transformers.models.gpt2.modeling_gpt2", "accelerate", "accelerate.commands.launch", "datasets",
           "tokenizers", "safetensors.torch", "peft", "trl", "psutil", "matplotlib.pyplot")
# Read when a run starts, not when a library is imported, so a fork of the server honours them: what a launcher
# gives each rank, and the thread count (applied with torch.set_num_threads: OpenMP read it at the server's import).
RUNTIME_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
                "CUDA_VISIBLE_DEVICES", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCHINDUCTOR_CACHE_DIR",
                "PYTHONUNBUFFERED", "PWD", "OLDPWD", "SHLVL", "_")  # the last four: what warm_python's sh sets
LAUNCHERS = ("torch.distributed.run", "accelerate.commands.launch")  # `-m` modules that start ranks with python
RUNTIME_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "FSDP_", "NCCL_", "PYTEST_", "GPU_KIT_", "GPT2_TOOLKIT_")


def refusal(argv: list[str], env: dict, base_env: dict) -> str | None:
    """Why a run cannot start from the server (None: it can). argv as given to python: a script, -m MODULE or
    -c CODE, after an optional -u; env: differing from the server's only in variables read at run time."""
    args = argv[1:] if argv[:1] == ["-u"] else argv
    if not args or (args[0].startswith("-") and args[0] not in ("-m", "-c")) or (args[0] in ("-m", "-c")
                                                                                  and len(args) < 2):
        return f"python options {argv[:2]}"
    differ = differing_vars(env, base_env)
    return f"environment differs in {differ}" if differ else None


def enabled() -> bool:
    """False when GPT2_TOOLKIT_TESTS_FRESH asks for a real interpreter for every run."""
    return os.environ.get(FRESH_ENV, "") in ("", "0")


def log(entry: dict) -> None:
    """A line of JSON in $GPT2_TOOLKIT_WARM_LOG, when set: which runs started warm, which not and why."""
    if os.environ.get("GPT2_TOOLKIT_WARM_LOG"):
        with open(os.environ["GPT2_TOOLKIT_WARM_LOG"], "a") as f:
            f.write(json.dumps(entry) + "\n")


def differing_vars(env: dict, base_env: dict) -> list[str]:
    """The variables, other than those read at run time, whose values differ between the two environments."""
    return sorted(k for k in set(env) | set(base_env) if env.get(k) != base_env.get(k) and k not in RUNTIME_VARS
                  and not k.startswith(RUNTIME_PREFIXES))


# --------------------------------------------------------------------------------------------------------------
# Messages: 4-byte length + JSON; file descriptors ride along with the request (SCM_RIGHTS)
# --------------------------------------------------------------------------------------------------------------

def _send(conn: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = json.dumps(message).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(conn, [payload], list(fds))
    else:
        conn.sendall(payload)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("warm start server closed the connection")
        data += chunk
    return data


def _recv(conn: socket.socket) -> dict:
    (n,) = struct.unpack("!I", _recv_exact(conn, 4))
    return json.loads(_recv_exact(conn, n))


# --------------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------------

def _run_child(conn: socket.socket, message: dict, fds: list[int], added_env: dict) -> None:
    """In the fork: become `python ARGV` and exit with its status."""
    if sys.platform.startswith("linux"):  # the server killed (its pytest process ended): so is this run
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(message["cwd"])
    env = message["env"]
    os.environ.clear()
    os.environ.update({**added_env, **env})  # what the libraries set while importing, as in a fresh process
    import random
    import threading

    random.seed()  # a fresh interpreter's, not the server's (every fork would share it)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    import torch

    if env.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))

    def watch_client():  # the client gone (killed, or it gave up waiting): so is this run
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch_client, daemon=True).start()
    argv = message["argv"]
    args = argv[1:] if argv[:1] == ["-u"] else argv
    if args[0] == "-m" and args[1] in LAUNCHERS:
        sys.executable = str(SHIM)  # its ranks start warm too (warm_python falls back to the real interpreter)
    import runpy

    code = 0
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path[0] = message["cwd"]
            sys.modules.pop(args[1], None)  # preloaded (a launcher): run afresh as __main__, as `python -m` does
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path[0] = ""
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(args)
            sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()  # non-daemon threads are joined at exit, as in a normal interpreter
    except Exception:  # noqa: BLE001
        pass
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code & 0xFF)


def serve(sock_path: str) -> None:
    import importlib

    base_env = dict(os.environ)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - not installed: the run imports it itself (and fails as it would)
            pass
    added_env = {k: v for k, v in os.environ.items() if k not in base_env}
    # A fork copies only the forking thread. The native pools started at import (OpenBLAS, pyarrow's jemalloc) are
    # fork-aware, as every DataLoader worker forked after these imports relies on; a Python thread would not be.
    import threading

    threads = threading.active_count()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(64)
    print(json.dumps({"ready": threads == 1, "threads": threads}), flush=True)
    if threads != 1:
        return
    children: dict[int, socket.socket] = {}
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.data is not None:  # a run's client hung up (it sends nothing after its request): the run goes too
                selector.unregister(key.fileobj)
                try:
                    os.kill(key.data, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                continue
            if key.fileobj is not server:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            conn, _ = server.accept()
            try:
                payload, fds, _, _ = socket.recv_fds(conn, 4, 3)
                (n,) = struct.unpack("!I", payload)
                message = json.loads(_recv_exact(conn, n))
            except (OSError, ValueError, struct.error):
                conn.close()
                continue
            why = refusal(message["argv"], message["env"], base_env) if len(fds) == 3 else "no stdio given"
            log({"argv": message["argv"][:3], "refused": why})
            if why:
                for fd in fds:
                    os.close(fd)
                try:
                    _send(conn, {"refused": why})
                except OSError:
                    pass
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                try:
                    selector.close()
                    server.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for other in children.values():
                        other.close()
                    _run_child(conn, message, fds, added_env)
                finally:
                    os._exit(70)
            for fd in fds:
                os.close(fd)
            children[pid] = conn
            # The run watches its client itself too, but a run stuck holding Python's lock cannot (a deadlock in a
            # library's teardown): here the client's hang-up kills it whatever state it is in.
            selector.register(conn, selectors.EVENT_READ, data=pid)
            try:
                _send(conn, {"pid": pid})
            except OSError:
                pass
        while children:  # the runs that ended: their status to whoever asked for them
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    selector.unregister(conn)
                except KeyError:  # unregistered when its client hung up
                    pass
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                try:
                    _send(conn, {"returncode": code})
                except OSError:
                    pass
                conn.close()


# --------------------------------------------------------------------------------------------------------------
# Clients: the tests' run_script, and warm_python (a launcher's ranks)
# --------------------------------------------------------------------------------------------------------------

def request(sock_path: str, argv: list[str], env: dict, cwd: str, fds: list[int]) -> tuple[socket.socket, int] | None:
    """Ask the server for a run with stdin, stdout, stderr = fds: (connection, pid), or None where it cannot (the
    caller starts the real interpreter). The exit status comes on the connection (wait()); closing it kills the run."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(sock_path)
        _send(conn, {"argv": list(argv), "env": dict(env), "cwd": str(cwd)}, fds)
        reply = _recv(conn)
    except (OSError, ConnectionError, ValueError):
        conn.close()
        return None
    if "pid" not in reply:
        conn.close()
        return None
    return conn, reply["pid"]


def wait(conn: socket.socket) -> int:
    """The run's exit status as Popen.returncode gives it (-N: killed by signal N)."""
    try:
        return _recv(conn)["returncode"]
    finally:
        conn.close()


class Server:
    """A fork server for a pytest process, started on first use (the imports take it ~10 s) and again when that
    process's environment changes (conftest.warm_server), stopped at exit."""

    def __init__(self, env: dict, tmp_dir: str):
        import subprocess

        self.sock_path = os.path.join(tmp_dir, f"warm-{time.monotonic_ns()}.sock")
        self.env = dict(env)
        self.proc = subprocess.Popen([sys.executable, __file__, self.sock_path],
                                     env={**env, PYTHON_ENV: sys.executable}, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        self.ready = json.loads(line).get("ready", False) if line.startswith("{") else False

    def shim_env(self) -> dict:
        """What warm_python needs in its environment to start its runs from this server."""
        return {SOCKET_ENV: self.sock_path, PYTHON_ENV: sys.executable}

    def shim_start(self, args: list[str]) -> tuple[list[str], dict, Path]:
        """`python ARGS` through warm_python, for a process of one's own: the command, what its environment needs, and
        the file where warm_python writes the pid of the run it relays (read_pid; in the server's folder, removed with
        it)."""
        import tempfile

        handle, name = tempfile.mkstemp(suffix=".pid", dir=os.path.dirname(self.sock_path))
        os.close(handle)
        return [str(SHIM), *args], {**self.shim_env(), PIDFILE_ENV: name}, Path(name)

    def run(self, argv: list[str], env: dict, cwd, timeout: float):
        """`python ARGV` from the server: a CompletedProcess, or None where it cannot start there. Past `timeout`,
        the run and all it started are killed and subprocess.TimeoutExpired raised, as Popen.communicate does."""
        import subprocess
        import threading

        if not self.ready or self.proc.poll() is not None:
            return None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            started = request(self.sock_path, argv, {**env, **self.shim_env()}, cwd, [null, out_w, err_w])
        finally:
            for fd in (null, out_w, err_w):
                os.close(fd)
        if started is None:
            os.close(out_r)
            os.close(err_r)
            return None
        conn, pid = started
        chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

        def drain(fd):
            with os.fdopen(fd, "rb") as f:
                chunks[fd].append(f.read())

        readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
        for reader in readers:
            reader.start()
        conn.settimeout(timeout)
        try:
            code = wait(conn)
        except BaseException:  # a timeout, or the test stopped: the run and everything it started
            kill_tree(pid)
            conn.close()
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout) from None
        for reader in readers:
            reader.join(timeout=60)
        decode = lambda fd: b"".join(chunks[fd]).decode(errors="replace")  # noqa: E731
        return subprocess.CompletedProcess([sys.executable, *argv], code, decode(out_r), decode(err_r))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def read_pid(pidfile: Path) -> int | None:
    """The pid warm_python wrote (the run it relays, or its own where the server refused); None until it has."""
    text = pidfile.read_text()
    return int(text) if text else None


def kill_tree(pid: int) -> None:
    """Kill a process and everything it started (launchers start workers in sessions of their own), and wait until
    they are gone; a child of this process is left for its Popen to reap, so that it reads the signal."""
    import psutil

    try:
        root = psutil.Process(pid)
        descendants = root.children(recursive=True)
        ours = root.ppid() == os.getpid()
    except psutil.NoSuchProcess:
        return
    for p in [*descendants, root]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants if ours else [*descendants, root], timeout=30)


def shim(argv: list[str]) -> None:
    """warm_python ARGS: `python ARGS` from the server named by the environment, else the real interpreter."""
    real = os.environ.get(PYTHON_ENV) or sys.executable
    sock_path = os.environ.get(SOCKET_ENV)
    pidfile = os.environ.pop(PIDFILE_ENV, None)  # this run's: not for the processes it starts (a launcher's ranks)
    started = request(sock_path, argv, dict(os.environ), os.getcwd(), [0, 1, 2]) if sock_path else None
    if started is None:
        if pidfile:  # the real interpreter runs it in this process
            Path(pidfile).write_text(str(os.getpid()))
        os.execv(real, [real, *argv])
    conn, pid = started
    if pidfile:
        Path(pidfile).write_text(str(pid))

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    try:
        code = wait(conn)
    except ConnectionError:
        code = 1
    if code < 0:  # end the way the run ended, so a launcher reports the same signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--shim"]:
        shim(argv[1:])
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    serve(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
