"""PretrainTrainer: the HF Trainer plus throughput logging and crash-safe checkpoints.

- The Trainer reports samples/s for the whole run only; people training LMs compare tokens/s and MFU
  (model FLOPs utilisation) per logging window, so `log` adds both. Time spent in evaluation is
  excluded, so the figure is training throughput.
- The Trainer writes checkpoint-N in place, so a `kill -9` during a save leaves a half-written
  folder that `get_last_checkpoint` (and so `--resume_from_checkpoint auto`) would pick. We write it
  under `output_dir/.incomplete/` and rename it into place only when every rank has finished.
- A full disk while saving becomes a one-line error that says the previous checkpoints are intact.
- Evaluation reports perplexity and bits per byte next to eval_loss (nats per token depend on the tokenizer;
  bits per byte do not: toolkit/lm_metrics.py), and optionally lm-eval benchmark scores, in the same log
  record, so they reach the console, tensorboard and trainer_state.json. (A TrainerCallback's on_evaluate runs
  after that record is logged, so the additions are made here.)
- A non-finite loss or gradient never reaches the weights, and loss spikes are reported and handled per --on_spike
  (toolkit/guard.py).
- The training blocks are read in one seeded order whose position is saved in every checkpoint, and a resumed run
  starts there, on any number of processes and with any global batch (toolkit/data/order.py); a checkpoint
  written without FSDP also resumes under FSDP2 (toolkit/fsdp_resume.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import time

import torch
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from toolkit.data.order import ResumeBySamples
from toolkit.errors import UserError
from toolkit.fsdp_resume import PlainCheckpointIntoFSDP
from toolkit.guard import TrainingGuard
from toolkit.lm_metrics import bits_per_byte_from_mean, perplexity

STAGING_DIR = ".incomplete"


def mark_causal_lm_loss(model) -> None:
    """Tell the Trainer that GPT-2's loss shifts labels.

    transformers infers `loss_type` from the class name; "GPT2LMHeadModel" matches no entry, so
    loss_type stays None. The loss itself still defaults to ForCausalLMLoss (mean over B*(T-1)
    shifted targets), but Trainer._get_num_items_in_batch then counts B*T labels, so every logged and
    optimized loss is scaled by (T-1)/T (1.6% low at T=64). Naming the loss type fixes the count.
    """
    if model is not None and getattr(model, "loss_type", "unset") is None:
        model.loss_type = "ForCausalLM"


class CrashSafeCheckpoints:
    """Trainer mixin: checkpoint-N appears only when complete; a full disk is a one-line error.

    Used by PretrainTrainer and by the fine-tuning recipes' SFTTrainer (toolkit.finetune.FinetuneTrainer).
    """

    def _save_checkpoint(self, model, trial) -> None:
        final_root = self._get_output_dir(trial=trial)
        staging_root = os.path.join(final_root, STAGING_DIR)
        name = f"checkpoint-{self.state.global_step}"
        # Trainer._save_checkpoint builds its target from _get_output_dir(); point it at the staging area.
        self._get_output_dir = lambda trial=None: staging_root
        try:
            super()._save_checkpoint(model, trial)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
                raise UserError(f"disk full while saving {name} to {final_root}; earlier checkpoints are intact: free "
                                "space (or lower --save_total_limit) and rerun with "
                                "--resume_from_checkpoint auto") from None
            raise
        finally:
            del self._get_output_dir  # back to the class method
        self.accelerator.wait_for_everyone()  # every rank has written its part (FSDP shards, RNG state)
        if self.args.should_save:
            target = os.path.join(final_root, name)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging_root, name), target)  # atomic on one filesystem
            rotate_checkpoints(output_dir=final_root, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()


class CausalLMLoss:
    """Trainer mixin: the model's own causal-LM loss, with the LM head run on the first T-1 positions only.

    The last position of a block has no next token, so its logits are never used: project only the first T-1
    positions onto the vocabulary and give the loss the already-shifted targets (transformers' own `logits_to_keep`
    and `shift_labels`). Saves 1/T of the LM head and of the loss, and keeps the default pretraining shape's logits
    below 32 MiB, where glibc stops reusing freed memory and maps and faults in fresh pages on every step
    (docs/benchmarks.md section 1b). Same loss: the mean over the targets that are not -100.

    Used by PretrainTrainer and by the fine-tuning recipes' trainer, where it replaces trl's fused LM head unless
    --token_metrics asks for that head's entropy and top-1 accuracy (docs/benchmarks.md, fine-tuning step cost).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is not None and labels.dim() == 2 and "shift_labels" not in inputs:
            inputs = {**inputs, "shift_labels": labels[:, 1:].contiguous(),
                      "logits_to_keep": torch.arange(labels.shape[1] - 1, device=labels.device)}
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class PretrainTrainer(TrainingGuard, ResumeBySamples, PlainCheckpointIntoFSDP, CausalLMLoss, CrashSafeCheckpoints,
                      Trainer):
    """`eval_bytes_per_token`: UTF-8 bytes per scored validation token (lm_metrics.eval_bytes_per_token), to
    report eval_bits_per_byte; `benchmark`: a callable (model, tokenizer) -> {name: score} run on the main process at
    every evaluation (lm_eval_tasks.BenchmarkDuringTraining), its scores logged as eval_<name>."""

    def __init__(self, *args, flops_per_token: float, peak_flops: float | None, tokens_per_step: int,
                 eval_bytes_per_token: float | None = None, benchmark=None, **kwargs):
        model = kwargs.get("model") if "model" in kwargs else (args[0] if args else None)
        mark_causal_lm_loss(model)
        super().__init__(*args, **kwargs)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # for all devices of the run together
        self.tokens_per_step = tokens_per_step  # global: micro-batch x accumulation x world x block
        self.eval_bytes_per_token = eval_bytes_per_token
        self.benchmark = benchmark
        self._window_start = None
        self._window_step = 0
        self._eval_seconds = 0.0

    def create_optimizer(self, model=None):
        """--optim muon: Muon for the hidden matrices, AdamW (with the usual weight-decay groups) for the rest."""
        if not getattr(self.args, "muon", False) or self.optimizer is not None:
            return super().create_optimizer(model)
        from toolkit.muon import MuonWithAdamW, hidden_matrices

        model = self.model if model is None else model
        hidden, decay = set(hidden_matrices(model)), set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = MuonWithAdamW(
            [p for n, p in named if n in hidden],
            [{"params": [p for n, p in named if n not in hidden and n in decay],
              "weight_decay": self.args.weight_decay},
             {"params": [p for n, p in named if n not in hidden and n not in decay], "weight_decay": 0.0}],
            lr=self.args.learning_rate, muon_lr=self.args.muon_learning_rate, weight_decay=self.args.weight_decay,
            eps=self.args.adam_epsilon, betas=(self.args.adam_beta1, self.args.adam_beta2),
            fused=self.args.device.type in ("cuda", "cpu"), fan_out_dim=1)  # GPT-2's Conv1D stores (in, out)
        return self.optimizer

    def _start_window(self) -> None:
        self._window_start, self._window_step, self._eval_seconds = time.perf_counter(), self.state.global_step, 0.0

    def get_eval_dataloader(self, eval_dataset=None):
        # dataloader_drop_last keeps training batches a fixed shape; evaluation must still see every validation
        # block, the last partial batch too (a rank whose share is smaller than a batch would otherwise score none).
        drop_last, self.args.dataloader_drop_last = self.args.dataloader_drop_last, False
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.args.dataloader_drop_last = drop_last

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        loss = output.metrics.get(f"{prefix}_loss")
        if loss is not None:
            output.metrics[f"{prefix}_perplexity"] = perplexity(loss)
            if self.eval_bytes_per_token:
                output.metrics[f"{prefix}_bits_per_byte"] = bits_per_byte_from_mean(loss, self.eval_bytes_per_token)
        if self.benchmark is not None and self.is_world_process_zero():
            scores = self.benchmark(self.accelerator.unwrap_model(self.model), self.processing_class)
            output.metrics.update({f"{prefix}_{name}": value for name, value in scores.items()})
        return output

    def evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._eval_seconds += time.perf_counter() - start

    def training_step(self, *args, **kwargs):
        if self._window_start is None:
            self._start_window()
        return super().training_step(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window_start is not None:
            steps = self.state.global_step - self._window_step
            seconds = time.perf_counter() - self._window_start - self._eval_seconds
            if steps > 0 and seconds > 0:
                tokens_per_s = steps * self.tokens_per_step / seconds
                logs["tokens_per_s"] = round(tokens_per_s, 1)
                if self.peak_flops:
                    logs["mfu"] = round(tokens_per_s * self.flops_per_token / self.peak_flops, 4)
            self._start_window()
        super().log(logs, start_time)
