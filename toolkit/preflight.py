"""Preflight: before any work, ask the planner (toolkit/plan) whether this run fits the memory it will run in.

Every recipe calls it right after parsing. The run's own settings (shape, micro-batch, sequence, accumulation,
precision, checkpointing, launch: 1 process, DDP or FSDP2) go to the planner's formulas; the memory is each GPU's
on CUDA and the RAM available now on CPU (shared by the processes of the launch). When the run does not fit, it
stops with one line: what it needs, what there is, and the fix the planner ranks first. `--skip_memory_check`
runs it anyway.

GPT2_TOOLKIT_MEMORY (e.g. `2GB`) replaces the detected memory (per GPU, or the CPU RAM available): for tests, and
to see what a smaller machine would say.
"""

from __future__ import annotations

import os

from toolkit.errors import UserError

MEMORY_ENV = "GPT2_TOOLKIT_MEMORY"


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_memory(device: str) -> tuple[float, str]:
    """Bytes this run may use per device, and where that number comes from."""
    from toolkit.plan.hardware import parse_memory

    override = os.environ.get(MEMORY_ENV)
    if override:
        try:
            return parse_memory(override), f"{MEMORY_ENV}={override}"
        except UserError:
            raise UserError(f"{MEMORY_ENV}={override!r} is not a memory size; write e.g. 8GB or 512MB") from None
    if device == "cuda":
        import torch

        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory), "GPU memory"
    import psutil

    return float(psutil.virtual_memory().available), "RAM available"


def launch_strategy() -> str:
    """single / ddp / fsdp / fsdp_offload, as the launcher asked (accelerate config or torchrun)."""
    from toolkit.distributed import fsdp_requested

    if fsdp_requested():
        return "fsdp_offload" if os.environ.get("FSDP_OFFLOAD_PARAMS", "").lower() in ("1", "true") else "fsdp"
    return "ddp" if _world_size() > 1 else "single"


def gpu_count_note(world_size: int, gpus: int) -> str | None:
    """The one line a launch that leaves GPUs idle prints."""
    if gpus <= world_size:
        return None
    return (f"note: this launch uses {world_size} of this machine's {gpus} GPUs; to use all of them: "
            f"torchrun --nproc_per_node={gpus} ... or accelerate launch --num_processes {gpus} ...")


def _precision(training_args) -> str:
    return "bf16" if training_args.bf16 else "fp16" if getattr(training_args, "fp16", False) else "fp32"


def _checkpointing(training_args) -> bool:
    return bool(getattr(training_args, "activation_checkpointing", False)
                or getattr(training_args, "gradient_checkpointing", False))


def check(shape, task: str, training_args, seq_len: int, lora_r: int = 16, lora_dropout: float = 0.0,
          lora_targets=None, double_quant: bool = True, attn: str = "sdpa") -> None:
    """Raise a one-line UserError when the planner says this run does not fit; print the idle-GPU note."""
    import torch

    from toolkit.plan import LORA_MODULES, Setup, estimate, make_plan
    from toolkit.plan.hardware import torch_is_cuda_build

    cuda = torch.cuda.is_available() and not getattr(training_args, "use_cpu", False)
    device = "cuda" if cuda else "cpu"
    world = _world_size()
    if cuda and _rank0():
        note = gpu_count_note(world, torch.cuda.device_count())
        if note:
            print(note)
    if getattr(training_args, "skip_memory_check", False):
        return
    memory, source = device_memory(device)
    setup = Setup(task=task, device=device, num_devices=world, device_memory=memory,
                  batch_size=training_args.per_device_train_batch_size, seq_len=seq_len,
                  grad_accum=training_args.gradient_accumulation_steps, precision=_precision(training_args),
                  gradient_checkpointing=_checkpointing(training_args), attn=attn if attn == "eager" else "sdpa",
                  lora_r=lora_r, lora_targets=tuple(lora_targets or LORA_MODULES), lora_dropout=lora_dropout,
                  double_quant=double_quant, torch_cuda_build=not cuda and torch_is_cuda_build(),
                  token_metrics=bool(getattr(training_args, "token_metrics", False)))
    strategy = launch_strategy()
    if strategy == "fsdp_offload" and not cuda:
        strategy = "fsdp"
    if task in ("lora", "qlora") and strategy != "single":
        strategy = "ddp"  # the planner models fine-tuning as 1 process or DDP
    run = estimate(shape, setup, strategy, setup.gradient_checkpointing)
    if run.fits:
        return
    raise UserError(verdict(run, setup, memory, source, make_plan(shape, setup)))


def verdict(run, setup, memory: float, source: str, plan) -> str:
    """needs, has, the planner's first fix: one line."""
    from toolkit.plan import GiB

    per = "per GPU" if setup.device == "cuda" else "per process"
    procs = f" x {setup.num_devices} processes" if setup.device == "cpu" and setup.num_devices > 1 else ""
    has = (f"each GPU has {memory / GiB:.1f} GiB ({source})" if setup.device == "cuda"
           else f"this machine has {memory / GiB:.1f} GiB ({source})")
    need = (f"this run needs {run.total / GiB:.1f} GiB {per}{procs} ({run.name}, micro-batch {setup.batch_size} x "
            f"{setup.seq_len} tokens)")
    return f"out of memory before it starts: {need} but {has}; fix: {first_fix(run, plan)} (or --skip_memory_check)"


