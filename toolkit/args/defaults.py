"""Defaults that depend on the machine or on other options, resolved by calls a reader of the recipe sees.

`resolve_defaults(recipe)` runs before parsing (its values sit under the YAML and the command line, so a user
can still override each one); `derive_settings(training_args)` runs after it, for settings computed from
other options.
"""

from __future__ import annotations

import os

from toolkit.errors import UserError

RECIPES = ("pretrain", "lora", "qlora")


def resolve_defaults(recipe: str) -> dict:
    """This recipe's defaults on this machine.

    - bf16 mixed precision on GPUs that support it; fp32 on CPU (bf16 matmuls are ~20x slower on CPUs
      without native bf16: docs/benchmarks.md).
    - Several ranks on a machine without GPUs join one gloo process group (`use_cpu`); without it accelerate
      would start N independent copies that each train as rank 0.
    - Fine-tuning: activation checkpointing on with CUDA, and for QLoRA everywhere (memory is QLoRA's point, as in
      peft's prepare_model_for_kbit_training and the QLoRA paper); LoRA on CPU favours speed (~30% faster steps).
      Paged AdamW for a 4-bit base on CUDA (optimizer state pages to CPU under memory spikes); paging means
      nothing on a CPU. On CPU, LoRA keeps freed memory for the next step (faster steps, toolkit/cpu_allocator.py)
      and QLoRA hands it back (its dequantized weights leave holes in a heap that keeps everything: measured at
      350M, more anonymous memory than LoRA's; docs/benchmarks.md section 4).
    """
    import torch

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}")
    cuda = torch.cuda.is_available()
    defaults: dict = {"bf16": bool(cuda and torch.cuda.is_bf16_supported())}
    if not cuda:
        defaults["dataloader_pin_memory"] = False  # pinning needs an accelerator; on CPU it only warns
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            defaults["use_cpu"] = True
    if recipe == "pretrain":
        return defaults
    quantized = recipe == "qlora"
    defaults.update(
        output_dir=f"out/{recipe}",
        load_in_4bit=quantized,
        activation_checkpointing=cuda or quantized,
        optim="paged_adamw_32bit" if quantized and cuda else "adamw_torch",
        cpu_keep_freed_memory=not quantized,
    )
    return defaults


def derive_settings(training_args) -> None:
    """Settings computed from other options, after parsing.

    - `--global_batch_size`: sequences per optimizer step over all processes, so a run is the same on 1 or N
      processes; sets gradient_accumulation_steps from the per-device batch and the world size.
    - `cosine_with_min_lr` (pretraining's schedule) decays to 10% of the peak unless told otherwise.
    """
    global_batch = getattr(training_args, "global_batch_size", None)
    if global_batch is not None:
        per_step = training_args.per_device_train_batch_size * training_args.world_size
        if global_batch % per_step:
            raise UserError(f"--global_batch_size {global_batch} is not divisible by per-device batch "
                            f"{training_args.per_device_train_batch_size} x {training_args.world_size} processes; "
                            f"pick a multiple of {per_step}")
        training_args.gradient_accumulation_steps = global_batch // per_step
    if training_args.lr_scheduler_type == "cosine_with_min_lr" and not training_args.lr_scheduler_kwargs:
        training_args.lr_scheduler_kwargs = {"min_lr_rate": 0.1}
