"""The output folder of a run: never overwrite a previous run unless asked, find checkpoints to resume, and write the
final model as one normal save_pretrained folder whatever the launch (`export_full_model`).

Resuming (`--resume_from_checkpoint auto` or a path) takes a checkpoint only when its files are whole: the newest
one can still be broken although checkpoints are renamed into place only once written (toolkit/trainer.py), e.g.
by a copy or sync that stopped half way, a disk error, or a checkpoint written by other code. `auto` then falls
back to the newest complete one and says so on stderr; an explicit path is refused with the reason. The checks
read file headers and sizes only, never the tensors, so they cost milliseconds whatever the model size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import zipfile

from transformers.trainer_utils import get_last_checkpoint

from toolkit.errors import UserError

RUN_MARKERS = ("config.json", "adapter_config.json", "trainer_state.json", "model.safetensors")


def holds_a_run(output_dir: str) -> bool:
    if not os.path.isdir(output_dir):
        return False
    markers = any(os.path.exists(os.path.join(output_dir, m)) for m in RUN_MARKERS)
    return markers or get_last_checkpoint(output_dir) is not None


def prepare_output_dir(output_dir: str, overwrite: bool, resume_from_checkpoint: str | None,
                       is_main_process: bool = True) -> str | None:
    """Check the output folder against the user's intent; return the checkpoint to resume from (or None).

    - `--resume_from_checkpoint auto`: the newest complete checkpoint in output_dir (skipping broken newer ones,
      with a warning), or a fresh start if there is none at all.
    - `--resume_from_checkpoint PATH`: that folder, which must hold a complete Trainer checkpoint.
    - otherwise output_dir must not hold a previous run, unless --overwrite_output_dir (then old checkpoints go).
    """
    check_writable_dir(output_dir)
    if resume_from_checkpoint == "auto":
        last = newest_complete_checkpoint(output_dir, warn=is_main_process) if os.path.isdir(output_dir) else None
        if last is None and holds_a_run(output_dir) and not overwrite:
            raise UserError(f"'{output_dir}' holds a finished run with no checkpoint to resume; pass "
                            "--overwrite_output_dir to train again from scratch, or choose another --output_dir")
        return last
    if resume_from_checkpoint:
        problem = checkpoint_problem(resume_from_checkpoint)
        if problem:
            raise UserError(f"'{resume_from_checkpoint}' is not a complete checkpoint ({problem}); "
                            f"pass a checkpoint-N folder or --resume_from_checkpoint auto")
        return resume_from_checkpoint
    if holds_a_run(output_dir):
        if not overwrite:
            raise UserError(f"output_dir '{output_dir}' already holds a run; pass --overwrite_output_dir to replace "
                            "it, --resume_from_checkpoint auto to continue it, or choose another --output_dir")
        if is_main_process:
            for name in os.listdir(output_dir):
                if name.startswith("checkpoint-"):
                    shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return None


def newest_complete_checkpoint(output_dir: str, warn: bool = True) -> str | None:
    """The checkpoint-N folder with the largest N whose files are whole. Broken newer ones are skipped with a
    one-line warning; if every checkpoint is broken, a UserError (starting again silently would lose the run)."""
    steps = {int(m.group(1)): name for name in os.listdir(output_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name))}
    broken = []
    for step in sorted(steps, reverse=True):
        path = os.path.join(output_dir, steps[step])
        problem = checkpoint_problem(path)
        if problem is None:
            if broken and warn:
                skipped = "; ".join(f"{name}: {why}" for name, why in broken)
                print(f"warning: skipping incomplete checkpoint(s) ({skipped}); resuming from {steps[step]} instead",
                      file=sys.stderr, flush=True)
            return path
        broken.append((steps[step], problem))
    if broken:
        name, why = broken[0]
        raise UserError(f"no complete checkpoint in '{output_dir}' ({name}: {why}); pass --overwrite_output_dir "
                        "without --resume_from_checkpoint to start again, or restore the checkpoint files")
    return None


def checkpoint_problem(path: str) -> str | None:
    """Why `path` cannot be resumed from, in a few words; None when it looks complete.

    Checks the trainer state (valid JSON), that there are weights (a full model, an adapter or FSDP shards), and
    that every file is whole: safetensors files as long as their header says, torch-saved files (optimizer,
    scheduler, RNG state: zip archives) with their end-of-archive directory, sharded folders with their metadata.
    """
    if not os.path.isdir(path):
        return "no such folder"
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json"
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    names = os.listdir(path)
    weights = [n for n in names if n.endswith(".safetensors") or n.startswith("pytorch_model_fsdp")]
    if not weights:
        return "no model or adapter weights"
    for name in sorted(names):
        full = os.path.join(path, name)
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(full)
        elif name.endswith((".pt", ".pth", ".bin")) and os.path.isfile(full):
            problem = None if zipfile.is_zipfile(full) else "is truncated or not a torch save file"
        elif os.path.isdir(full) and any(f.endswith(".distcp") for f in os.listdir(full)):
            files = os.listdir(full)
            empty = [f for f in files if f.endswith(".distcp") and os.path.getsize(os.path.join(full, f)) == 0]
            problem = ("has no .metadata" if ".metadata" not in files
                       else f"has an empty shard {empty[0]}" if empty else None)
        else:
            problem = None
        if problem:
            return f"{name} {problem}"
    return None


def _safetensors_problem(path: str) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header with each tensor's byte range, then the data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size:
                return f"is truncated ({size:,} bytes)"
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, AttributeError, KeyError, TypeError, IndexError):
        return "is not a safetensors file (unreadable header)"
    expected = 8 + header_len + end
    if size != expected:
        if size < expected:
            return f"is truncated ({size:,} of {expected:,} bytes)"
        return f"has {size - expected:,} extra bytes"
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
        raise UserError(f"{option} '{path}' is not writable ('{existing}' is read-only for you); "
                        "choose another folder")


def check_resume_compatible(checkpoint: str, config, training_args=None, by_samples: bool = False) -> None:
    """A checkpoint from another model shape fails deep in torch with a size-mismatch wall; say it plainly. With the
    training arguments, also the batch (check_resume_batch)."""
    if training_args is not None:
        check_resume_batch(checkpoint, training_args, by_samples)
    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        return  # sharded (FSDP) checkpoints keep the config beside the shards; torch checks shapes there
    try:
        saved = json.loads(open(path).read())
    except (OSError, ValueError):
        raise UserError(f"checkpoint '{checkpoint}' has a corrupt config.json; resume from an earlier checkpoint-N "
                        "folder") from None
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
        if key in saved and saved[key] != getattr(config, key, saved[key]):
            raise UserError(f"checkpoint '{checkpoint}' was trained with {key}={saved[key]} but this run has "
                            f"{key}={getattr(config, key)}; use the same model options as the run that wrote it")


def check_resume_batch(checkpoint: str, training_args, by_samples: bool = False) -> None:
    """FSDP shards resume under FSDP only; a run on another number of processes resumes with the same global batch
    (sequences per optimizer step), or with any when the data resumes by samples seen (`by_samples`).

    `by_samples` (pretraining from a token store): the checkpoint records the data position and the resumed loader
    starts there (toolkit/data/order.py), so any split and any global batch continue the same order; a changed
    global batch is announced there, with the samples seen. Otherwise (fine-tuning, streaming) the Trainer skips
    `steps done x accumulation` batches on each process, and a process's batches are every N-th per-device batch of
    the one seeded order: with the same global batch, 1, 2 or N processes see the same sequences at every step,
    whatever the split, while another global batch would skip the wrong amount of data: refused, naming the settings
    that restore it (pretraining on a stream: --global_batch_size). The checkpoint's batch is the one
    `toolkit.distributed_report.DistributedSetupCallback` recorded in trainer_state.json; older checkpoints have no
    record and are not checked.
    """
    from toolkit.distributed import fsdp_requested
    from toolkit.distributed_report import BATCH_RECORD, batch_geometry

    sharded = any(name.startswith("pytorch_model_fsdp") for name in os.listdir(checkpoint))
    if sharded and not fsdp_requested(training_args):
        raise UserError(f"checkpoint '{checkpoint}' holds FSDP shards; resume it under FSDP (accelerate launch "
                        "--config_file accelerate_configs/fsdp.yaml, or fsdp_cpu.yaml without GPUs)")
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            record = json.load(f).get("stateful_callbacks", {}).get(BATCH_RECORD, {})
    except (OSError, ValueError, AttributeError):
        return
    saved = (record.get("attributes") or {}).get("batch") if isinstance(record, dict) else None
    if not saved:
        return
    now = batch_geometry(training_args)

    def split(g: dict) -> str:
        return (f"{g['per_device_train_batch_size']} per device x {g['world_size']} process(es) x "
                f"{g['gradient_accumulation_steps']} accumulation step(s)")

    if saved["global_batch_size"] != now["global_batch_size"]:
        if by_samples:
            return
        want = saved["global_batch_size"]
        fix = (f"--global_batch_size {want}" if hasattr(training_args, "global_batch_size") else
               f"--per_device_train_batch_size and --gradient_accumulation_steps that make {want} "
               f"with {now['world_size']} process(es)")
        raise UserError(f"checkpoint '{checkpoint}' was trained with a global batch of {want} sequences "
                        f"({split(saved)}) but this run has {now['global_batch_size']} ({split(now)}), which would "
                        f"change the data order and the schedule; resume with {fix}")
    if saved["world_size"] != now["world_size"] and training_args.process_index == 0:
        print(f"note: resuming a {saved['world_size']}-process checkpoint on {now['world_size']} process(es) with "
              f"the same global batch of {now['global_batch_size']} sequences ({split(now)}): same data order and "
              "schedule")


def export_full_model(trainer, output_dir: str, tokenizer=None) -> None:
    """Write a plain `save_pretrained` folder (safetensors, config, tokenizer) that loads without FSDP.

    Call on every rank: under FSDP2 gathering the shards is a collective. Works the same for 1 process, DDP and
    FSDP1/2, whatever `fsdp_state_dict_type` says. Why not `trainer.save_model`: with SHARDED_STATE_DICT (what we
    use for fast sharded checkpoints) it writes nothing (the Trainer saves a model under FSDP only for
    FULL_STATE_DICT).
      * `accelerator.get_state_dict` gathers: for FSDP2 it is torch.distributed.checkpoint's
        `get_model_state_dict(full_state_dict=True, cpu_offload=True)`: full
        CPU tensors on rank 0, an empty dict elsewhere; for DDP / one process it is the plain state dict.
      * The gathered `lm_head.weight` and `transformer.wte.weight` are two separate tensors, so `save_pretrained`
        (which drops tied duplicates by storage pointer) would store the matrix
        twice. We check they are equal - a tied weight that diverged under sharding (accelerate#3870) fails loudly
        here - and point the tied name at its source, so the file holds one copy like any GPT-2 checkpoint.
    """
    import torch

    accelerator = trainer.accelerator
    state_dict = accelerator.get_state_dict(trainer.model)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        for tied, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
            if tied in state_dict and source in state_dict:
                if not torch.equal(state_dict[tied], state_dict[source]):
                    raise RuntimeError(
                        f"tied weights {tied} and {source} differ after training (max abs diff "
                        f"{(state_dict[tied] - state_dict[source]).abs().max().item():.3g}): the sharded update broke "
                        "the tie; not exporting a model that would reload differently"
                    )
                state_dict[tied] = state_dict[source]
        # save_pretrained names the architecture without FSDP2's "FSDP" class prefix
        model.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer = tokenizer if tokenizer is not None else trainer.processing_class
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
