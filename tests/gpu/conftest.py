"""GPU acceptance tests: every GPU-only path of the toolkit, run for real on one CUDA GPU.

    python benchmarks/gpu_acceptance.py --out DIR     # the whole kit: wheels, these tests, benchmarks
    python -m pytest -m gpu tests/gpu                 # these tests alone, on a GPU machine with the packages installed

Every test here carries the `gpu` marker (registered in setup.cfg). Without CUDA (CI, laptops) each one is skipped
with the reason, so `python -m pytest -q` stays green on CPU and counts them as skipped. On a GPU a missing package
(trl, bitsandbytes) is a failure, not a skip.

The runs that several tests compare are made once per session by `core_runs` (several at a time on the one GPU).
"""

from __future__ import annotations

import json
import os

import pytest

from . import kit


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    reason = kit.skip_reason() if gpu_items else None
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_logreport(report):
    """Each gpu test's outcome goes to GPU_KIT_RESULTS as soon as it is known (a run cut short keeps the earlier)."""
    path = os.environ.get("GPU_KIT_RESULTS")
    if not path or "tests/gpu/" not in report.nodeid.replace(os.sep, "/"):
        return
    if report.when == "call" or report.outcome != "passed":  # setup/teardown only when they fail or skip
        entry = {
            "test": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "seconds": round(report.duration, 1),
        }
        if report.outcome == "failed":
            entry["message"] = str(report.longrepr)[-1500:]
        elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            entry["message"] = report.longrepr[2]
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


@pytest.fixture(scope="session")
def work():
    return kit.work_dir()


@pytest.fixture(scope="session")
def init124(work):
    """A fresh 124M GPT-2 as pretrain.py builds one (padded vocabulary, no dropout, fused GELU), seed 0, tokenizer."""
    return kit.make_init(work / "init-124m")


@pytest.fixture(scope="session")
def core_runs(work, init124):
    """The recipe runs tests 2, 3, 4 and 6 check, started as soon as what they start from exists (4 at a time):

    eager     pretrain.py from init-124m, 8 x 1024, bf16 + sdpa, no compile, 20 steps: the reference run
    fsdp      the same through `accelerate launch` with fsdp.yaml (FSDP2, one rank), 10 steps, sharded checkpoint at 5
    resumed   fsdp resumed from its checkpoint-5 into a new folder (steps 6-10)
    offload   the same with fsdp_offload.yaml, 2 steps
    onefile   onefile_train.py from init-124m with eager's settings, 20 steps
    lora      lora.py on eager's output; qlora: qlora.py on it (NF4 + double quantization, paged AdamW by default)
    """
    common = ["--model_name_or_path", str(init124), "--logging_steps", "1", "--warmup_steps", "5"]
    eager, fsdp, resumed, offload = (work / name for name in ("eager", "fsdp", "resumed", "offload"))
    onefile = kit.python("recipes/onefile_train.py", "--init_from", init124, "--tokenizer_name", kit.tokenizer_dir(),
                         "--train_file", kit.shakespeare(), "--block_size", "1024",
                         "--per_device_train_batch_size", "8", "--max_steps", "20", "--warmup_steps", "5",
                         "--logging_steps", "1", "--seed", "0",
                         "--eval_strategy", "no", "--save_strategy", "no", "--sample_max_new_tokens", "0",
                         "--overwrite_output_dir", "--output_dir", work / "onefile")  # eager's settings
    checkpoints = ["--save_strategy", "steps", "--save_steps", "5", "--save_total_limit", "3"]
    fsdp_yaml, offload_yaml = kit.accelerate_launch("fsdp.yaml"), kit.accelerate_launch("fsdp_offload.yaml")
    no_warmup = ["--model_name_or_path", str(init124), "--logging_steps", "1", "--warmup_steps", "0"]
    resume = ["--resume_from_checkpoint", str(fsdp / "checkpoint-5")]
    pretrain = "recipes/pretrain.py"
    jobs = [
        kit.Job("eager", kit.probed(eager, pretrain, kit.pretrain_args(eager, 8, 20, *common)), folder=eager),
        kit.Job("fsdp", kit.probed(fsdp, pretrain, kit.pretrain_args(fsdp, 8, 10, *common, *checkpoints),
                                   launcher=fsdp_yaml), folder=fsdp),
        kit.Job("offload", kit.probed(offload, pretrain, kit.pretrain_args(offload, 8, 2, *no_warmup),
                                      launcher=offload_yaml), folder=offload),
        kit.Job("onefile", onefile, folder=work / "onefile"),
        kit.Job("resumed", kit.probed(resumed, pretrain, kit.pretrain_args(resumed, 8, 10, *common, *resume),
                                      launcher=kit.accelerate_launch("fsdp.yaml")), after=("fsdp",), folder=resumed),
    ]
    for method in ("lora", "qlora"):
        out = work / method
        args = ["--model_name_or_path", str(eager), "--train_file", str(kit.shakespeare()), "--max_length", "1024",
                "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--max_eval_samples", "16",
                "--max_steps", "30", "--learning_rate", "1e-3", "--logging_steps", "5", "--bf16", "true",
                "--seed", "0", "--report_to", "none", "--sample_max_new_tokens", "8", "--output_dir", str(out),
                "--overwrite_output_dir", "true"]
        jobs.append(kit.Job(method, kit.probed(out, f"recipes/{method}.py", args), after=("eager",), folder=out))
    return kit.run_jobs(jobs, max_parallel=4)
