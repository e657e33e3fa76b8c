"""The training guard (toolkit/guard.py) in real recipe runs: a poisoned batch (a NaN loss, or a loss spike) injected
into recipes/pretrain.py (1 process, and one of 2 ranks under DDP and FSDP2) and recipes/lora.py, and a learning rate
that drives the weights to NaN.

The poison is injected in the model's forward (in this process, or by a wrapper script under a launcher): at a chosen
training step the loss is multiplied by NaN or by 10, as a numerics fault or a bad batch would make it. The assertions
read the weights around that step: the guard must leave them as they were (skip) or as the last checkpoint has them
(rollback).
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from conftest import PROGRESS_BAR, one_error_line, run_recipe_in_process

TINY = ["--preset", "gpt2-nano", "--vocab_size", "512", "--block_size", "32", "--per_device_train_batch_size", "4",
        "--warmup_steps", "2", "--report_to", "none", "--sample_max_new_tokens", "4", "--logging_steps", "1",
        "--eval_strategy", "no", "--save_steps", "5", "--save_total_limit", "10", "--cpu_keep_freed_memory", "false"]


class Poison:
    """Wraps GPT2LMHeadModel.forward: the training forwards of the steps in `steps` get loss x `factor`; records the
    poisoned batches and the weights seen at the start of every training step."""

    def __init__(self, monkeypatch, steps, factor):
        from transformers import GPT2LMHeadModel

        self.steps, self.factor, self.batches, self.weights, self.step = set(steps), factor, {}, {}, 0
        real = GPT2LMHeadModel.forward

        @functools.wraps(real)  # the Trainer reads the forward's signature
        def forward(model, *args, **kwargs):
            out = real(model, *args, **kwargs)
            if not model.training:
                return out
            self.step += 1  # one forward per step (1 process, no accumulation)
            self.weights[self.step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            if self.step in self.steps:
                self.batches[self.step] = kwargs["input_ids"].detach().clone()
                out.loss = out.loss * self.factor
            return out

        monkeypatch.setattr(GPT2LMHeadModel, "forward", forward)

    def unchanged(self, step: int) -> bool:
        """The weights after `step` are those before it."""
        before, after = self.weights[step], self.weights[step + 1]
        return all(torch.equal(before[n], after[n]) for n in before)


def _pretrain(tmp_path, small_text_file, capsys, *extra):
    out = tmp_path / "out"
    argv = [*TINY, "--train_file", str(small_text_file), "--output_dir", str(out),
            "--data_cache_dir", str(tmp_path / "cache"), *extra]
    code, err = run_recipe_in_process("pretrain", argv, capsys)
    return out, code, err


def _lines(err: str) -> list[str]:
    """stderr's lines, progress bars left out."""
    parts = (PROGRESS_BAR.sub("", part).replace("\x1b[A", "").strip() for part in re.split(r"[\r\n]", err))
    return [text for text in parts if text]


def _warnings(err: str) -> list[str]:
    return [line for line in _lines(err) if line.startswith("warning: ")]


def _error(err: str) -> str:
    """The run's one error line (its guard warnings aside)."""
    return one_error_line("\n".join(line for line in _lines(err) if not line.startswith("warning: ")))


@pytest.mark.slow
def test_a_nan_batch_never_reaches_the_weights_and_is_named_by_its_store_offsets(tmp_path, small_text_file, capsys,
                                                                                  monkeypatch):
    from toolkit.data.store import TokenStore

    poison = Poison(monkeypatch, steps=[7], factor=float("nan"))
    out, code, err = _pretrain(tmp_path, small_text_file, capsys, "--max_steps", "12")
    assert code == 0, err[-3000:]
    assert poison.unchanged(7) and not poison.unchanged(6) and not poison.unchanged(8)
    [line] = [w for w in _warnings(err) if "loss at step" in w]
    assert line.startswith("warning: non-finite loss at step 7: loss nan, gradient norm nan: not finite; data: "
                           "samples 24-27 of the run's order; train blocks ")
    assert "largest gradient norms: transformer." in line and line.endswith("; update skipped")
    # the token offsets named are the poisoned batch's blocks in the store
    offsets = [int(x) for x in line.split("(token offsets ")[1].split(")")[0].split(", ")]
    store_dir = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.endswith(".partial"))
    store = TokenStore(str(store_dir))
    named = torch.stack([torch.from_numpy(store.train.read(o, o + 32).astype("int64")) for o in offsets])
    assert torch.equal(named, poison.batches[7])
    # the run ended with finite weights
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())


