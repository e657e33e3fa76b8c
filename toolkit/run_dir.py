"""The output folder of a run: never overwrite a previous run unless asked, and find checkpoints to resume."""

from __future__ import annotations

import os
import shutil

from transformers.trainer_utils import get_last_checkpoint

from toolkit.errors import UserError

RUN_MARKERS = ("config.json", "adapter_config.json", "trainer_state.json", "model.safetensors")


def holds_a_run(output_dir: str) -> bool:
    if not os.path.isdir(output_dir):
        return False
    return any(os.path.exists(os.path.join(output_dir, m)) for m in RUN_MARKERS) or get_last_checkpoint(output_dir) is not None


def prepare_output_dir(output_dir: str, overwrite: bool, resume_from_checkpoint: str | None, is_main_process: bool = True) -> str | None:
    """Check the output folder against the user's intent; return the checkpoint to resume from (or None).

    - `--resume_from_checkpoint auto`: the newest complete checkpoint in output_dir, or a fresh start if none.
    - `--resume_from_checkpoint PATH`: that folder, which must hold a Trainer checkpoint.
    - otherwise output_dir must not hold a previous run, unless --overwrite_output_dir (then old checkpoints go).
    """
    if resume_from_checkpoint == "auto":
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None and holds_a_run(output_dir) and not overwrite:
            raise UserError(f"'{output_dir}' holds a finished run with no checkpoint to resume; pass --overwrite_output_dir "
                            "to train again from scratch, or choose another --output_dir")
        return last
    if resume_from_checkpoint:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, "trainer_state.json")):
            raise UserError(f"'{resume_from_checkpoint}' is not a complete checkpoint (no trainer_state.json); "
                            f"pass a checkpoint-N folder or --resume_from_checkpoint auto")
        return resume_from_checkpoint
    if holds_a_run(output_dir):
        if not overwrite:
            raise UserError(f"output_dir '{output_dir}' already holds a run; pass --overwrite_output_dir to replace it, "
                            "--resume_from_checkpoint auto to continue it, or choose another --output_dir")
        if is_main_process:
            for name in os.listdir(output_dir):
                if name.startswith("checkpoint-"):
                    shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return None
