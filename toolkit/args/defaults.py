"""Defaults that depend on the machine or on other options, resolved by calls a reader of the recipe sees.

`resolve_defaults(recipe)` runs before parsing (its values sit under the YAML and the command line, so a user
can still override each one); `derive_settings(training_args)` and, for pretraining, `resolve_model_shape(model_args)`
run after it, for settings computed from other options.
"""

from __future__ import annotations

import os

from toolkit.errors import UserError

RECIPES = ("pretrain", "lora", "qlora")


def resolve_defaults(recipe: str) -> dict:
    """This recipe's defaults on this machine.

    - bf16 mixed precision on GPUs that support it; fp32 on CPU (bf16 matmuls are many times slower on CPUs
      without native bf16: docs/benchmarks.md, figures behind code comments).
    - Several ranks on a machine without GPUs join one gloo process group (`use_cpu`); without it accelerate
      would start N independent copies that each train as rank 0.
    - Fine-tuning: activation checkpointing on with CUDA, and for QLoRA everywhere (memory is QLoRA's point, as in
      peft's prepare_model_for_kbit_training and the QLoRA paper); LoRA on CPU favours speed (docs/benchmarks.md
      section 4b).
      Paged AdamW for a 4-bit base on CUDA (optimizer state pages to CPU under memory spikes); paging means
      nothing on a CPU. On CPU, LoRA keeps freed memory for the next step (faster steps, toolkit/cpu_allocator.py)
      and QLoRA hands it back (its dequantized weights leave holes in a heap that keeps everything;
      docs/benchmarks.md section 4).
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


def resolve_model_shape(model_args) -> None:
    """pretrain.py's model when --preset is not given, and its vocabulary when neither --vocab_size nor
    --tokenizer_name is.

    The guide's `--n-layer 48 --n-head 16 --n-embd 1600` means GPT-2 1.5B: shape flags without a preset, training from
    scratch, start from GPT-2's own shape (1,024 positions) and its 50,257-token vocabulary, kept as the model's rows
    even when a BPE trained on little text has fewer tokens (`gpt2_shape` records the choice). Otherwise the default
    is the CPU-sized preset with a 4,096-token BPE.
    """
    from toolkit.args.pretrain import DEFAULT_BPE_VOCAB, DEFAULT_PRESET, GPT2_SHAPE_PRESET
    from toolkit.presets import GPT2_VOCAB_SIZE

    shape_flags = any(v is not None for v in (model_args.n_layer, model_args.n_head, model_args.n_embd))
    from_scratch = not (model_args.model_name_or_path or model_args.config_name)
    model_args.gpt2_shape = model_args.preset is None and shape_flags and from_scratch
    if model_args.preset is None:
        model_args.preset = GPT2_SHAPE_PRESET if model_args.gpt2_shape else DEFAULT_PRESET
    vocabulary_given = model_args.vocab_size is not None or model_args.tokenizer_name is not None
    if model_args.vocab_size is None:
        model_args.vocab_size = GPT2_VOCAB_SIZE if model_args.gpt2_shape else DEFAULT_BPE_VOCAB
    if model_args.gpt2_shape and not vocabulary_given:
        floor = f"vocab_size={GPT2_VOCAB_SIZE}"
        given = model_args.config_overrides
        model_args.config_overrides = f"{given},{floor}" if given else floor
