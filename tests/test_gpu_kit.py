"""The GPU acceptance kit on a CPU: its dry run and plan, a skip under the kit failing its step, the wheel list, the
job scheduler, the targets and summary. (The kit itself runs on a GPU machine: benchmarks/gpu_acceptance.py,
docs/gpu_acceptance.md; tests/gpu themselves rehearse on CPU in the default test run.)"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile

import pytest
from conftest import REPO, run_script
from gpu import kit


@pytest.fixture(scope="module")
def acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", REPO / "benchmarks" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_every_step_with_its_command_and_the_device_call(acceptance, capsys):
    assert acceptance.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for step in ("install", "env", "tests_core", "tests_pretrain", "bench_mfu", "tests_plan"):
        assert f"\n{step}  (limit " in out, step
    for test_file in (
        "test_fsdp_gpu.py",
        "test_finetune_gpu.py",
        "test_onefile_gpu.py",
        "test_plan_gpu.py",
        "test_pretrain_gpu.py",
    ):
        assert f"tests/gpu/{test_file}" in out and (REPO / "tests" / "gpu" / test_file).is_file()
    assert f"--child install --site {os.path.join(tempfile.gettempdir(), 'site')}" in out and "-m gpu" in out
    assert "--junitxml" in out  # each pytest step's verdict comes from its JUnit report
    assert "420 s budget" in out
    assert "timeout_s=480" in out and 'carry=[".whl", ".gpu_kit"]' in out
    assert "$OUT" in acceptance.DEVICE_COMMAND and len(acceptance.DEVICE_COMMAND) <= 2000
    assert "--only tests_plan --budget_s 160" in out  # the rerun command
    # --only keeps install and env, and names its unknown steps
    steps = acceptance.build_steps(
        argparse.Namespace(work="/tmp/w", site="/tmp/s", use_image_versions=False, only="bench_mfu")
    )
    assert [s.name for s in steps] == ["install", "env", "bench_mfu"]
    with pytest.raises(SystemExit, match="unknown step"):
        acceptance.build_steps(
            argparse.Namespace(work="/tmp/w", site="/tmp/s", use_image_versions=False, only="tests")
        )


def test_the_plan_fits_the_window_in_order_of_value(acceptance, capsys):
    """Caps add up to at most the 420 s budget, each job is killed inside its step's cap, and the recipes' first
    verdicts (tests_core) come first, then MFU, then the planner."""
    assert acceptance.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = re.findall(r"^  (\w+) +cap +(\d+) s, starts by +(\d+) s(?:; its recipe jobs are killed \d+ s before the "
                      r"cap \((\d+) s\))?", out, flags=re.M)
    assert [name for name, *_ in plan] == ["install", "env", "tests_core", "tests_pretrain", "bench_mfu", "tests_plan"]
    caps = [int(cap) for _, cap, _, _ in plan]
    total = int(re.search(r"total of the caps: (\d+) s", out)[1])
    assert total == sum(caps) <= 420 == acceptance.BUDGET_S, out
    assert acceptance.DEVICE_TIMEOUT_S > acceptance.BUDGET_S  # room to write results and kill a hung step
    for name, cap, _start, jobs in plan:
        assert int(cap) <= 420
        if name.startswith("tests_"):
            assert jobs and 0 < int(jobs) < int(cap), (name, cap, jobs)
    starts = {name: int(start) for name, _, start, _ in plan}
    assert starts["tests_core"] <= 60 and starts["tests_core"] + caps[2] <= 180  # its verdicts in ~2 minutes


def test_rerun_failed_runs_only_the_steps_that_were_not_ok(acceptance, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"steps": [
        {"name": "install", "status": "ok"}, {"name": "env", "status": "ok"},
        {"name": "tests_core", "status": "failed: 1 skipped, 5 passed"}, {"name": "tests_pretrain", "status": "ok"},
        {"name": "bench_mfu", "status": "timeout"}, {"name": "tests_plan", "status": "ok"},
    ]}))
    assert acceptance.failed_steps(results) == ["tests_core", "bench_mfu"]
    assert acceptance.main(["--dry-run", "--rerun-failed", str(results)]) == 0
    out = capsys.readouterr().out
    assert "\ntests_core  (limit" in out and "\nbench_mfu  (limit" in out and "\ntests_plan  (limit" not in out
    with pytest.raises(SystemExit, match="cannot read"):
        acceptance.failed_steps(tmp_path / "missing.json")


def test_bad_options_are_one_line_errors(acceptance, capsys):
    for argv, words in ((["--budget_s", "30"], "--budget_s 30 is too short"), ([], "--out DIR is required")):
        with pytest.raises(SystemExit) as exc:
            acceptance.main(argv)
        assert exc.value.code == 2
        assert words in capsys.readouterr().err


@pytest.mark.slow
def test_under_the_kit_a_gpu_test_that_cannot_run_fails_instead_of_skipping():
    """Launched by the kit without CUDA, tests/gpu fail with the reason (without the kit they rehearse on CPU)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/gpu run for real")
    r = run_script(["-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "tests/gpu/test_onefile_gpu.py"],
                   timeout=300, env={"GPU_KIT_LAUNCHED": "1"}, fresh=True)
    assert r.returncode == 1, r.stdout[-3000:]
    assert "2 errors" in r.stdout and "skipped" not in r.stdout and "passed" not in r.stdout, r.stdout[-3000:]
    assert "launched by the GPU kit but torch.cuda.is_available() is False" in r.stdout


@pytest.mark.slow
def test_a_skipped_test_makes_its_kit_step_fail(acceptance, tmp_path):
    """pytest exits 0 when tests skip; the kit reads its JUnit report and fails the step unless every test passed."""
    (tmp_path / "test_some.py").write_text(
        "import pytest\n\ndef test_ran():\n    pass\n\ndef test_skipped():\n    pytest.skip('no GPU')\n"
    )
    junit = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(junit),
           str(tmp_path / "test_some.py")]
    step = acceptance.Step("tests_x", cmd, 60, "a pytest step")
    with open(tmp_path / "log.txt", "w") as log:
        result = acceptance.wait_step(acceptance.start_step(step, dict(os.environ), log), 60, log, junit)
    assert result["rc"] == 0  # pytest itself calls this a success
    assert result["status"] == "failed: 1 passed, 1 skipped", result
    assert acceptance.junit_verdict(tmp_path / "none.xml") == (False, "no JUnit report (pytest did not finish)")
    junit.write_text('<testsuites><testsuite name="pytest" tests="0"></testsuite></testsuites>')
    assert acceptance.junit_verdict(junit) == (False, "no tests ran")
    junit.write_text('<testsuites><testsuite><testcase name="a"/><testcase name="b"/></testsuite></testsuites>')
    assert acceptance.junit_verdict(junit) == (True, "2 passed")


