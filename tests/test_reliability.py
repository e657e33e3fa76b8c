"""Runs survive interruption, bad input gets a clear one-line error, nothing is lost."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import REPO, embedded_texts, one_error_line, run_recipe_in_process, run_script

TINY = ["--preset", "gpt2-nano", "--vocab_size", "512", "--block_size", "32", "--per_device_train_batch_size", "8",
        "--learning_rate", "3e-3", "--warmup_steps", "5", "--report_to", "none", "--sample_max_new_tokens", "4",
        "--logging_steps", "1", "--eval_strategy", "no"]


STEPS = 50


def losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def wait_for_steps(run, n: int, timeout: float = 240) -> None:
    """Until a background recipe run has logged n training losses."""
    deadline = time.time() + timeout
    while sum("'loss'" in line for line in list(run.out)) < n:
        assert run.poll() is None, f"run ended early: {run.stderr()[-2000:]}"
        assert time.time() < deadline, "run did not reach the step in time"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def common(tmp_path_factory, small_text_file):
    root = tmp_path_factory.mktemp("reliability")
    # long enough that a signal sent after step 8 lands well before the end, even on a fast machine
    args = [*TINY, "--train_file", str(small_text_file), "--data_cache_dir", str(root / "cache"),
            "--max_steps", str(STEPS)]
    reference = root / "reference"
    result = run_script(["recipes/pretrain.py", *args, "--output_dir", str(reference), "--save_strategy", "no"])
    assert result.returncode == 0, result.stderr[-3000:]
    return root, args, losses(reference)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_gives_the_same_losses(common, background):
    root, args, reference = common
    out = root / "sigterm"
    run = background(["recipes/pretrain.py", *args, "--output_dir", str(out), "--save_steps", "1000"], warm=True)
    wait_for_steps(run, 8)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 128 + signal.SIGTERM
    assert "Traceback" not in run.stderr()
    assert any("--resume_from_checkpoint auto" in line for line in run.out)
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "optimizer.pt").exists()
    stopped = int(checkpoints[0].name.split("-")[1])
    assert 8 <= stopped < STEPS
    first = losses(checkpoints[0])
    for step in range(1, stopped + 1):  # determinism: same seed and config, same losses in another process
        assert first[step] == pytest.approx(reference[step], abs=1e-6)

    result = run_script(["recipes/pretrain.py", *args, "--output_dir", str(out), "--resume_from_checkpoint", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = losses(out)
    for step in range(stopped + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step


@pytest.mark.slow
def test_kill_9_leaves_the_newest_complete_checkpoint_usable(common, background):
    root, args, reference = common
    out = root / "kill9"
    run = background(["recipes/pretrain.py", *args, "--output_dir", str(out), "--save_steps", "3",
                      "--save_total_limit", "2"], warm=True)
    wait_for_steps(run, 14)
    run.proc.kill()
    run.wait(timeout=30)
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out))
    assert last is not None and os.path.isfile(os.path.join(last, "trainer_state.json"))
    result = run_script(["recipes/pretrain.py", *args, "--output_dir", str(out), "--resume_from_checkpoint", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = losses(out)
    assert int(last.rsplit("-", 1)[1]) < STEPS
    for step in range(int(last.rsplit("-", 1)[1]) + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step


def test_checkpoints_appear_only_when_complete_and_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from toolkit.errors import UserError
    from toolkit.trainer import STAGING_DIR, PretrainTrainer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=4,
                             report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = PretrainTrainer(model=model, args=args, train_dataset=data, flops_per_token=1.0, peak_flops=None,
                              tokens_per_step=64)
    real_save = Trainer._save_optimizer_and_scheduler
    calls = []

    def save_then_fill_the_disk(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 1:
            assert STAGING_DIR in output_dir and not (tmp_path / "checkpoint-1").exists()  # written aside first
            return real_save(self, output_dir)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save_then_fill_the_disk)
    with pytest.raises(UserError, match="disk full while saving checkpoint-2.*earlier checkpoints are intact"):
        trainer.train()
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").exists()  # renamed into place once complete
    assert not (tmp_path / "checkpoint-2").exists()  # the failed one never appears under its real name


def test_auto_resume_skips_a_broken_newest_checkpoint_and_an_explicit_one_is_refused(tmp_path, capsys):
    """What --resume_from_checkpoint takes: checkpoint-N folders whose files are whole. The newest can be broken
    (a copy that stopped half way, a disk error): `auto` falls back to the newest complete one, saying so."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from toolkit.errors import UserError
    from toolkit.run_dir import checkpoint_problem, prepare_output_dir
    from toolkit.trainer import PretrainTrainer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, save_steps=1, per_device_train_batch_size=4,
                             report_to="none", use_cpu=True, disable_tqdm=True)
    PretrainTrainer(model=model, args=args, train_dataset=data, flops_per_token=1.0, peak_flops=None,
                    tokens_per_step=64).train()
    first, second, third = (tmp_path / f"checkpoint-{n}" for n in (1, 2, 3))
    assert [checkpoint_problem(str(c)) for c in (first, second, third)] == [None, None, None]

    def truncate(path, keep: float = 0.5):
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    truncate(third / "model.safetensors")
    truncate(second / "optimizer.pt", 0.9)
    assert "model.safetensors is truncated" in checkpoint_problem(str(third))
    assert "optimizer.pt is truncated" in checkpoint_problem(str(second))
    capsys.readouterr()
    assert prepare_output_dir(str(tmp_path), False, "auto") == str(first)
    warning, *more = capsys.readouterr().err.strip().splitlines()
    assert not more and warning.startswith("warning: ")
    assert "skipping incomplete checkpoint(s) (checkpoint-3: model.safetensors is truncated" in warning
    assert "checkpoint-2: optimizer.pt is truncated" in warning
    assert warning.endswith("resuming from checkpoint-1 instead")
    with pytest.raises(UserError, match=r"'.*checkpoint-3' is not a complete checkpoint \(model.safetensors is trunc"):
        prepare_output_dir(str(tmp_path / "elsewhere"), False, str(third))
    (first / "trainer_state.json").write_text('{"global_step": ')  # cut mid-write
    assert checkpoint_problem(str(first)) == "trainer_state.json is not valid JSON"
    with pytest.raises(UserError, match="no complete checkpoint in .*checkpoint-3: model.safetensors is truncated"):
        prepare_output_dir(str(tmp_path), False, "auto")  # starting again silently would lose the run


