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
    check_writable_dir(output_dir)
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


def check_writable_dir(path: str, option: str = "--output_dir") -> None:
    """The folder exists or could be made, and files could be written in it; else one line naming the problem.
    Nothing is created: a run refused later for another reason leaves no trace."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} '{path}' is an existing file, not a folder; choose a folder path")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot create {option} '{path}': '{existing}' is a file; choose a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} '{path}' is not writable ('{existing}' is read-only for you); choose another folder")


def check_resume_compatible(checkpoint: str, config) -> None:
    """A checkpoint from another model shape fails deep in torch with a size-mismatch wall; say it plainly."""
    import json

    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        return  # sharded (FSDP) checkpoints keep the config beside the shards; torch checks shapes there
    try:
        saved = json.loads(open(path).read())
    except (OSError, ValueError):
        raise UserError(f"checkpoint '{checkpoint}' has a corrupt config.json; resume from an earlier checkpoint-N folder") from None
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
        if key in saved and saved[key] != getattr(config, key, saved[key]):
            raise UserError(f"checkpoint '{checkpoint}' was trained with {key}={saved[key]} but this run has "
                            f"{key}={getattr(config, key)}; use the same model options as the run that wrote it")


def load_pretrained_model(name_or_path: str, **kwargs):
    """AutoModelForCausalLM.from_pretrained with one-line errors for a missing or corrupt checkpoint."""
    from transformers import AutoModelForCausalLM

    from toolkit.sources import is_local_path

    if is_local_path(name_or_path) and not os.path.isdir(name_or_path):
        raise UserError(f"model folder '{name_or_path}' does not exist; pass a save_pretrained folder or a Hub model name")
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as err:  # OSError, SafetensorError, size mismatches...: all mean "this is not a usable checkpoint"
        first = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}" if str(err).strip() else type(err).__name__
        raise UserError(f"could not load model '{name_or_path}' ({first}); check that it is a complete "
                        "save_pretrained folder (config.json + model.safetensors) or a reachable Hub name") from None
