"""The GPU acceptance kit on a CPU: its dry run, the gpu tests' clean skip, the wheel list, the job scheduler, the
results summary. (The kit itself runs on a GPU machine: benchmarks/gpu_acceptance.py, docs/gpu_acceptance.md.)"""

from __future__ import annotations

import argparse
import importlib.util
import os
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
    for step in ("install", "env", "tests_core", "tests_pretrain", "tests_plan", "bench_mfu"):
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
    assert "480 s budget" in out
    assert "timeout_s=560" in out and 'carry=[".whl", ".gpu_kit"]' in out
    assert "$OUT" in acceptance.DEVICE_COMMAND and len(acceptance.DEVICE_COMMAND) <= 2000
    # --only keeps install and env, and names its unknown steps
    steps = acceptance.build_steps(
        argparse.Namespace(work="/tmp/w", site="/tmp/s", use_image_versions=False, only="bench_mfu")
    )
    assert [s.name for s in steps] == ["install", "env", "bench_mfu"]
    with pytest.raises(SystemExit, match="unknown step"):
        acceptance.build_steps(
            argparse.Namespace(work="/tmp/w", site="/tmp/s", use_image_versions=False, only="tests")
        )


def test_bad_options_are_one_line_errors(acceptance, capsys):
    for argv, words in ((["--budget_s", "30"], "--budget_s 30 is too short"), ([], "--out DIR is required")):
        with pytest.raises(SystemExit) as exc:
            acceptance.main(argv)
        assert exc.value.code == 2
        assert words in capsys.readouterr().err


def test_gpu_tests_are_collected_and_skipped_with_the_reason_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/gpu run instead of skipping")
    r = run_script(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "13 skipped" in r.stdout and "passed" not in r.stdout and "failed" not in r.stdout
    assert "needs a CUDA GPU (torch.cuda.is_available() is False)" in r.stdout
    assert "benchmarks/gpu_acceptance.py" in r.stdout  # the reason says where they run


def test_wheel_list_pins_one_version_of_each_missing_package(acceptance):
    pins, fallbacks, image = acceptance.read_wheel_list()
    versions = {p.name: p.version for p in pins}
    for name in ("trl", "datasets", "dill", "multiprocess", "bitsandbytes"):  # what the GPU image lacks
        assert name in versions, name
    assert versions["bitsandbytes"].startswith(
        "0.50."
    )  # ships libbitsandbytes_cuda130.so (the image's torch is cu130)
    assert {p.name for p in pins if p.override} <= {"transformers", "peft"}
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


def test_targets_and_summary_from_records(acceptance):
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
    assert [t["met"] for t in targets] == [True, False, True, False, False]
    results = {
        "machine": {"gpu_name": "NVIDIA H200", "driver": "580", "versions": {"torch": "2.11.0"}},
        "steps": [{"name": "install", "status": "ok", "seconds": 9.0, "limit_s": 90}],
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
    assert "1 skipped: Skipped: needs a CUDA GPU" in text and "compiled-16" in text and "44.0%" in text
    assert "QLoRA / LoRA step time at 350M" in text and " NO" in text


@pytest.mark.slow
def test_probe_and_plan_runner_work_with_the_recipes_on_cpu(tmp_path, tiny_tokenizer_dir, small_text_file):
    """The two harnesses the gpu tests depend on, on a tiny model: the probe records the setup, the first step and
    the trained model's logits; the plan runner runs two configurations in one process and stops each after
    training. (On CPU the memory figures are 0: they are torch.cuda's.)"""
    import json

    def args(out, batch):
        return [
            "--preset",
            "gpt2-nano",
            "--tokenizer_name",
            str(tiny_tokenizer_dir),
            "--train_file",
            str(small_text_file),
            "--block_size",
            "32",
            "--per_device_train_batch_size",
            str(batch),
            "--max_steps",
            "3",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--sample_max_new_tokens",
            "1",
            "--data_cache_dir",
            str(tmp_path / "cache"),
            "--output_dir",
            str(out),
        ]

    probe_dir = tmp_path / "probed"
    r = run_script(
        [str(kit.PROBE), "--probe_dir", str(probe_dir), "recipes/pretrain.py", *args(probe_dir, 4)],
        timeout=300,
        env={"PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    probe = kit.probe(probe_dir)
    assert probe["setup"]["n_params"] == 28 and probe["setup"]["optimizer"].endswith("AdamW")
    assert probe["first_step"] == {"global_step": 0, "optimizer_state_steps": []}
    assert len(probe["end"]["checksums"]) == 28 and kit.probe_logits(probe_dir).shape == (2, 128, 512)
    assert (probe_dir / "model.safetensors").exists()  # the recipe went on to export as usual

    specs = [{"name": f"b{b}", "recipe": "recipes/pretrain.py", "args": args(tmp_path / f"b{b}", b)} for b in (2, 4)]
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    r = run_script(
        [
            str(kit.PROBE.with_name("plan_runner.py")),
            "--specs",
            str(tmp_path / "specs.json"),
            "--out",
            str(tmp_path / "measured.json"),
        ],
        timeout=300,
        env={"PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads((tmp_path / "measured.json").read_text())["runs"]
    assert sorted(runs) == ["b2", "b4"]
    for run in runs.values():
        assert "error" not in run and [s["step"] for s in run["steps"]] == [1, 2, 3], run
    assert not (tmp_path / "b2" / "model.safetensors").exists()  # stopped after training: no export