@pytest.mark.slow
def test_spikes_are_skipped_or_rolled_back_and_repeated_rollbacks_stop_the_run(tmp_path, small_text_file, capsys,
                                                                               monkeypatch):
    from safetensors.torch import load_file

    # warn: the spike is logged with its figures and the update applied
    poison = Poison(monkeypatch, steps=[12], factor=10.0)
    _, code, err = _pretrain(tmp_path / "warn", small_text_file, capsys, "--max_steps", "13")
    assert code == 0, err[-3000:]
    [line] = _warnings(err)
    assert line.startswith("warning: spike loss at step 12: loss ") and "x the running median" in line
    ratio = float(line.split(" is ")[1].split("x the running median")[0])
    assert 8 < ratio < 12 and "(threshold 2x)" in line and line.endswith("update applied (--on_spike warn)")
    assert not poison.unchanged(12)

    # skip
    poison = Poison(monkeypatch, steps=[12], factor=10.0)
    _, code, err = _pretrain(tmp_path / "skip", small_text_file, capsys, "--max_steps", "13", "--on_spike", "skip",
                             "--spike_threshold", "3")
    assert code == 0, err[-3000:]
    [line] = _warnings(err)
    assert "(threshold 3x)" in line and line.endswith("update skipped") and poison.unchanged(12)

    # rollback: step 12 goes back to checkpoint-10's weights, and the run goes on to the end
    poison = Poison(monkeypatch, steps=[12], factor=10.0)
    out, code, err = _pretrain(tmp_path / "rollback", small_text_file, capsys, "--max_steps", "16",
                               "--on_spike", "rollback")
    assert code == 0, err[-3000:]
    [line] = _warnings(err)
    assert line.endswith("update skipped, rolled back to checkpoint-10 (the data since then is skipped)")
    saved = load_file(out / "checkpoint-10" / "model.safetensors")
    after = poison.weights[13]
    assert all(torch.equal(saved[n], after[n]) for n in saved if n in after)
    assert not poison.unchanged(11)  # checkpoint-10 is not simply the weights before step 12
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-15").is_dir()

    # a spike on every step from 12 on: three rollbacks to checkpoint-10 in a row stop the run with one line
    Poison(monkeypatch, steps=range(12, 40), factor=10.0)
    out, code, err = _pretrain(tmp_path / "stuck", small_text_file, capsys, "--max_steps", "20",
                               "--on_spike", "rollback", "--max_rollbacks", "3")
    assert code == 2
    assert len(_warnings(err)) == 3
    error = _error(err)
    assert error.startswith("error: the guard rolled back to checkpoint-10 3 times in a row (last: step 14, loss ")
    assert "--resume_from_checkpoint" in error


@pytest.mark.slow
def test_a_learning_rate_that_makes_the_weights_nan_stops_with_one_line(tmp_path, small_text_file, capsys):
    _, code, err = _pretrain(tmp_path, small_text_file, capsys, "--max_steps", "10", "--learning_rate", "1e30",
                             "--optim", "adamw_torch")
    assert code == 2
    warnings = _warnings(err)
    assert len(warnings) == 3 and all("non-finite loss" in w and w.endswith("update skipped") for w in warnings)
    error = _error(err)
    assert error.startswith("error: the guard skipped the update 3 times in a row (last: step ")
    assert "not finite); stopping: lower --learning_rate" in error


@pytest.mark.slow
def test_lora_recipe_skips_a_nan_batch(tmp_path, tiny_model_dir, small_text_file, capsys, monkeypatch):
    from test_lora import FAST_TRAIN, run_recipe

    poison = Poison(monkeypatch, steps=[3], factor=float("nan"))
    capsys.readouterr()
    metrics = run_recipe("lora", ["--model_name_or_path", str(tiny_model_dir), "--train_file", str(small_text_file),
                                  "--output_dir", str(tmp_path / "o"), *FAST_TRAIN, "--gradient_accumulation_steps",
                                  "1", "--on_spike", "skip"])
    err = capsys.readouterr().err
    assert poison.unchanged(3) and not poison.unchanged(2) and not poison.unchanged(4)
    [line] = _warnings(err)
    assert line.startswith("warning: non-finite loss at step 3: loss nan, gradient norm nan: not finite; data: "
                           "samples 16-23 of the run's order; largest gradient norms: transformer.h.")
    assert line.endswith("update skipped")
    assert metrics["train_steps"] == 8 and torch.isfinite(torch.tensor(metrics["eval_loss_after"]))