def test_a_resume_with_another_global_batch_is_refused_by_name(tmp_path):
    """A checkpoint records how its run split the global batch; where the Trainer skips batches to resume (fine-tuning,
    streams), another global batch is refused (the data position and the schedule would be off) and another split of
    the same one is allowed; where the data resumes by samples seen (pretraining from a store), any is allowed."""
    from transformers import TrainingArguments

    from toolkit.args.pretrain import PretrainArguments
    from toolkit.distributed_report import BATCH_RECORD
    from toolkit.errors import UserError
    from toolkit.run_dir import check_resume_batch

    saved = {"per_device_train_batch_size": 4, "world_size": 2, "gradient_accumulation_steps": 1,
             "global_batch_size": 8}
    (tmp_path / "trainer_state.json").write_text(json.dumps(
        {"global_step": 6, "stateful_callbacks": {BATCH_RECORD: {"args": {}, "attributes": {"batch": saved}}}}))
    one_process = dict(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    check_resume_batch(str(tmp_path), PretrainArguments(**one_process, per_device_train_batch_size=4,
                                                        gradient_accumulation_steps=2))
    check_resume_batch(str(tmp_path), PretrainArguments(**one_process, per_device_train_batch_size=4), by_samples=True)
    with pytest.raises(UserError) as err:
        check_resume_batch(str(tmp_path), PretrainArguments(**one_process, per_device_train_batch_size=4))
    assert str(err.value) == (f"checkpoint '{tmp_path}' was trained with a global batch of 8 sequences (4 per device "
                              "x 2 process(es) x 1 accumulation step(s)) but this run has 4 (4 per device x 1 "
                              "process(es) x 1 accumulation step(s)), which would change the data order and the "
                              "schedule; resume with --global_batch_size 8")
    with pytest.raises(UserError, match="resume with --per_device_train_batch_size and --gradient_accumulation_steps "
                                        "that make 8 with 1 process"):
        check_resume_batch(str(tmp_path), TrainingArguments(**one_process, per_device_train_batch_size=2))


@pytest.mark.slow
def test_sigterm_during_evaluation_and_during_a_save_then_a_broken_checkpoint(common, capsys, monkeypatch):
    """In one chain of runs of recipes/pretrain.py (each continuing the last, as a user would): SIGTERM while it
    evaluates, SIGTERM while it writes a checkpoint, then the newest checkpoint broken. Each signal lets the work in
    hand finish, saves at the end of the next step and exits 143; `auto` skips the broken checkpoint, saying so; the
    losses of the whole chain are those of the uninterrupted run. Also: the tensorboard logs the README promises
    (output_dir/runs, the logged losses), and --gradient_checkpointing gives the same losses."""
    import transformers
    from transformers import Trainer

    root, args, reference = common
    out = root / "eval-and-save"
    run = [*args, "--output_dir", str(out), "--eval_strategy", "steps", "--eval_steps", "10", "--save_steps", "10",
           "--cpu_keep_freed_memory", "false"]
    signalled = []

    def sigterm_once(step: int):
        if not signalled:
            signalled.append(step)
            os.kill(os.getpid(), signal.SIGTERM)

    real_predict, real_save = Trainer.prediction_step, Trainer._save_optimizer_and_scheduler

    def predict(self, *a, **k):
        sigterm_once(self.state.global_step)  # in the middle of the first evaluation
        return real_predict(self, *a, **k)

    monkeypatch.setattr(Trainer, "prediction_step", predict)
    code, err = run_recipe_in_process("pretrain", [*run, "--report_to", "tensorboard"], capsys)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert signalled == [10] and (out / "checkpoint-10").is_dir()  # the evaluation and its step's save finished
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-11"]  # stopped after 11
    events = sorted(out.glob("runs/*/events.out.tfevents.*"))
    assert len(events) == 1, events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(events[0]))
    board.Reload()
    logged = {e.step: e.value for e in board.Scalars("train/loss")}
    assert sorted(logged) == list(range(1, 12)) and "eval/loss" in board.Tags()["scalars"]
    for step, loss in losses(out / "checkpoint-11").items():
        assert logged[step] == pytest.approx(loss, rel=1e-6)

    monkeypatch.setattr(Trainer, "prediction_step", real_predict)
    signalled.clear()

    def save(self, output_dir):
        if self.state.global_step == 20:
            sigterm_once(20)  # the weights of checkpoint-20 are written, its optimizer state not yet
        return real_save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save)
    code, err = run_recipe_in_process("pretrain", [*run, "--resume_from_checkpoint", "auto"], capsys)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert signalled == [20] and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-21"]
    from toolkit.run_dir import checkpoint_problem

    assert checkpoint_problem(str(out / "checkpoint-20")) is None  # the interrupted save completed
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", real_save)

    newest = out / "checkpoint-21" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy that stopped half way
    code, err = run_recipe_in_process("pretrain", [*run, "--resume_from_checkpoint", "auto"], capsys)
    assert code == 0, err[-3000:]
    assert "warning: skipping incomplete checkpoint(s) (checkpoint-21: model.safetensors is truncated" in err
    chain = losses(out)
    assert sorted(chain) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert chain[step] == pytest.approx(reference[step], abs=1e-5), step

    checkpointed = []
    real_checkpoint = transformers.modeling_utils.checkpoint

    def counting_checkpoint(*a, **k):
        checkpointed.append(1)
        return real_checkpoint(*a, **k)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    again = root / "gradient-checkpointing"
    last_but_one = out / f"checkpoint-{STEPS - 10}"
    code, err = run_recipe_in_process("pretrain", [*run, "--output_dir", str(again), "--gradient_checkpointing",
                                                   "true", "--resume_from_checkpoint", str(last_but_one)], capsys)
    assert code == 0 and checkpointed, err[-3000:]  # activations really were recomputed
    recomputed = losses(again)
    for step in range(STEPS - 9, STEPS + 1):
        assert recomputed[step] == pytest.approx(reference[step], abs=1e-5), step


