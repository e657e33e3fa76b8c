"""End-to-end runs of recipes/pretrain.py as a user runs it (real subprocesses, CPU, offline)."""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import GPT2_TOKENIZER, REPO, SHAKESPEARE, needs_shared, one_error_line, run_recipe_in_process, run_script

from toolkit.cpu_allocator import user_allocator_setting

pytestmark = pytest.mark.slow

TINY = ["--preset", "gpt2-nano", "--vocab_size", "512", "--block_size", "32", "--per_device_train_batch_size", "8",
        "--warmup_steps", "5", "--report_to", "none", "--sample_max_new_tokens", "8"]
# documented flags the reference run also exercises (test_loss_goes_down_...: it trains, the loss falls, and): a
# position table of 64 instead of the preset's 256, and a held-out split capped at 1,024 tokens
FLAGS = ["--config_overrides", "n_positions=64", "--validation_max_tokens", "1024"]


def train_losses(output_dir) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def eval_losses(output_dir) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {h["step"]: h["eval_loss"] for h in state["log_history"] if "eval_loss" in h}


@pytest.fixture(scope="module")
def finished_run(pretrain_reference, small_text_file):
    """One 40-step run with a BPE trained on the text; checkpoints every 10 steps (conftest's shared reference)."""
    return pretrain_reference([*TINY, *FLAGS, "--train_file", str(small_text_file), "--max_steps", "40",
                               "--logging_steps", "1", "--eval_on_start", "true", "--eval_steps", "20",
                               "--save_steps", "10", "--save_total_limit", "10"])


def test_loss_goes_down_and_output_loads_with_from_pretrained(finished_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = finished_run
    evals = eval_losses(out)
    assert evals[0] > math.log(512) - 0.5  # a fresh model: close to uniform over the vocabulary
    assert evals[max(evals)] < evals[0] - 0.5, evals  # validation loss really went down
    assert "Model saved to" in result.stdout and "perplexity" in result.stdout and "Sample:" in result.stdout
    assert "peak lr 0.003;" in result.stdout  # no --learning_rate: the default for a 64-wide model
    # toolkit/cpu_allocator.py applied on CPU
    if sys.platform.startswith("linux") and user_allocator_setting() is None:
        assert "CPU memory: glibc keeps freed memory for reuse" in result.stdout
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "model.safetensors").exists() and (out / "generation_config.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(out)  # the BPE trained by the run, saved with the model
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_layer == 2 and len(tokenizer) <= model.config.vocab_size
    assert model.config.n_positions == 64  # --config_overrides over the preset's 256
    # --validation_max_tokens: the held-out tail of the one document is at most 1,024 tokens (32 blocks of 32)
    manifests = [json.loads(m.read_text()) for m in (out.parent / "cache").rglob("manifest.json")]
    assert [m["splits"]["validation"]["tokens"] for m in manifests if "splits" in m] == [1024], manifests
    ids = tokenizer("The", return_tensors="pt").input_ids
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5


def test_resume_reproduces_the_uninterrupted_losses(finished_run, small_text_file, tmp_path):
    out, _ = finished_run
    resumed = tmp_path / "resumed"
    # the model's shape from the finished run's config.json (--config_name) instead of the preset and overrides:
    # a checkpoint only resumes into the same shape, and then gives the same losses
    shape_from_config = ["--config_name", str(out), *TINY[4:], *FLAGS[2:]]
    result = run_script(["recipes/pretrain.py", *shape_from_config, "--train_file", str(small_text_file),
                         "--output_dir", str(resumed),
                         "--max_steps", "40", "--logging_steps", "1", "--eval_steps", "20", "--save_steps", "10",
                         "--resume_from_checkpoint", str(out / "checkpoint-20"), "--tokenizer_name", str(out),
                         "--data_cache_dir", str(out.parent / "cache")])
    assert result.returncode == 0, result.stderr[-3000:]
    # the first run's store, memory-mapped again
    assert f"from the token store {out.parent / 'cache'}" in result.stdout
    full, again = train_losses(out), train_losses(resumed)
    assert set(range(21, 41)) <= set(again)  # (steps 1-20 come from the checkpoint's history)
    for step in range(21, 41):
        assert again[step] == pytest.approx(full[step], abs=1e-5), step


def test_refuses_to_overwrite_a_finished_run(finished_run, capsys):
    out, _ = finished_run
    before = (out / "model.safetensors").read_bytes()
    code, stderr = run_recipe_in_process("pretrain", [*TINY, "--output_dir", str(out), "--max_steps", "2"], capsys)
    assert code == 2
    line = one_error_line(stderr)
    assert "already holds a run" in line and "--overwrite_output_dir" in line
    assert (out / "model.safetensors").read_bytes() == before  # nothing lost


@needs_shared
def test_shakespeare_with_the_real_gpt2_tokenizer(tmp_path):
    out = tmp_path / "shakespeare"
    result = run_script(["recipes/pretrain.py", "--preset", "gpt2-nano", "--train_file", str(SHAKESPEARE),
                         "--tokenizer_name", str(GPT2_TOKENIZER), "--block_size", "64",
                         "--per_device_train_batch_size", "8", "--max_steps", "30", "--learning_rate", "3e-3",
                         "--warmup_steps", "5", "--eval_on_start", "true", "--eval_steps", "30",
                         "--save_strategy", "no", "--report_to", "none", "--output_dir", str(out),
                         "--validation_split_percentage", "1", "--sample_max_new_tokens", "8",
                         "--data_cache_dir", str(tmp_path / "cache")])
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoConfig, AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == 50257
    assert AutoConfig.from_pretrained(out).vocab_size == 50304  # padded to a multiple of 64
    evals = eval_losses(out)
    assert evals[30] < evals[0] - 2.0, evals


def test_help_explains_the_options(capsys):
    """In this process (pretrain.py's real processes are the runs above)."""
    import runpy

    old = sys.argv
    sys.argv = ["recipes/pretrain.py", "--help"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "recipes" / "pretrain.py"), run_name="__main__")
    finally:
        sys.argv = old
    assert exit_info.value.code in (0, None)
    help_text = capsys.readouterr().out
    for flag in ("--preset", "--train_file", "--tokenizer_name", "--block_size", "--resume_from_checkpoint",
                 "--overwrite_output_dir", "--config_overrides", "--attn_implementation", "--validation_max_tokens"):
        assert flag in help_text, flag


def test_sample_has_the_requested_length_even_when_the_model_favours_eos(tmp_path, tiny_model_dir):
    """The sample printed at the end shows text: a model that would end the document at once (a small corpus of
    short documents makes one) still writes --sample_max_new_tokens tokens."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    spec = importlib.util.spec_from_file_location("recipe_pretrain", REPO / "recipes" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # the final LayerNorm's output leans along one axis, and the (tied) EOS row points along it
        model.transformer.ln_f.bias[0] = 10.0
        model.transformer.wte.weight[tokenizer.eos_token_id] = 0.0
        model.transformer.wte.weight[tokenizer.eos_token_id, 0] = 10.0
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    first = model(torch.tensor([[tokenizer.eos_token_id]])).logits[0, -1]
    assert first.argmax().item() == tokenizer.eos_token_id  # the model alone would stop at once

    sample = pretrain.generate_sample(str(tmp_path), "", max_new_tokens=12, seed=0)
    assert len(tokenizer(sample).input_ids) >= 6  # 12 sampled tokens (re-tokenizing may merge some)