def test_wheel_list_pins_one_version_of_each_missing_package(acceptance):
    pins, fallbacks, image = acceptance.read_wheel_list()
    versions = {p.name: p.version for p in pins}
    for name in ("trl", "datasets", "dill", "multiprocess", "bitsandbytes"):  # what the GPU image lacks
        assert name in versions, name
    assert versions["bitsandbytes"].startswith(
        "0.50."
    )  # ships libbitsandbytes_cuda130.so (the image's torch is cu130)
    assert {p.name for p in pins if p.override} <= {"transformers", "peft"}
    # The image's transformers (5.17) is below setup.cfg's floor: the carried one must meet it, or lora.py and
    # qlora.py stop at argument parsing on the GPU. pynvml (nvidia-ml-py) measures the CUDA context there.
    from packaging.requirements import Requirement
    from packaging.version import Version

    floor = next(Requirement(line.strip()) for line in (REPO / "setup.cfg").read_text().splitlines()
                 if line.strip().startswith("transformers"))
    assert floor.specifier.contains(Version(versions["transformers"])), (floor, versions["transformers"])
    assert "nvidia-ml-py" in versions
    assert [(f.name, f.fallback_if) for f in fallbacks] == [("datasets", "pyarrow<24")]
    assert {"torch", "pyarrow", "accelerate", "huggingface-hub"} <= set(image)

    with pytest.raises(ValueError, match="twice"):
        acceptance.parse_wheel_list("trl==1.0\ntrl==1.1\n")
    with pytest.raises(ValueError, match="name==version"):
        acceptance.parse_wheel_list("trl>=1.0\n")
    with pytest.raises(ValueError, match="unknown word"):
        acceptance.parse_wheel_list("trl==1.0 sometimes\n")
    with pytest.raises(ValueError, match="replaces no pinned package"):
        acceptance.parse_wheel_list("trl==1.0\ndatasets==4.8.5 fallback-if pyarrow<24\n")


def test_install_picks_the_fallback_and_keeps_image_versions_when_asked(acceptance, tmp_path):
    pins, fallbacks, _ = acceptance.parse_wheel_list(
        "transformers==5.24.0 override\ndatasets==5.2.0\nmultiprocess==0.70.19\n"
        "datasets==4.8.5 fallback-if pyarrow<24\n"
    )
    old_arrow = {"pyarrow": "23.0.1"}.get
    chosen = acceptance.install_choice(pins, fallbacks, old_arrow, use_image_versions=False)
    assert [p.spec for p, _ in chosen] == ["transformers==5.24.0", "datasets==4.8.5", "multiprocess==0.70.19"]
    assert "pyarrow 23.0.1" in chosen[1][1]
    new_arrow = {"pyarrow": "26.0.1"}.get
    chosen = acceptance.install_choice(pins, fallbacks, new_arrow, use_image_versions=True)
    assert [p.spec for p, _ in chosen] == ["datasets==5.2.0", "multiprocess==0.70.19"]

    for name in (
        "multiprocess-0.70.19-py312-none-any.whl",
        "multiprocess-0.70.18-py312-none-any.whl",
        "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
    ):
        (tmp_path / name).write_bytes(b"")
    assert acceptance.wheel_file(pins[2], tmp_path).name == "multiprocess-0.70.19-py312-none-any.whl"
    assert acceptance.wheel_file(acceptance.Pin("bitsandbytes", "0.50.2"), tmp_path) is not None
    assert acceptance.wheel_file(acceptance.Pin("bitsandbytes", "0.50.1"), tmp_path) is None


