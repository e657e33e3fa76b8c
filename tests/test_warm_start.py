"""The tests' warm starts (tests/warm_start.py) behave as `python ARGS` does: what a run sees (argv, working
directory, environment, sys.path), what it prints, how it exits, and a launcher's ranks started warm as well."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, free_port, run_script, warm_server

pytestmark = pytest.mark.slow

SHOW = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "var": os.environ.get("WARM_TEST_VAR"),
                  "path0": sys.path[0], "parent": os.getppid(), "rank": os.environ.get("RANK")}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def server():
    server = warm_server()
    if server is None:
        pytest.skip("warm starts are off (GPT2_TOOLKIT_TESTS_FRESH)")
    return server


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "show.py"
    path.write_text(SHOW)
    return path


def test_a_warm_run_sees_and_does_what_a_fresh_one_does(server, script, tmp_path):
    import json

    for args in (["-c", SHOW, "3", "x y"], [str(script), "3", "x y"]):
        warm = run_script(args, cwd=tmp_path)
        fresh = run_script(args, cwd=tmp_path, fresh=True)
        seen_warm, seen_fresh = json.loads(warm.stdout), json.loads(fresh.stdout)
        assert seen_warm.pop("parent") == server.proc.pid  # a fork of the server ...
        assert seen_fresh.pop("parent") == os.getpid()  # ... against a child of this process
        assert seen_warm == seen_fresh and seen_warm["argv"][1:] == ["3", "x y"]
        assert (warm.returncode, warm.stderr) == (fresh.returncode, fresh.stderr) == (3, "to stderr\n")
    # an environment the server's imports may depend on gets a fresh interpreter
    other = run_script(["-c", SHOW, "0"], env={"HF_HUB_CACHE": str(tmp_path)})
    assert json.loads(other.stdout)["parent"] == os.getpid()
    # a variable read at run time does not
    rank = run_script(["-c", SHOW, "0"], env={"RANK": "5"})
    assert json.loads(rank.stdout)["parent"] == server.proc.pid and json.loads(rank.stdout)["rank"] == "5"
    # an uncaught exception and sys.exit("text") end as in the interpreter
    crash = run_script(["-c", "raise ValueError('boom')"])
    assert crash.returncode == 1 and crash.stderr.rstrip().endswith("ValueError: boom"), crash.stderr
    said = run_script(["-c", "import sys; sys.exit('a message')"])
    assert (said.returncode, said.stderr) == (1, "a message\n")


def test_a_launchers_ranks_start_warm_and_a_timeout_kills_the_run(server, script, tmp_path):
    import json

    import psutil

    result = run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                         str(script), "0"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == ["0", "1"]
    assert all(r["parent"] == server.proc.pid for r in ranks)  # forks of the server, not of torchrun
    # past its timeout the run is killed, as subprocess.communicate's timeout does
    marker = tmp_path / "pid"
    start = time.time()
    with pytest.raises(subprocess.TimeoutExpired):
        run_script(["-c", f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"],
                   timeout=3, cwd=REPO)
    assert time.time() - start < 30 and not psutil.pid_exists(int(marker.read_text()))


def test_the_server_runs_in_the_interpreter_of_the_tests(server):
    assert server.ready and server.proc.poll() is None
    assert os.path.realpath(psutil_exe(server.proc.pid)) == os.path.realpath(sys.executable)


def psutil_exe(pid: int) -> str:
    import psutil

    return psutil.Process(pid).exe()


def test_a_warm_background_run_gets_the_signals_and_dies_with_a_kill(server, background):
    import psutil

    code = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
            "print(os.getpid(), flush=True)\n"
            "time.sleep(60)\n")
    for how, expected in (("SIGTERM", 143), ("kill", -9)):
        run = background(["-c", code], warm=True)
        deadline = time.time() + 60
        while not run.out and time.time() < deadline:
            time.sleep(0.05)
        pid = int(run.out[0])
        assert pid != run.pid and run.pidfile is not None  # the fork, relayed by warm_python
        if how == "SIGTERM":
            run.proc.send_signal(15)
        else:
            run.proc.kill()
        assert run.wait(timeout=30) == expected
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_run_stuck_holding_pythons_lock_goes_when_its_client_does(server, background):
    """A run whose own watch of its client cannot run (a C call that holds the GIL, as a library's teardown deadlock
    does) is killed by the server once the client is gone, not left behind."""
    import psutil

    # a regex match in C that holds the GIL until the process is killed
    stuck = "import re\nprint('stuck', flush=True)\nre.match(r'(a+)+$', 'a' * 64 + 'b')\n"
    run = background(["-c", stuck], warm=True)
    deadline = time.time() + 60
    while not run.out and time.time() < deadline:
        time.sleep(0.05)
    pid = run.run_pid()
    assert run.out == ["stuck\n"] and pid != run.pid
    run.proc.kill()  # the client only
    psutil.Process(pid).wait(timeout=10)


def test_fresh_mode_starts_every_run_in_a_real_interpreter(monkeypatch, tmp_path):
    """GPT2_TOOLKIT_TESTS_FRESH=1 (README): no server, each run a child of the test process."""
    import json

    monkeypatch.setenv("GPT2_TOOLKIT_TESTS_FRESH", "1")
    assert warm_server() is None
    result = run_script(["-c", SHOW, "0"], cwd=tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout)["parent"] == os.getpid()
