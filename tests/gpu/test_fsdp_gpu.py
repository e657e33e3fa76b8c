"""2-3. recipes/pretrain.py under accelerate's own FSDP2 on a GPU: fsdp.yaml and fsdp_offload.yaml, one rank.

One rank is still `fully_shard`: the parameters become DTensors, the optimizer steps on them, checkpoints are written
by torch.distributed.checkpoint and the export gathers them; with more GPUs only the shard sizes change. Every run
starts from the same 124M weights (init-124m) and data as the plain bf16 run `eager` (tests/gpu/conftest.py).

Loss tolerances. The plain run keeps fp32 weights and autocasts matmul inputs to bf16, with the residual stream,
LayerNorms and embeddings in fp32. accelerate's FSDP2 mixed-precision policy casts every parameter to bf16 for
compute (param_dtype = reduce_dtype = bf16), so its residual stream, LayerNorms and embedding gradients are bf16: the
same function to bf16's 8 significant bits (relative 2^-8 = 0.4% per value). Step 1 is the same batch on the same
weights, so its loss (a mean over 8,184 predictions) can only differ by that rounding, far below 0.01 of ~10.9;
afterwards the weights drift apart by bf16-rounded updates, and over 10 steps we allow 0.05 (0.5% of the loss).
Anything that breaks FSDP's update - a shard not stepped, a tied weight split (accelerate#3870), gradients not
reduced - changes the loss by more than that within a few steps at lr 6e-4. Both runs have the same max_steps, so
the same cosine schedule: a shorter run decays its learning rate sooner and drifts apart by schedule, not by FSDP.
The CPU rehearsal runs the same over gloo at the nano shape (kit.shape()).
"""

from __future__ import annotations

import math

import pytest

from . import kit

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

FIRST_STEP_TOL = 0.01
LOSS_TOL = 0.05
RESUME_TOL = 5e-3  # same kernels and data; only atomics in attention/embedding backward reorder fp32 sums
SH = kit.shape()
STEPS, CKPT = SH.steps, SH.checkpoint_at


def _job(core_runs, name):
    job = core_runs[name]
    assert job.ok, job.tail()
    return job


def test_fsdp2_shards_and_trains_like_one_plain_process(core_runs, work):
    _job(core_runs, "fsdp")
    _job(core_runs, "eager")
    setup = kit.probe(work / "fsdp")["setup"]
    assert setup["distributed_type"] == "FSDP" and setup["fsdp_version"] == 2, setup  # accelerate's own FSDP2 path
    assert setup["n_dtensor"] == setup["n_params"], setup  # fully_shard turned every parameter into a DTensor
    assert setup["param_dtypes"] == {"torch.float32": setup["n_params"]}  # sharded fp32 master weights
    assert setup["param_devices"] == {SH.device: setup["n_params"]} and setup["mixed_precision"] == "bf16"
    assert setup["wrapped_model_class"].startswith("FSDP"), setup

    fsdp, plain = kit.losses(work / "fsdp"), kit.losses(work / "eager")
    assert kit.max_steps(work / "fsdp") == kit.max_steps(work / "eager"), "one schedule: the same max_steps"
    assert sorted(fsdp) == list(range(1, STEPS + 1)), fsdp
    diffs = {step: abs(fsdp[step] - plain[step]) for step in fsdp}
    kit.record(
        "fsdp_vs_plain_losses",
        fsdp=fsdp,
        plain={s: plain[s] for s in fsdp},
        abs_diff=diffs,
        tolerance_first=FIRST_STEP_TOL,
        tolerance=LOSS_TOL,
    )
    assert diffs[1] <= FIRST_STEP_TOL, diffs
    assert max(diffs.values()) <= LOSS_TOL, diffs
    assert fsdp[STEPS] < fsdp[1] - SH.core_drop, fsdp  # and it learns


def test_fsdp2_sharded_checkpoint_resumes_the_same_run(core_runs, work):
    _job(core_runs, "resumed")
    checkpoint = work / "fsdp" / f"checkpoint-{CKPT}"
    shards = sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").iterdir())
    assert shards and all(name.endswith(".distcp") or name.startswith(".") for name in shards), shards
    assert not (checkpoint / "model.safetensors").exists()  # torch.distributed.checkpoint shards, not a gathered model
    first = kit.probe(work / "resumed")["first_step"]
    # model, AdamW state and step came back
    assert first == {"global_step": CKPT, "optimizer_state_steps": [float(CKPT)]}, first
    full, resumed = kit.losses(work / "fsdp"), kit.losses(work / "resumed")
    assert set(range(CKPT + 1, STEPS + 1)) <= set(resumed), resumed
    diffs = {step: abs(resumed[step] - full[step]) for step in range(CKPT + 1, STEPS + 1)}
    kit.record("fsdp_resume_losses", abs_diff=diffs, tolerance=RESUME_TOL)
    assert max(diffs.values()) <= RESUME_TOL, diffs


def test_fsdp2_export_loads_without_fsdp_with_the_trained_weights(core_runs, work):
    import torch
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    _job(core_runs, "fsdp")
    out = work / "fsdp"
    model, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)  # a plain process, no FSDP
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie survived sharding
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in list(f.keys())
    trained = kit.probe(out)["end"]["checksums"]
    exported = kit.checksums(model.named_parameters())
    assert set(trained) == set(exported), set(trained) ^ set(exported)
    for name, (total, squares) in trained.items():  # the exported weights ARE the in-memory sharded weights
        assert exported[name] == pytest.approx([total, squares], rel=1e-9, abs=1e-9), name
    ids = kit.fixed_ids(model.config.vocab_size, SH.device)
    with torch.no_grad():
        generated = model.to(SH.device).generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


def test_fsdp2_cpu_offload_keeps_parameters_on_cpu_and_trains(core_runs, work, init124):
    from safetensors.torch import load_file

    if SH.rehearsal:
        kit.not_measured("fsdp_offload.yaml: FSDP2's CPUOffloadPolicy computes on an accelerator")
        pytest.skip("not measured on CPU: FSDP2's CPUOffloadPolicy moves each shard to an accelerator to compute")
    _job(core_runs, "offload")
    _job(core_runs, "eager")
    setup = kit.probe(work / "offload")["setup"]
    assert setup["distributed_type"] == "FSDP" and setup["fsdp_offload_policy"] == "CPUOffloadPolicy", setup
    assert setup["n_dtensor"] == setup["n_params"]
    assert setup["param_devices"] == {"cpu": setup["n_params"]}, setup  # every shard lives in CPU memory
    losses, plain = kit.losses(work / "offload"), kit.losses(work / "eager")
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values()), losses
    kit.record("fsdp_offload_losses", offload=losses, plain_step1=plain[1])
    assert abs(losses[1] - plain[1]) <= FIRST_STEP_TOL, (losses, plain[1])  # same function as on the GPU
    before, after = load_file(init124 / "model.safetensors"), load_file(work / "offload" / "model.safetensors")
    changed = [name for name in after if not (after[name] == before[name]).all()]
    assert len(changed) >= 0.9 * len(after), (
        f"only {len(changed)} of {len(after)} tensors changed: the CPU step did not train"
    )