def test_jobs_start_after_their_prerequisites_and_a_hung_one_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(kit, "_WORK", tmp_path)
    py = [sys.executable, "-c"]
    jobs = kit.run_jobs(
        [
            kit.Job("first", [*py, f"open({str(tmp_path / 'first.txt')!r}, 'w').write('1')"], folder=tmp_path / "f"),
            kit.Job("second", [*py, f"assert open({str(tmp_path / 'first.txt')!r}).read() == '1'"], after=("first",)),
            kit.Job("broken", [*py, "raise SystemExit(3)"]),
            kit.Job("after_broken", [*py, "pass"], after=("broken",)),
            kit.Job("hung", [*py, "import time; time.sleep(60)"], timeout=1.0),
        ],
        max_parallel=2,
    )
    assert [jobs[n].rc for n in ("first", "second", "broken", "after_broken", "hung")] == [0, 0, 3, -2, -9]
    assert "not started: broken failed" in jobs["after_broken"].log.read_text()
    assert "killed after 1 s" in jobs["hung"].tail() and jobs["hung"].seconds < 30


def test_jobs_are_killed_at_the_kit_steps_deadline(tmp_path, monkeypatch):
    """Inside a kit step every job goes before the step's own limit, so its test fails with the log (and pytest
    reports it) instead of the whole step being killed with no outcome."""
    import time

    monkeypatch.setattr(kit, "_WORK", tmp_path)
    monkeypatch.setenv("GPU_KIT_DEADLINE", str(time.time() + 1.0))
    jobs = kit.run_jobs([kit.Job("long", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=600)])
    assert jobs["long"].rc == -9 and jobs["long"].seconds < 30
    assert "killed at the kit step's deadline" in jobs["long"].tail()


def test_targets_are_pass_fail_lines_and_an_unmeasured_one_fails(acceptance):
    records = {
        "pretrain_compiled_124m": [{"mfu_median_after_compile": 0.47}],
        "bench_lora_vs_qlora": [{"350m": {"peak_ratio": 0.55, "step_time_ratio": 1.4}}],
        "plan_gpu_summary": [{"worst": 0.21}],
    }
    mfu = {
        "runs": {
            "compiled-16": {"mfu": 0.44, "tokens_per_s": 5e5, "ms_per_step": 33.0, "peak_gib": 20.0, "compile_s": 50.0}
        }
    }
    targets = acceptance.evaluate_targets(records, mfu)
    assert [t["verdict"] for t in targets] == ["PASS", "FAIL", "PASS", "FAIL", "FAIL"]
    assert acceptance.target_lines(targets)[0] == (
        "PASS    pretrain.py 124M bf16+compile 16x1024 MFU (its log): 0.470 (target >= 0.45; step tests_pretrain)"
    )
    # a step that ran without producing its figure fails the target; a step not run in this call is "not run"
    partial = acceptance.evaluate_targets({}, None, steps_run={"tests_pretrain", "tests_core"})
    assert [t["verdict"] for t in partial] == ["FAIL", "not run", "not run", "not run", "not run"]
    assert "not measured (target >= 0.45" in acceptance.target_lines(partial)[0]
    results = {
        "machine": {"gpu_name": "NVIDIA H200", "driver": "580", "versions": {"torch": "2.11.0"}},
        "steps": [{"name": "tests_plan", "status": "failed: 1 failed, 1 skipped", "seconds": 9.0, "limit_s": 90,
                   "tests": "1 failed, 1 skipped"}],
        "tests": [
            {
                "test": "tests/gpu/test_plan_gpu.py::test_a",
                "when": "call",
                "outcome": "failed",
                "message": "AssertionError: planner off",
            },
            {
                "test": "tests/gpu/test_plan_gpu.py::test_b",
                "when": "setup",
                "outcome": "skipped",
                "message": "Skipped: needs a CUDA GPU",
            },
        ],
        "bench_mfu": mfu,
        "targets": targets,
    }
    text = acceptance.summary(results)
    assert "NVIDIA H200" in text and "1 failed, 1 skipped" in text and "planner off" in text
    assert "1 skipped (a failure here): Skipped: needs a CUDA GPU" in text and "compiled-16" in text
    assert "44.0%" in text and "FAIL    QLoRA / LoRA step time at 350M: 1.400 (target <= 1.2" in text
