"""Training guard: a non-finite loss or gradient never reaches the weights; loss spikes are named and handled.

After the gradients of an optimizer step are reduced (and clipped), `TrainingGuard` looks at that step's loss,
averaged over the ranks, and at the global gradient norm, in one small all-reduce on every rank, so every rank takes
the same decision:

- a non-finite loss or gradient norm: the optimizer step is skipped (the weights and the optimizer state are left as
  they were) and a warning names the step; with `--on_spike rollback` the last checkpoint is also reloaded. After
  `--max_rollbacks` such steps (or rollbacks) in a row the run stops with one line;
- a spike, a loss above `--spike_threshold` times the median of the last SPIKE_WINDOW accepted step losses: a
  warning with the step, the data position (the samples of the run's order, and for pretraining the train blocks
  and their token offsets in the store) and the layers with the largest gradient norms, then per `--on_spike`:
  `warn` applies the update, `skip` skips it, `rollback` reloads the newest checkpoint (weights, optimizer,
  schedule) and goes on with the data after the spike, so the window since that checkpoint is skipped.

The loss of a step is one float read per step; the per-layer norms and the data position are computed only when a
step is reported.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import sys
from collections import deque

import torch

from toolkit.errors import UserError

SPIKE_THRESHOLD = 2.0  # --spike_threshold default
MAX_IN_A_ROW = 3  # --max_rollbacks default
SPIKE_WINDOW = 50  # accepted step losses the running median is taken over
SPIKE_MIN_HISTORY = 10  # no spike is called before this many accepted steps
POSITION_KEY = "data_position"  # index of a train block, added by WithPosition, taken out before the forward
TOP_LAYERS = 3


class WithPosition(torch.utils.data.Dataset):
    """A map-style dataset whose items also carry their index, so a reported step names its blocks."""

    def __init__(self, dataset, block_size: int):
        self.dataset, self.block_size = dataset, block_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], POSITION_KEY: torch.tensor(i)}

    def __getattr__(self, name):  # the wrapped dataset's own attributes (stream, block_size, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def layer_of(name: str) -> str:
    """'base_model.model.transformer.h.3.attn.c_attn.lora_A.default.weight' -> 'transformer.h.3'."""
    parts = name.removeprefix("base_model.model.").split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def layer_grad_norms(model, grad_norm: float, max_grad_norm: float) -> list[tuple[str, float]]:
    """Gradient norm per layer, largest first, as before clipping. Under FSDP2 every rank must call it (the shards
    are gathered)."""
    squares: dict[str, float] = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        if hasattr(grad, "full_tensor"):  # a DTensor shard
            grad = grad.full_tensor()
        squares[layer_of(name)] = squares.get(layer_of(name), 0.0) + grad.detach().float().pow(2).sum().item()
    clipped = max_grad_norm > 0 and math.isfinite(grad_norm) and grad_norm > max_grad_norm
    unclip = grad_norm / max_grad_norm if clipped else 1.0
    norms = [(layer, math.sqrt(sq) * unclip) for layer, sq in squares.items()]
    return sorted(norms, key=lambda item: -item[1] if math.isfinite(item[1]) else -math.inf)


class TrainingGuard:
    """Trainer mixin (PretrainTrainer, the fine-tuning recipes' trainer): reads args.on_spike, args.spike_threshold,
    args.max_rollbacks. Put it before the Trainer class in the bases."""

    def _guard_init(self) -> None:
        self._guard_history: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self._guard_loss = None
        self._guard_positions: list[torch.Tensor] = []
        self._guard_skip = False
        self._guard_in_a_row = 0
        self._guard_rollback_to: str | None = None
        self._guard_rollbacks = 0
        self.guard_events: list[dict] = []  # every reported step, for the run's summary and the tests

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()  # the Trainer drops batch keys the model's forward does not take
        if POSITION_KEY not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, POSITION_KEY]

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not hasattr(self, "_guard_history"):
            self._guard_init()
        if POSITION_KEY in inputs:
            inputs = dict(inputs)
            self._guard_positions.append(inputs.pop(POSITION_KEY))
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._guard_loss = loss.detach() if self._guard_loss is None else self._guard_loss + loss.detach()
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._guard_wrap_optimizer()
        try:
            self._guard_decide(model, grad_norm)
        finally:
            self._guard_loss, self._guard_positions = None, []
        return grad_norm

    def _guard_wrap_optimizer(self) -> None:
        """The Trainer calls optimizer.step() right after the grad norm: let it do nothing for a guarded step."""
        optimizer = self.optimizer
        if getattr(optimizer, "_guarded", False):
            return
        inner = optimizer.step

        @functools.wraps(inner)  # keeps the LR scheduler's mark on step(), or torch warns that it was replaced
        def step(*args, **kwargs):
            if self._guard_skip:
                self._guard_skip = False
                return None
            return inner(*args, **kwargs)

        optimizer.step = step
        optimizer._guarded = True

    def _guard_decide(self, model, grad_norm) -> None:
        args = self.args
        threshold = getattr(args, "spike_threshold", SPIKE_THRESHOLD)
        loss = self._guard_loss if self._guard_loss is not None else torch.tensor(float("nan"))
        norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(float(grad_norm))
        stats = torch.stack([loss.float().reshape(()).to(self.args.device), norm.float().reshape(()).to(args.device)])
        if args.world_size > 1:  # the same figures, so the same decision, on every rank
            stats = self.accelerator.reduce(stats, reduction="mean")
        loss_value, norm_value = stats.tolist()
        step = self.state.global_step + 1  # the step being taken
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and math.isfinite(loss_value) and not math.isfinite(norm_value):
            return  # fp16: inf gradients with a finite loss are the loss scaler's overflows; it skips the step itself
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        median = statistics.median(self._guard_history) if len(self._guard_history) >= SPIKE_MIN_HISTORY else None
        spike = finite and median is not None and median > 0 and loss_value > threshold * median
        if finite and not spike:
            self._guard_history.append(loss_value)
            self._guard_in_a_row = 0
            return
        mode = getattr(args, "on_spike", "warn")
        action = ("rollback" if mode == "rollback" else "skip") if not finite else mode
        event = {"step": step, "loss": loss_value, "grad_norm": norm_value, "median": median,
                 "kind": "spike" if finite else "non-finite", "action": action,
                 "position": self._guard_position(step),
                 "layers": layer_grad_norms(model, norm_value, args.max_grad_norm)[:TOP_LAYERS]}
        if action == "rollback":
            event["checkpoint"] = self._guard_rollback()
            if event["checkpoint"] is None:
                event["action"] = action = "skip"
        self._guard_skip = action in ("skip", "rollback")
        self.guard_events.append(event)
        if self.is_world_process_zero():
            print(f"\n{describe(event, threshold)}", file=sys.stderr, flush=True)  # not on the bar's line
        if action == "warn":
            self._guard_history.append(loss_value)
            return
        if action == "rollback":  # rollbacks to the same checkpoint count, whatever clean steps came between
            same = self._guard_rollback_to == event["checkpoint"]
            self._guard_rollbacks = self._guard_rollbacks + 1 if same else 1
            self._guard_rollback_to = event["checkpoint"]
            in_a_row, what = self._guard_rollbacks, f"rolled back to {os.path.basename(event['checkpoint'])}"
        else:
            self._guard_in_a_row += 1
            in_a_row, what = self._guard_in_a_row, "skipped the update"
        if in_a_row >= getattr(args, "max_rollbacks", MAX_IN_A_ROW):
            raise UserError(
                f"the guard {what} {in_a_row} times in a row (last: step {step}, {describe_loss(event, threshold)}); "
                "stopping: lower --learning_rate (or raise --warmup_steps), check the data at the position logged "
                "above, then resume from a good checkpoint with --resume_from_checkpoint"
            )

    def _guard_position(self, step: int) -> dict:
        """Where the step's data is: samples of the run's order, and the train blocks when the dataset says."""
        args = self.args
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        position = {"samples": (self.state.global_step * per_step, step * per_step - 1)}
        for callback in self.callback_handler.callbacks:  # pretraining records where each step reads
            plan = getattr(getattr(callback, "order", None), "plan", None)  # (toolkit/data/order.py), also
            if plan is not None:  # after a resume with another global batch
                position["samples"] = (plan.position(step - 1).seen, plan.position(step).seen - 1)
        if self._guard_positions:
            local = torch.cat([p.reshape(-1) for p in self._guard_positions]).to(args.device)
            blocks = self.accelerator.gather(local) if args.world_size > 1 else local
            block_size = getattr(self.train_dataset, "block_size", None)
            position["blocks"] = blocks.tolist()
            if block_size:
                position["token_offsets"] = [b * block_size for b in position["blocks"]]
        return position

    def _guard_rollback(self) -> str | None:
        """Reload the newest checkpoint's weights, optimizer and schedule; its path, or None when there is none."""
        from transformers.trainer_utils import get_last_checkpoint

        folder = self.args.output_dir
        checkpoint = get_last_checkpoint(folder) if os.path.isdir(folder) else None
        if checkpoint is None:
            return None
        from transformers.utils import logging

        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # "missing keys: lm_head.weight": tied to the embedding, which is loaded
        try:
            if self.is_fsdp_enabled:
                self._load_from_checkpoint(checkpoint, self.model_wrapped)
            else:
                self._load_from_checkpoint(checkpoint)
            self._load_optimizer_and_scheduler(checkpoint)
        finally:
            logging.set_verbosity(verbosity)
        return checkpoint


def describe_loss(event: dict, threshold: float) -> str:
    if event["kind"] == "non-finite":
        return f"loss {event['loss']:.4g}, gradient norm {event['grad_norm']:.4g}: not finite"
    return (f"loss {event['loss']:.4f} is {event['loss'] / event['median']:.1f}x the running median "
            f"{event['median']:.4f} (threshold {threshold:g}x)")


def describe(event: dict, threshold: float) -> str:
    """The warning line for a reported step."""
    position = event["position"]
    first, last = position["samples"]
    where = f"samples {first}-{last} of the run's order"
    if "blocks" in position:
        shown = position["blocks"][:8]
        more = f" and {len(position['blocks']) - len(shown)} more" if len(position["blocks"]) > len(shown) else ""
        offsets = position.get("token_offsets")
        where += (f"; train blocks {', '.join(map(str, shown))}{more}"
                  + (f" (token offsets {', '.join(map(str, offsets[:len(shown)]))}{more})" if offsets else ""))
    layers = ", ".join(f"{name} {norm:.3g}" for name, norm in event["layers"])
    action = {"warn": "update applied (--on_spike warn)", "skip": "update skipped",
              "rollback": f"update skipped, rolled back to {os.path.basename(str(event.get('checkpoint')))} "
                          "(the data since then is skipped)"}[event["action"]]
    return (f"warning: {event['kind']} loss at step {event['step']}: {describe_loss(event, threshold)}; data: "
            f"{where}; largest gradient norms: {layers or 'none'}; {action}")
