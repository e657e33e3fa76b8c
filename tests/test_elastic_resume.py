"""Elastic exact resume: a checkpoint written by N ranks resumes on M (2 DDP ranks -> 1 process, 1 process -> 2 FSDP2
ranks), from the token store --train_file makes, with the loader starting at the samples seen that the checkpoint
records, in the one seeded order. With the global batch kept the resumed losses are the uninterrupted run's (also
for a one-process checkpoint under FSDP2: weights, optimizer and schedule come back sharded); with another global
batch the order goes on from the same sample and the learning-rate schedule by optimizer steps.
(`--token_store` under DDP: tests/test_reliability_distributed.py::test_token_store_resume_under_ddp_gives_the_one_\
process_losses.) Every micro-batch's blocks are recorded by tests/record_order.py."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import REPO, free_port, recipe_in_process, run_script
from record_order import read, recording

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS, SAVE, SEED = 12, 6, 0
RECORDER = str(REPO / "tests" / "record_order.py")


def history(output_dir, key: str) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h}


def seeded_order(n: int) -> list[int]:
    """Epoch 0 of the order, drawn here as the Trainer's seeded sampler draws it (seed + epoch)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED)).tolist()


def steps_of(order: list[int], start: int, global_batch: int, first_step: int, last_step: int) -> dict[int, list]:
    return {step: order[start + (step - first_step) * global_batch:start + (step - first_step + 1) * global_batch]
            for step in range(first_step, last_step + 1)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer_dir, small_text_file):
    """The uninterrupted run on 1 process (8 sequences per step) and on 2 DDP ranks (4 each), each checkpointed at
    step 6, with the blocks of every step and the number of train blocks."""
    root = tmp_path_factory.mktemp("elastic")
    common = ["--preset", "gpt2-nano", "--tokenizer_name", str(tiny_tokenizer_dir),
              "--train_file", str(small_text_file), "--data_cache_dir", str(root / "cache"), "--block_size", "32",
              "--learning_rate", "3e-3", "--warmup_steps", "2", "--max_steps", str(STEPS), "--logging_steps", "1",
              "--eval_strategy", "no", "--report_to", "none", "--sample_max_new_tokens", "4", "--seed", str(SEED),
              # one optimizer for every launch: auto picks Muon, which FSDP cannot shard
              "--optim", "adamw_torch_fused", "--save_steps", str(SAVE)]
    one = run_script([RECORDER, str(root / "one.blocks"), "recipes/pretrain.py", *common,
                      "--per_device_train_batch_size", "8", "--output_dir", str(root / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                      RECORDER, str(root / "ddp.blocks"), "recipes/pretrain.py", *common, "--use_cpu", "true",
                      "--per_device_train_batch_size", "4", "--output_dir", str(root / "ddp")])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "distributed setup: MULTI_CPU, world size 2" in ddp.stdout, ddp.stdout[-3000:]
    n = int(re.search(r"Data: ([\d,]+) train", one.stdout).group(1).replace(",", ""))
    return root, common, n


def test_two_ddp_ranks_resume_on_one_process_at_the_samples_seen(runs, capsys, monkeypatch):
    root, common, n = runs
    order = seeded_order(n)
    one, ddp = read(str(root / "one.blocks"), 1), read(str(root / "ddp.blocks"), 2)
    assert one == steps_of(order, 0, 8, 1, STEPS)  # the uninterrupted run reads the seeded order, 8 blocks a step
    assert ddp == one  # and so do 2 ranks of 4
    checkpoint = root / "ddp" / f"checkpoint-{SAVE}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["DataPositionCallback"]["attributes"] == {
        "position": {"epoch": 0, "offset": 48, "seen": 48}, "samples": n}

    from toolkit.trainer import PretrainTrainer

    training_step = PretrainTrainer.training_step
    resume = [*common, "--per_device_train_batch_size", "4", "--save_strategy", "no", "--resume_from_checkpoint",
              str(checkpoint), "--cpu_keep_freed_memory", "false"]

    # The same global batch (4 x 2 accumulation steps on 1 process): the uninterrupted run's blocks and losses.
    monkeypatch.setattr(PretrainTrainer, "training_step", recording(str(root / "kept.blocks"), training_step))
    code, out, err = recipe_in_process("pretrain", [*resume, "--global_batch_size", "8", "--output_dir",
                                                    str(root / "kept")], capsys)
    assert code == 0, err[-3000:]
    assert "distributed setup: NO, world size 1" in out
    assert "note: resuming a 2-process checkpoint on 1 process(es) with the same global batch of 8 sequences" in out
    assert read(str(root / "kept.blocks"), 1) == {step: one[step] for step in range(SAVE + 1, STEPS + 1)}
    reference, kept = history(root / "one", "loss"), history(root / "kept", "loss")
    for step in range(SAVE + 1, STEPS + 1):
        assert kept[step] == pytest.approx(reference[step], abs=1e-5), (step, kept, reference)

    # The per-device batch kept on half the processes: 4 sequences a step, from block 48 of the same order on; the
    # schedule goes on by steps (the same learning rates as the uninterrupted run at the same steps).
    monkeypatch.setattr(PretrainTrainer, "training_step", recording(str(root / "halved.blocks"), training_step))
    code, out, err = recipe_in_process("pretrain", [*resume, "--output_dir", str(root / "halved")], capsys)
    assert code == 0, err[-3000:]
    note = next(line for line in out.splitlines() if line.startswith("note: resuming at"))
    assert note == ("note: resuming at 48 samples seen (epoch 0, block 48 of its order) with a global batch of 4 "
                    "sequences (4 per device x 1 process(es) x 1 accumulation step(s)) instead of the checkpoint's 8 "
                    "(4 per device x 2 process(es) x 1 accumulation step(s)): the data order goes on from there and "
                    "the learning-rate schedule continues by optimizer steps (from step 6 of 12)")
    assert read(str(root / "halved.blocks"), 1) == steps_of(order, 48, 4, SAVE + 1, STEPS)
    rates, halved = history(root / "halved", "learning_rate"), history(root / "halved", "loss")
    assert [rates[s] for s in range(SAVE + 1, STEPS + 1)] == pytest.approx(
        [history(root / "one", "learning_rate")[s] for s in range(SAVE + 1, STEPS + 1)])
    assert all(math.isfinite(halved[s]) for s in range(SAVE + 1, STEPS + 1))


