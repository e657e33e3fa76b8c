"""6. recipes/onefile_train.py on a GPU (bf16 autocast) against recipes/pretrain.py on the same GPU.

Both start from init-124m and train 20 steps of 8 x 1024 tokens with the same data order, schedule and optimizer
settings (tests/gpu/conftest.py: onefile and eager). On CPU in fp32 the two loss curves agree to 1e-4
(tests/test_onefile.py). Under bf16 autocast both keep fp32 weights, residual stream and LayerNorms and round matmul
inputs to bf16, but transformers' Conv1D (addmm on [in, out] weights) and onefile's nn.Linear ([out, in]) reach
cuBLAS as different GEMMs, whose bf16 outputs can differ in the last of bf16's 8 significant bits. Step 1 (same
weights, same batch, a mean over 8,184 predictions) can only move by that rounding: 0.005 of ~10.9 is already 20x
more than a mean of such errors; the curves then drift by bf16-rounded updates, and 10 steps may differ by 0.03
(0.3%). A wrong schedule, data order or loss normalisation moves them by more (the CPU test catches those exactly).
The CPU rehearsal (kit.shape()) runs both at the nano shape: onefile's CPU branch is fp32 (it has no CPU autocast),
pretrain.py's is bf16 autocast, so the rehearsal compares them to the bf16 rounding of a 512-token vocabulary.
"""

from __future__ import annotations

import json

import pytest

from . import kit

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

FIRST_STEP_TOL = 0.005
LOSS_TOL = 0.03
SH = kit.shape()


def test_onefile_matches_pretrain_on_gpu_in_bf16(core_runs, work):
    for name in ("onefile", "eager"):
        assert core_runs[name].ok, core_runs[name].tail()
    log = core_runs["onefile"].log.read_text()
    if SH.rehearsal:
        assert "on cpu" in log, log[-2000:]
        kit.not_measured("onefile_train.py's CUDA branch (bf16 autocast, TF32): its CPU branch is fp32")
    else:
        assert "on cuda (bf16 autocast)" in log, log[-2000:]  # the GPU branch ran, with bf16
    ours = [json.loads(line) for line in (work / "onefile" / "metrics.jsonl").read_text().splitlines()]
    ours = [e for e in ours if "loss" in e]
    theirs = [h for h in kit.trainer_log(work / "eager") if "loss" in h]
    assert [e["step"] for e in ours] == [h["step"] for h in theirs] == list(range(1, SH.steps + 1))
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs)]
    kit.record(
        "onefile_vs_pretrain_gpu",
        onefile=[e["loss"] for e in ours],
        pretrain=[h["loss"] for h in theirs],
        abs_diff=diffs,
        tolerance_first=FIRST_STEP_TOL,
        tolerance=LOSS_TOL,
        onefile_mfu=[e["mfu"] for e in ours],
        pretrain_mfu=[h.get("mfu") for h in theirs],
    )
    assert diffs[0] <= FIRST_STEP_TOL, diffs
    assert max(diffs) <= LOSS_TOL, diffs
    for a, b in zip(ours, theirs):  # the schedule is computed, not measured: it agrees exactly
        assert a["lr"] == pytest.approx(b["learning_rate"], rel=1e-9, abs=1e-15)
    assert ours[-1]["loss"] < ours[0]["loss"] - SH.core_drop  # and both learn


def test_onefile_gpu_output_loads_in_transformers(core_runs, work):
    import torch
    from transformers import GPT2LMHeadModel

    assert core_runs["onefile"].ok, core_runs["onefile"].tail()
    model = GPT2LMHeadModel.from_pretrained(work / "onefile").to(SH.device).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        logits = model(input_ids=kit.fixed_ids(model.config.vocab_size, SH.device)).logits
    assert torch.isfinite(logits).all()