def first_fix(run, plan) -> str:
    """The planner's choice as the change to this command (its config, checkpointing, micro-batch, accumulation)."""
    choice = plan.choice
    if choice is None:
        task = plan.setup.task
        if task in ("pretrain", "full"):
            more = "more GPUs" if plan.setup.device == "cuda" else "a machine with more RAM"
            return ("nothing fits even at micro-batch 1 with gradient checkpointing: a smaller model "
                    f"(--preset or smaller --n_layer/--n_embd) or {more}")
        if task == "lora":
            return "nothing fits even at micro-batch 1 with gradient checkpointing: recipes/qlora.py or a smaller base"
        return "nothing fits even at micro-batch 1 with gradient checkpointing: a smaller base"
    changes = []
    if choice.strategy != run.strategy and choice.strategy != "single":
        config = {"ddp": "ddp", "fsdp": "fsdp", "fsdp_offload": "fsdp_offload"}[choice.strategy]
        if plan.setup.device == "cpu":
            config += "_cpu"
        changes.append(f"accelerate launch --config_file accelerate_configs/{config}.yaml "
                       f"--num_processes {plan.setup.num_devices}")
    if choice.gradient_checkpointing and not run.gradient_checkpointing:
        changes.append("--gradient_checkpointing true")
    if choice.batch_size != run.batch_size:
        changes.append(f"--per_device_train_batch_size {choice.batch_size} "
                       f"--gradient_accumulation_steps {choice.grad_accum} (the same global batch)")
    from toolkit.plan import GiB

    how = " ".join(changes) or choice.name
    return f"{how}, {choice.total / GiB:.1f} GiB ({choice.name}: `toolkit plan`'s first choice)"


# ------------------------------------------------------------------------------------------------ the recipes


def pretrain(model_args, data_args, training_args) -> None:
    """recipes/pretrain.py: say which tokenizer and why, then check the memory (before any data or model work)."""
    from toolkit.tokenizer import choose_pretrain_tokenizer

    note = choose_pretrain_tokenizer(model_args, data_args)
    if note and training_args.process_index == 0:
        print(note)
    shape = pretrain_shape(model_args, data_args)
    if shape is not None:
        task = "full" if model_args.model_name_or_path else "pretrain"
        check(shape, task, training_args, data_args.block_size, attn=model_args.attn_implementation)


def pretrain_shape(model_args, data_args=None):
    """The shape pretrain.py will build (None when its config cannot be read here: the recipe then says why)."""
    from toolkit.plan import load_shape
    from toolkit.presets import parse_config_overrides

    source = model_args.model_name_or_path or model_args.config_name
    overrides = {k: getattr(model_args, k) for k in ("n_layer", "n_head", "n_embd", "n_positions")}
    try:
        if source:
            return load_shape(source, "full")
        overrides.update({k: v for k, v in parse_config_overrides(model_args.config_overrides).items()
                          if k != "vocab_size"})
        vocab = _tokenizer_size(model_args, data_args) or model_args.vocab_size
        floor = parse_config_overrides(model_args.config_overrides).get("vocab_size")
        vocab = max(vocab, int(floor)) if isinstance(floor, int) else vocab
        return load_shape(model_args.preset, "pretrain", overrides, vocab, model_args.pad_vocab_to_multiple_of)
    except UserError:
        return None


def _tokenizer_size(model_args, data_args=None) -> int | None:
    """The given tokenizer's size (a token store's from its manifest); None when the recipe trains a BPE."""
    store = getattr(data_args, "token_store", None) if not model_args.tokenizer_name else None
    if store:
        import json

        from toolkit.data.store import MANIFEST

        try:
            with open(os.path.join(store, MANIFEST), encoding="utf-8") as f:
                return int(json.load(f)["tokenizer"]["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # the recipe reports a broken store when it opens it
    if not model_args.tokenizer_name:
        return None
    from transformers import AutoTokenizer

    from toolkit.presets import GPT2_VOCAB_SIZE

    try:  # a folder, or the local Hub cache: no request here (the recipe loads it, or says why, next)
        return len(AutoTokenizer.from_pretrained(model_args.tokenizer_name, local_files_only=True,
                                                 trust_remote_code=model_args.trust_remote_code))
    except (OSError, ValueError):
        return GPT2_VOCAB_SIZE  # not here yet: plan for GPT-2's, the usual Hub tokenizer


def finetune(model_args, lora_args, quant_args, training_args, push_to: str | None) -> None:
    """recipes/lora.py and qlora.py: a pushed adapter names a Hub base; then the memory check."""
    from toolkit.model_card import card_base_model

    if push_to and not card_base_model(model_args.model_name_or_path, model_args.base_model_hub_id):
        raise UserError(f"--push_to_hub with the local base '{model_args.model_name_or_path}': pass "
                        "--base_model_hub_id <its Hub repo> (push the base first: toolkit push "
                        f"{model_args.model_name_or_path} you/base) so others can load the adapter")
    from toolkit.plan import load_shape, resolve_lora_targets

    try:
        shape = load_shape(model_args.model_name_or_path, "lora")
    except UserError:
        return  # the base cannot be read here: loading it says why
    try:
        modules = resolve_lora_targets(" ".join(lora_args.lora_target_modules))
    except UserError:
        modules = None  # module names of the user's own: the planner counts all projections
    task = "qlora" if quant_args.load_in_4bit else "lora"
    seq_len = min(training_args.max_length or shape.n_positions, shape.n_positions)  # as finetune.prepare_for_data
    check(shape, task, training_args, seq_len, lora_r=lora_args.lora_r,
          lora_dropout=lora_args.lora_dropout, lora_targets=modules, double_quant=quant_args.use_bnb_nested_quant,
          attn=model_args.attn_implementation or "sdpa")
