"""The steps of recipes/lora.py (and so of recipes/qlora.py, which is lora.py with a 4-bit base): checks before any
work, the trainer, eval, sample, save, push.

Where the defaults differ from trl's SFTConfig (toolkit/args/finetune.py, toolkit/args/defaults.py): bf16 only with
a GPU that has it, activation checkpointing only with CUDA or a quantized base, plain text packed into max_length
blocks ("wrapped": concatenate, cut; GPT-2 has no padding-free attention path for trl's "bfd"), max_length capped
at the model's n_positions here, and LoRA's usual learning rate 2e-4.
"""

from __future__ import annotations

import json
import os
import sys

from toolkit.errors import UserError
from toolkit.hub import take_push_to_hub


def check_args(model_args, args) -> str | None:
    """Fail before any work: no/missing base, finished output_dir, bad push target. Returns the repo to push to.
    With no --model_name_or_path, picks the default base (toolkit.lora.default_base_model) and says which."""
    from toolkit.lora import default_base_model
    from toolkit.model_loading import check_model_source

    if not model_args.model_name_or_path:
        model_args.model_name_or_path = default_base_model()
    check_model_source(model_args.model_name_or_path)
    check_output_dir(args)
    return args.hub_model_id if take_push_to_hub(args) else None


def check_output_dir(args) -> None:
    """Refuse to overwrite a finished run (its adapter) unless --overwrite_output_dir; resolve
    `--resume_from_checkpoint auto` to the newest complete checkpoint (or a fresh start)."""

    if os.path.isfile(os.path.join(args.output_dir, "adapter_config.json")) and not args.overwrite_output_dir:
        raise UserError(
            f"output_dir '{args.output_dir}' already holds a finished adapter; pass --overwrite_output_dir to "
            f"replace it or choose another --output_dir"
        )
    from toolkit.run_dir import check_resume_batch, prepare_output_dir

    args.resume_from_checkpoint = prepare_output_dir(args.output_dir, args.overwrite_output_dir,
                                                     args.resume_from_checkpoint, args.process_index == 0)
    if args.resume_from_checkpoint:
        check_resume_batch(args.resume_from_checkpoint, args)  # another number of processes: same global batch only


def make_trainer(**kwargs):
    """trl's SFTTrainer with crash-safe checkpoints and save-and-stop on SIGINT/SIGTERM (as in pretrain.py)."""
    from transformers import Trainer
    from trl import SFTTrainer

    from toolkit.callbacks import GracefulStopCallback
    from toolkit.distributed_report import DistributedSetupCallback
    from toolkit.guard import TrainingGuard
    from toolkit.trainer import CausalLMLoss, CrashSafeCheckpoints, mark_causal_lm_loss

    class FinetuneTrainer(TrainingGuard, CausalLMLoss, CrashSafeCheckpoints, SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.args.token_metrics:  # trl's fused head: entropy and top-1 accuracy in the logs, at a cost
                return SFTTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            if self.args.token_metrics:
                return SFTTrainer.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys)
            return Trainer.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys)

    # The same label count fix as pretraining: without it the Trainer divides the summed token losses by
    # every label, position 0 of each row included, and the training loss comes out (T-1)/T too low.
    mark_causal_lm_loss(kwargs["model"])
    # the distributed setup report, and the batch split recorded in every checkpoint (checked on resume)
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), DistributedSetupCallback()]
    trainer = FinetuneTrainer(**kwargs)
    trainer.graceful_stop = GracefulStopCallback(trainer.accelerator)
    trainer.add_callback(trainer.graceful_stop)
    return trainer


def prepare_for_data(args, fmt: str, tokenizer, model_config) -> None:
    """Packing by format, max_length within the model's context, a chat template for chat data."""
    from toolkit.data.sft import ensure_chat_template

    if args.packing is None:
        args.packing = fmt == "text"
    if args.packing and fmt != "text" and args.packing_strategy == "wrapped":
        print("note: packing chat / prompt-completion examples with 'wrapped' lets examples attend to each other")
    n_positions = getattr(model_config, "n_positions", None) or getattr(model_config, "max_position_embeddings", None)
    if n_positions and (args.max_length is None or args.max_length > n_positions):
        args.max_length = n_positions
    if fmt != "text" and ensure_chat_template(tokenizer):
        print("tokenizer has no chat template: using toolkit.data.sft.DEFAULT_CHAT_TEMPLATE "
              "(EOS ends each assistant turn)")


