"""5. `toolkit plan` on a GPU: its predicted memory per device against torch.cuda.max_memory_allocated of the real
recipes, and the LoRA vs QLoRA benchmark (step time and peak memory at 124M and 350M) from the same runs.

Nine configurations, bf16 autocast, sequences of 1024 tokens, one GPU: full pretraining at 124M (micro-batch 8 and
16, and 16 with gradient checkpointing) and 350M (4 and 8); LoRA and QLoRA at 124M and 350M (micro-batch 8, the
recipes' GPU defaults: activation checkpointing on, r 16 on every projection, no LoRA dropout, Hub-like bases with
dropout 0.1). tests/gpu/plan_runner.py runs them one after another in one process (alone on the GPU, so the step
times are the benchmark's) and records, from the second optimizer step on, each step's peak allocated memory.

What is compared: the planner's tensor memory (its total minus the CUDA-context and allocator-slack term, which
max_memory_allocated does not see) against the measured steady-state peak; the target is within 15% for every
configuration. The planner's whole total is also set against max_memory_reserved + this process's non-PyTorch device
memory (the CUDA context, measured with NVML), what `nvidia-smi` would show, so GPU_CONTEXT and GPU_ALLOCATOR_SLACK in
toolkit/plan/calibration.json (section "gpu") can be refit from the record.

The CPU rehearsal (kit.shape()) runs the same nine configurations at the nano shape through the same runner and the
same `toolkit plan` calls (for an H100, as no GPU is detected); torch.cuda's counters, NVML and the step-time targets
are CUDA-only and reported as not measured.
"""

from __future__ import annotations

import json
import statistics

import pytest

from . import kit

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

SH = kit.shape()
STEPS = SH.plan_steps
TIMED_FROM = 3  # step times: steps 3-10 (step 1 builds the optimizer state, step 2 may still load kernels)
TOLERANCE = 0.15
QLORA_PEAK_MAX, QLORA_TIME_MAX = 0.6, 1.2  # at 350M: QLoRA's peak and step time against LoRA's


def configurations(work) -> list[dict]:
    """name, recipe args, and the matching `toolkit plan` args."""
    bases = {"124m": work / "hub-like-124m", "350m": work / "hub-like-350m"}
    out = []
    for name, preset, batch, ckpt in (
        ("pretrain-124m-b8", SH.preset, 8, False),
        ("pretrain-124m-b16", SH.preset, 16, False),
        ("pretrain-124m-b16-ckpt", SH.preset, 16, True),
        ("pretrain-350m-b4", SH.preset_medium, 4, False),
        ("pretrain-350m-b8", SH.preset_medium, 8, False),
    ):
        folder = work / "plan" / name
        args = kit.pretrain_args(folder, batch, STEPS, "--preset", preset, "--logging_steps", "5",
                                 "--data_cache_dir", str(work / "plan" / "cache"))  # one after another: one cache
        args += ["--gradient_checkpointing", "true"] if ckpt else []
        plan = ["--model", preset, "--task", "pretrain", "--batch_size", str(batch)] + (
            ["--gradient_checkpointing"] if ckpt else []
        )
        out.append({"name": name, "recipe": "recipes/pretrain.py", "args": args, "plan": plan})
    for size in ("124m", "350m"):
        for method in ("lora", "qlora"):
            folder = work / "plan" / f"{method}-{size}"
            args = ["--model_name_or_path", str(bases[size]), "--train_file", str(kit.shakespeare()),
                    "--max_length", str(SH.block), "--per_device_train_batch_size", "8",
                    "--per_device_eval_batch_size", "8", "--max_eval_samples", "8", "--max_steps", str(STEPS),
                    "--logging_steps", "5", "--bf16", "true", "--report_to", "none", "--sample_max_new_tokens", "1",
                    "--output_dir", str(folder), "--overwrite_output_dir", "true"]  # GPU defaults: checkpointing
            if SH.rehearsal:  # the recipes' CUDA defaults, given explicitly on CPU
                args += ["--activation_checkpointing", "true"]
                args += ["--bnb_4bit_compute_dtype", "bfloat16", "--optim", "paged_adamw_32bit"] * (method == "qlora")
            plan = ["--model", str(bases[size]), "--task", method, "--batch_size", "8", "--gradient_checkpointing"]
            out.append({"name": f"{method}-{size}", "recipe": f"recipes/{method}.py", "args": args, "plan": plan})
    return out


