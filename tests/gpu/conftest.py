"""GPU acceptance tests: every GPU-only path of the toolkit, run for real on one CUDA GPU, and rehearsed on CPU.

    python benchmarks/gpu_acceptance.py --out DIR     # the whole kit: wheels, these tests, benchmarks
    python -m pytest -m gpu tests/gpu                 # these tests alone: on CUDA for real, else the CPU rehearsal

Every test here carries the `gpu` marker (registered in setup.cfg). Where torch sees no CUDA (CI, laptops) the same
tests run as a CPU rehearsal at a tiny shape (kit.shape(); docs/gpu_acceptance.md has what it covers and what only a
GPU can check), so `python -m pytest -q` runs them; without ../shared data they skip with the reason. Launched by the
kit (GPU_KIT_LAUNCHED), a test that cannot run on CUDA, or that skips, fails: the kit never reports green having
tested nothing.

The runs that several tests compare are made once per session by `core_runs` (several at a time on the one GPU).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil

import pytest

from . import kit


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    verdict = kit.blocked() if gpu_items else None
    if verdict and verdict[0] == "skip":
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=verdict[1]))


def pytest_runtest_setup(item):
    verdict = kit.blocked() if item.get_closest_marker("gpu") else None
    if verdict and verdict[0] == "fail":
        pytest.fail(verdict[1], pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under the kit a skip is a failure (pytest would exit 0 with every test skipped)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(kit.LAUNCHED_BY_KIT) and item.get_closest_marker("gpu"):
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under the GPU kit, which counts a skip as a failure: {why}"


def pytest_terminal_summary(terminalreporter):
    if kit.NOT_MEASURED:
        terminalreporter.section("tests/gpu CPU rehearsal: not measured on CPU (CUDA only; never asserted here)")
        for what in dict.fromkeys(kit.NOT_MEASURED):
            terminalreporter.write_line(f"not measured on CPU: {what}")


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
    folder = kit.work_dir()
    if kit.shape().rehearsal and not os.environ.get("GPU_KIT_WORK"):
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def init124(work):
    """onefile_train.py's initial GPT-2 for seed 0 in pretrain.py's config (padded vocabulary, no dropout, fused GELU)
    with its tokenizer (kit.make_init): 124M with the GPT-2 tokenizer on a GPU, the nano preset with the rehearsal's
    tokenizer on CPU."""
    return kit.make_init(work / "init-124m")


@pytest.fixture(scope="session")
def core_runs(work, init124):
    """The recipe runs tests 2, 3, 4 and 6 check, started as soon as what they start from exists (4 at a time; 2 in
    the rehearsal, on 2 cores). S = shape().steps, the one schedule of every run compared step by step:

    eager     pretrain.py from init-124m, bf16 + sdpa, no compile, S steps: the reference run
    fsdp      the same through `accelerate launch` with fsdp.yaml (FSDP2, one rank), S steps, sharded checkpoint
    resumed   fsdp resumed from its checkpoint into a new folder (the same S-step schedule)
    offload   the same with fsdp_offload.yaml, 2 steps
    onefile   onefile_train.py from init-124m (drawn again from its seed: kit.onefile_start) with eager's settings
    lora      lora.py on eager's output; qlora: qlora.py on it (NF4 + double quantization, paged AdamW)
    """
    sh = kit.shape()
    steps, batch = str(sh.steps), sh.batch
    common = ["--model_name_or_path", str(init124), "--logging_steps", "1", "--warmup_steps", str(sh.warmup),
              *sh.core_lr]
    eager, fsdp, resumed, offload = (work / name for name in ("eager", "fsdp", "resumed", "offload"))
    onefile = kit.python("recipes/onefile_train.py", *kit.onefile_start(), "--train_file", kit.shakespeare(),
                         "--block_size", str(sh.block),
                         "--per_device_train_batch_size", str(batch), "--max_steps", steps,
                         "--warmup_steps", str(sh.warmup), "--optim", "adamw_torch_fused", *sh.core_lr,
                         "--logging_steps", "1", "--device", sh.device,
                         "--eval_strategy", "no", "--save_strategy", "no", "--sample_max_new_tokens", "0",
                         "--overwrite_output_dir", "--output_dir", work / "onefile")  # eager's settings
    checkpoints = ["--save_strategy", "steps", "--save_steps", str(sh.checkpoint_at), "--save_total_limit", "3"]
    fsdp_yaml, offload_yaml = kit.accelerate_launch("fsdp.yaml"), kit.accelerate_launch("fsdp_offload.yaml")
    no_warmup = ["--model_name_or_path", str(init124), "--logging_steps", "1", "--warmup_steps", "0"]
    resume = ["--resume_from_checkpoint", str(fsdp / f"checkpoint-{sh.checkpoint_at}")]
    pretrain = "recipes/pretrain.py"
    jobs = [
        kit.Job("eager", kit.probed(eager, pretrain, kit.pretrain_args(eager, batch, sh.steps, *common)),
                folder=eager),
        kit.Job("fsdp", kit.probed(fsdp, pretrain, kit.pretrain_args(fsdp, batch, sh.steps, *common, *checkpoints),
                                   launcher=fsdp_yaml), folder=fsdp),
        kit.Job("onefile", onefile, folder=work / "onefile"),
        kit.Job("resumed", kit.probed(resumed, pretrain, kit.pretrain_args(resumed, batch, sh.steps, *common, *resume),
                                      launcher=kit.accelerate_launch("fsdp.yaml")), after=("fsdp",), folder=resumed),
    ]
    if not sh.rehearsal:  # FSDP2's CPUOffloadPolicy moves each shard to an accelerator to compute: CUDA only
        jobs.append(kit.Job("offload", kit.probed(offload, pretrain, kit.pretrain_args(offload, batch, 2, *no_warmup),
                                                  launcher=offload_yaml), folder=offload))
    for method in ("lora", "qlora"):
        out = work / method
        args = ["--model_name_or_path", str(eager), "--train_file", str(kit.shakespeare()), "--max_length",
                str(sh.block), "--per_device_train_batch_size", str(sh.finetune_batch),
                "--per_device_eval_batch_size", str(sh.finetune_batch), "--max_eval_samples", "16",
                "--max_steps", str(sh.finetune_steps), "--learning_rate", str(sh.finetune_lr), "--logging_steps", "5",
                "--bf16", "true", "--seed", "0", "--report_to", "none", "--sample_max_new_tokens", "8",
                "--output_dir", str(out), "--overwrite_output_dir", "true"]
        if sh.rehearsal:  # the recipes' CUDA default, given explicitly on CPU (where they do not checkpoint)
            args += ["--activation_checkpointing", "true"]
        if method == "qlora" and sh.rehearsal:
            # ... and qlora's (on CPU: fp32 compute and torch's AdamW): bf16 compute, and the optimizer transformers
            # builds for paged_adamw_32bit (its paging of CUDA memory is not measured on CPU).
            args += ["--bnb_4bit_compute_dtype", "bfloat16", "--optim", "paged_adamw_32bit"]
        jobs.append(kit.Job(method, kit.probed(out, f"recipes/{method}.py", args), after=("eager",), folder=out))
    return kit.run_jobs(jobs, max_parallel=2 if sh.rehearsal else 4)