def match_adapter_dtype(model, dtype) -> None:
    """trl stores QLoRA adapter weights in bf16 (the paper's choice on GPUs); with fp32 compute (CPU)
    keep them fp32, else every LoRA matmul runs in slow CPU bf16."""
    import torch

    if dtype == torch.float32:
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()


def evaluate(trainer, label: str) -> dict:
    """Held-out loss and perplexity."""
    from toolkit.lm_metrics import perplexity

    metrics = trainer.evaluate()
    keep_ddp_for_training(trainer)
    loss = float(metrics["eval_loss"])
    out = {f"eval_loss_{label}": loss, f"eval_perplexity_{label}": perplexity(loss)}
    print(f"eval {label}: loss {loss:.4f}  perplexity {perplexity(loss):.2f}")
    return out


def keep_ddp_for_training(trainer) -> None:
    """After an evaluation before `train()`, let `train()` wrap the model in DDP again.

    `Trainer.evaluate()` outside training runs accelerate's `prepare_model(model, evaluation_mode=True)`, which
    marks the model `_is_accelerate_prepared`; `train()` then takes the model as prepared and never wraps it in
    DistributedDataParallel, so under several processes every rank would train its own adapter on its own shard,
    gradients never averaged, and only rank 0's adapter would be saved. Forgetting the mark restores the normal DDP
    training; FSDP and DeepSpeed prepare fully in evaluate() and are left alone.
    """
    model = trainer.model
    if (trainer.args.world_size == 1 or trainer.is_in_train or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
            or not getattr(model, "_is_accelerate_prepared", False)):
        return
    model._is_accelerate_prepared = False
    trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not model]


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int) -> dict:
    """Greedy continuation; stops at EOS (generation_config.eos_token_id)."""
    from toolkit.generate import continuation

    completion = continuation(model, tokenizer, prompt, max_new_tokens, skip_special_tokens=False)
    print(f"sample: {prompt!r} -> {completion!r}")
    return {"prompt": prompt, "completion": completion}


def peak_memory() -> dict:
    """Peak resident memory of this process (ru_maxrss, KB on Linux), and of the GPU when there is one."""
    import resource

    import torch

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def save_run(trainer, *, script: str, argv: list[str] | None, method: str, model_args,
             lora_args, data_args, data_format: str, metrics: dict, sample: dict | None,
             extra_hparams: dict | None = None) -> None:
    """Adapter + tokenizer (trainer.save_model), metrics JSON, model card."""
    from toolkit.data.sft import data_source
    from toolkit.model_card import reproduce_command, write_model_card

    args = trainer.args
    trainer.save_model(args.output_dir)
    if not trainer.is_world_process_zero():
        return
    with open(os.path.join(args.output_dir, "all_results.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    hparams = {
        "lora_r": lora_args.lora_r, "lora_alpha": lora_args.lora_alpha, "lora_dropout": lora_args.lora_dropout,
        "lora_target_modules": lora_args.lora_target_modules, "lora_train_embeddings": lora_args.lora_train_embeddings,
        **(extra_hparams or {}),
        "learning_rate": args.learning_rate, "max_steps": args.max_steps, "num_train_epochs": args.num_train_epochs,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "max_length": args.max_length,
        "packing": args.packing, "optim": str(getattr(args.optim, "value", args.optim)), "bf16": args.bf16,
        "gradient_checkpointing": bool(args.activation_checkpointing), "seed": args.seed,
    }
    write_model_card(
        args.output_dir, title=os.path.basename(os.path.abspath(args.output_dir)),
        base_model=model_args.model_name_or_path,
        base_model_hub_id=model_args.base_model_hub_id, method=method, data_source=data_source(data_args),
        data_format=data_format,
        dataset_hub_id=(data_args.dataset_name
                        if data_args.dataset_name and not os.path.exists(data_args.dataset_name) else None),
        hyperparameters=hparams, metrics=metrics, sample=sample,
        command=reproduce_command(script, sys.argv[1:] if argv is None else argv),
        adapter_hub_id=args.hub_model_id,
    )
    print(f"saved adapter, tokenizer, README.md and all_results.json to {args.output_dir}")


def push(trainer, repo_id: str) -> str | None:
    from toolkit.hub import push_folder

    if not trainer.is_world_process_zero():
        return None
    args = trainer.args
    return push_folder(args.output_dir, repo_id, private=bool(args.hub_private_repo), token=args.hub_token,
                       trained_model=trainer.model,
                       commit_message=f"Upload adapter from {os.path.basename(os.path.abspath(args.output_dir))}")