# ---------- bad input: one line, exit 2, no traceback ----------

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 100)
    (root / "short.txt").write_text("just a few words")
    (root / "ok.txt").write_text("\n\n".join(embedded_texts(10)))
    (root / "typo.yaml").write_text("block_sise: 64\n")
    (root / "data.xyz").write_text("some text")
    (root / "content.jsonl").write_text("\n".join(json.dumps({"content": t}) for t in embedded_texts(10)))
    corrupt = root / "corrupt-model"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    other_shape = root / "other-checkpoint"  # a complete checkpoint of a 5-layer model
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=5, n_head=2, n_embd=64, vocab_size=512,
                               n_positions=256)).save_pretrained(other_shape)
    (other_shape / "trainer_state.json").write_text("{}")
    from toolkit.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(embedded_texts(), 1000).save_pretrained(root / "big-tokenizer")
    return root


BAD_INPUTS = [
    ("missing data file", ["--train_file", "{root}/nope.txt"], "does not exist"),
    ("empty data file", ["--train_file", "{root}/empty.txt"], "is empty"),
    ("unreadable data file", ["--train_file", "{root}/binary.txt"], "could not read"),
    ("unsupported file type", ["--train_file", "{root}/data.xyz"], r"unsupported data file type \['.xyz'\]"),
    ("table without the text column", ["--train_file", "{root}/content.jsonl"],
     "no 'text' (column|field).*--text_column"),
    ("data smaller than a block", ["--train_file", "{root}/short.txt", "--block_size", "64"],
     "shorter than one block"),
    ("fewer blocks than one batch", ["--per_device_train_batch_size", "100000", "--skip_memory_check"],
     "blocks of 128 tokens, fewer than one batch"),
    ("unknown preset", ["--preset", "gpt5"], "unknown model preset 'gpt5'"),
    ("n_embd not divisible by n_head", ["--n_embd", "100", "--n_head", "3"], "not divisible by n_head"),
    ("block_size above n_positions", ["--block_size", "512"], "larger than the model's n_positions"),
    ("unknown YAML key", ["--config", "{root}/typo.yaml"], "unknown key.*block_sise"),
    ("unknown command-line option", ["--block_sise", "64"], "unknown command-line option.*block_sise"),
    ("YAML file missing", ["--config", "{root}/nope.yaml"], "cannot read config file .*nope.yaml' \\(No such file"),
    ("tokenizer larger than the model vocab",
     ["--model_name_or_path", "{model}", "--tokenizer_name", "{root}/big-tokenizer"],
     "tokenizer has 1000 tokens but the model's vocab_size is"),
    ("corrupt checkpoint", ["--model_name_or_path", "{root}/corrupt-model", "--tokenizer_name", "{model}"],
     "could not load model"),
    ("missing model folder", ["--model_name_or_path", "{root}/no-model"], "does not exist"),
    ("incompatible checkpoint", ["--resume_from_checkpoint", "{root}/other-checkpoint"], "trained with n_layer=5"),
    ("incomplete checkpoint", ["--resume_from_checkpoint", "{root}"], "not a complete checkpoint"),
    ("bf16 without hardware support", ["--bf16", "true"], "--bf16 on a CPU without fast bf16"),
    ("bf16 on a GPU without bf16", ["--bf16", "true"], "--bf16 on a GPU without bf16 support; drop --bf16"),
    ("global batch not divisible", ["--global_batch_size", "10"], "not divisible by per-device batch"),
    ("streaming without max_steps", ["--dataset_name", "some/corpus", "--streaming", "true", "--max_steps", "-1"],
     "--streaming needs --max_steps"),
    ("streaming without a tokenizer", ["--dataset_name", "some/corpus", "--streaming", "true", "--max_steps", "5"],
     "--streaming needs --tokenizer_name"),
]