# A recipe run under a launcher, with the loss of one rank's batch at one step multiplied by FACTOR; every rank writes
# the sum of its weights (its shard's, under FSDP2) at the start of each training step to RECORD.<rank>.
WRAPPER = """
import functools, json, os, runpy, sys
from transformers import GPT2LMHeadModel

rank = int(os.environ.get("RANK", "0"))
record, poison_rank, poison_step, factor = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
real, step = GPT2LMHeadModel.forward, [0]

@functools.wraps(real)
def forward(model, *args, **kwargs):
    out = real(model, *args, **kwargs)
    if model.training:
        step[0] += 1
        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        total = sum(float(t.detach().double().sum()) for t in local)
        with open(f"{record}.{rank}", "a") as f:
            f.write(json.dumps([step[0], total]) + "\\n")
        if rank == poison_rank and step[0] == poison_step:
            out.loss = out.loss * factor
    return out

GPT2LMHeadModel.forward = forward
sys.argv = ["recipes/pretrain.py", *sys.argv[5:]]
runpy.run_path("recipes/pretrain.py", run_name="__main__")
"""


def _launch(tmp_path, tiny_tokenizer_dir, small_text_file, launch, poison_step, factor, *extra):
    """Run the poisoned pretrain.py on 2 ranks (rank 1 poisoned); return (result, {rank: {step: weight sum}})."""
    import json

    from conftest import REPO, free_port, run_script

    wrapper = tmp_path / "poisoned_pretrain.py"
    wrapper.write_text(WRAPPER)
    record = tmp_path / "weights"
    if launch == "ddp":
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    else:
        launcher = ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" /
                                                                              "fsdp_cpu.yaml"),
                    "--main_process_port", str(free_port())]
    result = run_script([*launcher, str(wrapper), str(record), "1", str(poison_step), str(factor),
                         "--preset", "gpt2-nano", "--tokenizer_name", str(tiny_tokenizer_dir),
                         "--train_file", str(small_text_file), "--data_cache_dir", str(tmp_path / "cache"),
                         "--block_size", "32", "--per_device_train_batch_size", "4",
                         "--warmup_steps", "2", "--logging_steps", "1", "--eval_strategy", "no",
                         "--report_to", "none", "--sample_max_new_tokens", "4", "--use_cpu", "true",
                         "--optim", "adamw_torch_fused", "--output_dir", str(tmp_path / "out"), *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    sums = {}
    for rank in (0, 1):
        rows = [json.loads(x) for x in (tmp_path / f"weights.{rank}").read_text().splitlines()]
        sums[rank] = {step: total for step, total in rows}
    return result, sums


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp2"])
def test_a_nan_on_one_rank_skips_the_update_on_every_rank(tmp_path, tiny_tokenizer_dir, small_text_file, launch):
    result, sums = _launch(tmp_path, tiny_tokenizer_dir, small_text_file, launch, 4, float("nan"),
                           "--max_steps", "6", "--save_strategy", "no")
    [line] = _warnings(result.stderr)  # rank 0 reports it, for every rank
    assert line.startswith("warning: non-finite loss at step 4: loss nan, gradient norm nan: not finite; data: "
                           "samples 24-31 of the run's order; train blocks ")
    assert len(line.split("train blocks ")[1].split(" (")[0].split(", ")) == 8  # both ranks' blocks
    for rank in (0, 1):
        assert sums[rank][4] == sums[rank][5], (rank, sums[rank])  # step 4's update skipped on this rank too
        assert sums[rank][3] != sums[rank][4] and sums[rank][5] != sums[rank][6]
    if launch == "ddp":
        assert sums[0] == sums[1]  # the replicas stayed identical


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp2"])
def test_a_spike_on_one_rank_rolls_every_rank_back(tmp_path, tiny_tokenizer_dir, small_text_file, launch):
    """The loss of rank 1's batch x10 at step 12: the mean over the ranks spikes, both ranks reload checkpoint-10
    (under FSDP2 each its own shard) and go on."""
    result, sums = _launch(tmp_path, tiny_tokenizer_dir, small_text_file, launch, 12, 10.0,
                           "--max_steps", "14", "--save_steps", "5", "--on_spike", "rollback")
    [line] = _warnings(result.stderr)
    assert line.startswith("warning: spike loss at step 12: ")
    assert line.endswith("update skipped, rolled back to checkpoint-10 (the data since then is skipped)")
    for rank in (0, 1):
        assert sums[rank][13] == sums[rank][11], (rank, sums[rank])  # the weights after step 10, again
        assert sums[rank][12] != sums[rank][11] and sums[rank][14] != sums[rank][13]