def test_one_process_resumes_on_two_fsdp2_ranks_with_another_global_batch(runs):
    """A one-process checkpoint (full weights, plain optimizer state) resumed under FSDP2 on 2 ranks: with the global
    batch kept (4 per rank) the one-process losses, so weights, optimizer and schedule came back sharded; with 8 per
    rank, 16 blocks a step from block 48 of the same order on, and the loss goes on falling."""
    root, common, n = runs
    order = seeded_order(n)
    reference = history(root / "one", "loss")

    def fsdp(per_device: str, name: str):
        result = run_script(["-m", "accelerate.commands.launch", "--config_file",
                             str(REPO / "accelerate_configs" / "fsdp_cpu.yaml"), "--main_process_port",
                             str(free_port()), RECORDER, str(root / f"{name}.blocks"), "recipes/pretrain.py", *common,
                             "--use_cpu", "true", "--per_device_train_batch_size", per_device, "--save_strategy", "no",
                             "--output_dir", str(root / name),
                             "--resume_from_checkpoint", str(root / "one" / f"checkpoint-{SAVE}")])
        assert result.returncode == 0, result.stderr[-3000:]
        assert "distributed setup: FSDP (FSDP2), world size 2" in result.stdout, result.stdout[-3000:]
        return result

    fsdp("4", "fsdp-kept")
    kept = history(root / "fsdp-kept", "loss")
    for step in range(SAVE + 1, STEPS + 1):
        assert kept[step] == pytest.approx(reference[step], abs=1e-5), (step, kept, reference)
    assert read(str(root / "fsdp-kept.blocks"), 2) == steps_of(order, 48, 8, SAVE + 1, STEPS)

    result = fsdp("8", "fsdp")
    assert ("note: resuming at 48 samples seen (epoch 0, block 48 of its order) with a global batch of 16 sequences "
            "(8 per device x 2 process(es) x 1 accumulation step(s)) instead of the checkpoint's 8 ") in result.stdout
    assert read(str(root / "fsdp.blocks"), 2) == steps_of(order, 48, 16, SAVE + 1, STEPS)
    resumed = history(root / "fsdp", "loss")
    assert abs(resumed[SAVE + 1] - reference[SAVE + 1]) < 0.2 < reference[1] - reference[SAVE + 1]  # its weights
    assert sum(resumed[step] for step in (10, 11, 12)) / 3 < resumed[SAVE + 1] - 0.05, resumed  # it trains on