@pytest.fixture(scope="module")
def measured(work):
    specs = configurations(work)
    (work / "plan").mkdir(exist_ok=True)
    spec_file, out = work / "plan" / "specs.json", work / "plan" / "measured.json"
    spec_file.write_text(json.dumps([{k: s[k] for k in ("name", "recipe", "args")} for s in specs]))
    runner = kit.python(
        kit.PROBE.with_name("plan_runner.py"),
        "--specs",
        spec_file,
        "--out",
        out,
        "--tokenizer",
        kit.tokenizer_dir(),
        "--base",
        work / "hub-like-124m",
        SH.preset,
        "--base",
        work / "hub-like-350m",
        SH.preset_medium,
    )
    job = kit.run_jobs([kit.Job("plan_runner", runner)])["plan_runner"]
    assert out.exists(), job.tail()
    return specs, json.loads(out.read_text()), job


def predict(plan_args: list[str], capsys) -> dict:
    """`toolkit plan ... --json` (the command's own entry point, in this process), for one GPU as detected here."""
    from toolkit import cli

    capsys.readouterr()
    gpu = ["--gpu", "H100"] if SH.rehearsal else []  # no GPU to detect: plan for the kit's card
    argv = ["plan", *plan_args, "--seq_len", str(SH.block), "--strategy", "single", "--device", "cuda", *gpu, "--json"]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)["recommendation"]


def test_planner_is_within_15_percent_of_measured_gpu_memory(measured, capsys):
    specs, results, job = measured
    rows, failed = [], []
    for spec in specs:
        run = results["runs"].get(spec["name"])
        if run is None or run.get("error") or len(run.get("steps", [])) < 2:
            failed.append((spec["name"], (run or {}).get("error", "not run")))
            continue
        est = predict(spec["plan"], capsys)
        assert est["total_bytes"] > est["components_bytes"]["overhead"] > 0, est
        if SH.rehearsal:  # the prediction ran for this configuration; what it is compared with is CUDA's
            rows.append({"name": spec["name"], "gradient_checkpointing": run.get("gradient_checkpointing")})
            continue
        # Anything a previous configuration left allocated (recorded; normally 0) is not this run's memory.
        measured_peak = max(s["max_allocated"] for s in run["steps"][1:]) - run["leftover_bytes"]
        reserved_peak = max(s["max_reserved"] for s in run["steps"][1:])
        overhead = est["components_bytes"]["overhead"]
        tensors = est["total_bytes"] - overhead
        used_before = results.get("device_used_before_cuda_bytes")
        non_torch = run["device_used_bytes"] - used_before - run["reserved_bytes"] if used_before is not None else None
        row = {
            "name": spec["name"],
            "predicted_tensors_mib": tensors / 2**20,
            "measured_max_allocated_mib": measured_peak / 2**20,
            "ratio": tensors / measured_peak,
            "predicted_total_mib": est["total_bytes"] / 2**20,
            "measured_max_reserved_mib": reserved_peak / 2**20,
            "measured_non_torch_mib": non_torch / 2**20 if non_torch is not None else None,
            "predicted_overhead_mib": overhead / 2**20,
            "peak_moment": est["peak_moment"],
            "leftover_mib": run["leftover_bytes"] / 2**20,
            "gradient_checkpointing": run.get("gradient_checkpointing"),
            "components_mib": {k: v / 2**20 for k, v in est["components_bytes"].items()},
        }
        if non_torch is not None:
            row["ratio_total_vs_reserved_plus_context"] = est["total_bytes"] / (reserved_peak + non_torch)
        rows.append(row)
        kit.record("plan_gpu", **row)
    ratios = [abs(r["ratio"] - 1) for r in rows if "ratio" in r]
    kit.record(
        "plan_gpu_summary",
        gpu=results.get("gpu"),
        nvml=results.get("nvml"),
        worst=max(ratios, default=None),
        configurations=len(specs),
        compared=len(ratios),
        tolerance=TOLERANCE,
        failed=failed,
        runner_seconds=job.seconds,
    )
    assert not failed, failed
    assert len(rows) == len(specs), rows
    for spec, row in zip(specs, rows):  # like for like: the recipe checkpointed exactly when the plan assumed it
        assert row["gradient_checkpointing"] == ("--gradient_checkpointing" in spec["plan"]), row
    if SH.rehearsal:
        kit.not_measured("toolkit plan within 15% of torch.cuda.max_memory_allocated (9 configurations)")
        kit.not_measured(f"the CUDA context's device memory through NVML ({results.get('nvml')})")
        return
    # The context term is refit from NVML: without it (pynvml missing from the image) the record is incomplete.
    assert results.get("device_used_before_cuda_bytes") is not None, results.get("nvml")
    off = [(r["name"], round(r["ratio"], 3)) for r in rows if abs(r["ratio"] - 1) > TOLERANCE]
    assert not off, f"planner off by more than 15% (prediction / measured): {off}"