@pytest.mark.parametrize("name,argv,message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gives_a_one_line_error(name, argv, message, bad_inputs, tiny_model_dir, tmp_path, capsys,
                                          monkeypatch):
    import re

    if name == "bf16 without hardware support":
        import torch

        from toolkit import flops

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present: --bf16 is checked against the GPU there")
        # The check measures bf16 vs fp32 matmul speed (CPU flags are unreliable); make this CPU a slow-bf16 one.
        monkeypatch.setattr(flops, "cpu_bf16_speedup", lambda: 0.05)
    if name == "bf16 on a GPU without bf16":  # a V100 / T4 as the check sees it; it stops the run before any GPU work
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    argv = [a.format(root=bad_inputs, model=tiny_model_dir) for a in argv]
    base = ["--preset", "gpt2-nano", "--vocab_size", "512", "--per_device_train_batch_size", "4",
            "--report_to", "none",
            "--output_dir", str(tmp_path / "out"), "--data_cache_dir", str(tmp_path / "cache")]
    if "--train_file" not in argv:
        base += ["--train_file", str(bad_inputs / "ok.txt")]
    code, err = run_recipe_in_process("pretrain", base + argv, capsys)
    assert code == 2 and re.search(message, one_error_line(err)), err[-2000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_loading_is_safe_in_our_code():
    """No pickle loads of weights, no remote code unless the user asks: scan our sources for the unsafe forms."""
    import re

    sources = [p for d in ("toolkit", "recipes", "benchmarks") for p in (REPO / d).rglob("*.py")]
    assert sources
    for path in sources:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 1, match.end()
            while depth and end < len(text):  # the whole call, nested parentheses included
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            call = text[match.start():end]
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert not re.search(r"trust_remote_code\s*=\s*True", text), f"{path.name} turns on remote code"
        assert "safe_serialization=False" not in text, f"{path.name} writes pickled weights"


def test_push_problems_are_caught_before_training(bad_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login either
    base = ["--preset", "gpt2-nano", "--report_to", "none", "--train_file", str(bad_inputs / "ok.txt"),
            "--output_dir", str(tmp_path / "out"), "--push_to_hub", "true"]
    code, err = run_recipe_in_process("pretrain", base + ["--hub_model_id", "someone/not a repo!"], capsys)
    assert code == 2 and "is not a Hub repo id" in one_error_line(err)
    code, err = run_recipe_in_process("pretrain", base + ["--hub_model_id", "someone/gpt2-test"], capsys)
    assert code == 2 and "no Hub token found" in one_error_line(err)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_signal_after_training_lets_the_results_be_saved_then_ends_the_run(capsys):
    """SIGTERM during the final evaluation, sample or save (after train() returned): the handler stays until the
    recipe has written its results, then the run ends with 128 + the signal, saying the results were saved."""
    import signal
    from types import SimpleNamespace

    from toolkit.callbacks import GracefulStopCallback

    before = signal.getsignal(signal.SIGTERM)
    stop = GracefulStopCallback()
    try:
        assert signal.getsignal(signal.SIGTERM) == stop._request_stop
        stop.on_train_end(None, None, None)  # training over: the handler must still be ours
        assert signal.getsignal(signal.SIGTERM) == stop._request_stop
        signal.raise_signal(signal.SIGTERM)  # recorded, not fatal
        args = SimpleNamespace(process_index=0, output_dir="out/x")
        stop.exit_if_stopped(args)  # not a stop of training: nothing to resume
        with pytest.raises(SystemExit) as exc:
            stop.release(args)
        assert exc.value.code == 128 + signal.SIGTERM
        assert "SIGTERM received after training; the results were saved in out/x" in capsys.readouterr().out
    finally:
        signal.signal(signal.SIGTERM, before)
    assert signal.getsignal(signal.SIGTERM) == before
