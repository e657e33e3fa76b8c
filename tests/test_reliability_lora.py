"""LoRA runs survive interruption: SIGTERM saves a checkpoint and the resumed run gives the uninterrupted losses.
(Apart from tests/test_reliability.py, whose pretraining runs share one reference run, so that the two files can run
in two pytest-xdist workers at once.)"""

from __future__ import annotations

import signal

import pytest
from conftest import run_script
from test_reliability import losses, wait_for_steps


@pytest.mark.slow
def test_lora_sigterm_then_resume_gives_the_same_losses(tiny_model_dir, small_text_file, tmp_path, background):
    args = ["recipes/lora.py", "--model_name_or_path", str(tiny_model_dir), "--train_file", str(small_text_file),
            "--max_steps", "30", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8",
            "--max_length", "64", "--max_eval_samples", "8", "--lora_r", "4", "--lora_alpha", "8",
            "--lora_dropout", "0.0", "--logging_steps", "1", "--sample_max_new_tokens", "4", "--seed", "0",
            "--report_to", "none", "--save_strategy", "steps", "--save_steps", "30"]
    reference = tmp_path / "reference"
    result = run_script([*args, "--output_dir", str(reference)])
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "interrupted"
    run = background([*args, "--output_dir", str(out)], warm=True)
    wait_for_steps(run, 6)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 128 + signal.SIGTERM
    assert "Traceback" not in run.stderr()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter_model.safetensors").exists()
    assert not (out / "adapter_config.json").exists()  # not a finished run, so resuming is allowed
    stopped = int(checkpoints[0].name.split("-")[1])
    result = run_script([*args, "--output_dir", str(out), "--resume_from_checkpoint", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert stopped < 30
    want, got = losses(reference / "checkpoint-30"), losses(out / "checkpoint-30")  # the final checkpoints' histories
    for step in range(stopped + 1, 31):
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