def test_lora_vs_qlora_step_time_and_peak_memory(measured):
    """The benchmark the issue asks for; targets at 350M: QLoRA peak <= 0.6x LoRA's, step time <= 1.2x."""
    _, results, _ = measured
    runs = results["runs"]
    summary = {}
    for size in ("124m", "350m"):
        pair = {}
        for method in ("lora", "qlora"):
            run = runs.get(f"{method}-{size}") or {}
            assert not run.get("error") and len(run.get("steps", [])) >= STEPS, (method, size, run.get("error"))
            timed = [s["seconds"] for s in run["steps"] if s["step"] >= min(TIMED_FROM, STEPS)]
            pair[method] = {
                "s_per_step": statistics.median(timed),
                "peak_mib": max(s["max_allocated"] for s in run["steps"][1:]) / 2**20,
            }
        summary[size] = {**pair, "step_time_ratio": pair["qlora"]["s_per_step"] / pair["lora"]["s_per_step"]}
        if not SH.rehearsal:
            summary[size]["peak_ratio"] = pair["qlora"]["peak_mib"] / pair["lora"]["peak_mib"]
    kit.record(
        "bench_lora_vs_qlora" if not SH.rehearsal else "bench_lora_vs_qlora_rehearsal",
        batch=8,
        seq=SH.block,
        gradient_checkpointing=True,
        **summary,
        targets={"350m_peak_ratio_max": QLORA_PEAK_MAX, "350m_step_time_ratio_max": QLORA_TIME_MAX},
    )
    if SH.rehearsal:
        kit.not_measured(f"QLoRA / LoRA peak GPU memory at 350M <= {QLORA_PEAK_MAX} (torch.cuda's counter)")
        kit.not_measured(f"QLoRA / LoRA step time at 350M <= {QLORA_TIME_MAX} (CUDA kernels' speed)")
        return
    assert summary["124m"]["peak_ratio"] < 1.0, summary  # 4-bit weights save memory at 124M too
    big = summary["350m"]
    assert big["peak_ratio"] <= QLORA_PEAK_MAX and big["step_time_ratio"] <= QLORA_TIME_MAX, (
        f"350M QLoRA / LoRA: peak {big['peak_ratio']:.3f} (target <= {QLORA_PEAK_MAX}), "
        f"step time {big['step_time_ratio']:.3f} (target <= {QLORA_TIME_MAX})"
    )
