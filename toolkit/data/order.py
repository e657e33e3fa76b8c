"""The order pretraining reads its training blocks in, and where a run stands in it: resume by samples seen.

The order: epoch e is a permutation of the N training blocks seeded with seed + e (--data_seed, else --seed), the
one the HF Trainer's seeded sampler draws (accelerate's SeedableRandomSampler). Each rank takes every W-th batch of B
consecutive blocks of it (accelerate's BatchSamplerShard) and an optimizer step takes `accumulation` such batches per
rank, so with global batch G step k of an epoch reads blocks [kG, (k+1)G) of its permutation. An epoch ends where a
round of W batches no longer fits (the rest is not used); its last step may have fewer accumulation steps.

The position: (epoch, offset into its permutation, samples seen since the run began) after the last optimizer step,
recorded in every checkpoint (trainer_state.json, `DataPositionCallback`). A resumed run's sampler starts there,
without reading or counting through the batches before it, on any number of processes:
- where the resumed run's own step count puts it at the same place (the same global batch, split any way, within an
  epoch of the same length), the run goes on exactly as the uninterrupted one would have;
- elsewhere (another global batch, or an epoch of another length): the rest of the epoch in whole steps of the new
  global batch (a remainder shorter than a step is not used), then whole epochs as above. The learning-rate
  schedule goes on by optimizer steps (the scheduler state is restored) and --max_steps stays the run's.
Streaming datasets have no sampler; they resume as the Trainer does it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

RECORD = "DataPositionCallback"  # its entry in a checkpoint's trainer_state.json "stateful_callbacks"


@dataclass(frozen=True)
class Position:
    epoch: int  # which seeded permutation
    offset: int  # blocks of it already used
    seen: int  # blocks used since the run began, over all epochs


@dataclass(frozen=True)
class Plan:
    """Where each optimizer step of this run reads, from `start_step` (0, or the step resumed from) on."""

    start_step: int
    start: Position
    global_batch: int
    steps_per_epoch: int  # optimizer steps of a whole epoch
    epoch_samples: int  # blocks a whole epoch uses
    first_steps: int  # steps left in the start epoch
    first_samples: int  # blocks they use
    trainer_epoch: int  # the Trainer's number for the start epoch; its later epochs follow the data's one to one
    elastic: bool  # the start epoch is finished in whole steps (the Trainer counts its steps from the start)

    def position(self, step: int) -> Position:
        j, start, g = step - self.start_step, self.start, self.global_batch
        if j < self.first_steps:
            return Position(start.epoch, start.offset + j * g, start.seen + j * g)
        epochs, k = divmod(j - self.first_steps, self.steps_per_epoch)
        return Position(start.epoch + 1 + epochs, k * g,
                        start.seen + self.first_samples + epochs * self.epoch_samples + k * g)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The block order of one epoch, as the Trainer's seeded sampler draws it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def batches_per_rank(n: int, batch: int, world: int, drop_last: bool) -> int:
    """Micro-batches each rank gets from an epoch of n blocks, as accelerate deals them (the loader's length)."""
    batches = n // batch if drop_last else math.ceil(n / batch)
    if world == 1 or batches % world == 0:
        return batches // world
    return batches // world + (0 if drop_last else 1)  # without drop_last, accelerate pads the last round


def whole_run_plan(n: int, batch: int, world: int, accumulation: int, drop_last: bool) -> Plan:
    """The plan of a run from its first step with this batch split."""
    per_rank = batches_per_rank(n, batch, world, drop_last)
    steps = max(math.ceil(per_rank / accumulation), 1)  # as the Trainer counts them
    samples = per_rank * batch * world
    return Plan(0, Position(0, 0, 0), batch * world * accumulation, steps, samples, steps, samples, 0, False)


class SampleOrder(torch.utils.data.Sampler):
    """The training sampler: epoch permutations, starting at the plan's position (set by `ResumeBySamples`)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.plan: Plan | None = None
        self.epoch = 0  # the Trainer's epoch, set before each pass
        self.trainer_skips = False  # a Trainer without get_resumed_dataloader skips to the position itself

    def __len__(self) -> int:
        return self.n  # a whole epoch, so the Trainer counts whole epochs as without a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        plan = self.plan
        first = plan.trainer_epoch if plan else 0
        order = epoch_permutation(self.n, self.seed, (plan.start.epoch if plan else 0) + self.epoch - first)
        if plan is not None and self.epoch == first and plan.start.offset and (plan.elastic or not self.trainer_skips):
            stop = plan.start.offset + plan.first_samples if plan.elastic else self.n
            order = order[plan.start.offset:stop]
        yield from order.tolist()


def find_order(dataloader) -> SampleOrder | None:
    """The SampleOrder inside a (prepared) train dataloader: batch_sampler.sampler on 1 process, one level deeper
    under accelerate's BatchSamplerShard."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    for sampler in (getattr(batch_sampler, "sampler", None),
                    getattr(getattr(batch_sampler, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, SampleOrder):
            return sampler
    return None


def read_checkpoint_records(checkpoint: str) -> tuple[int, dict, dict]:
    """(global_step, data position record, batch record) of a checkpoint's trainer_state.json ({} when absent)."""
    from toolkit.distributed_report import BATCH_RECORD

    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return 0, {}, {}
    records = state.get("stateful_callbacks") or {}

    def attributes(name: str) -> dict:
        record = records.get(name)
        return (record.get("attributes") or {}) if isinstance(record, dict) else {}

    return int(state.get("global_step") or 0), attributes(RECORD), attributes(BATCH_RECORD).get("batch") or {}


def _split(g: dict) -> str:
    return (f"{g['per_device_train_batch_size']} per device x {g['world_size']} process(es) x "
            f"{g['gradient_accumulation_steps']} accumulation step(s)")


def resume_plan(order: SampleOrder, args, steps_in_epoch: int, max_steps: int,
                checkpoint: str | None) -> tuple[Plan, str | None]:
    """The plan of this run, and the note to print (or None): from the start, or from a checkpoint's position."""
    from toolkit.distributed_report import batch_geometry

    now = batch_geometry(args)
    g, n = now["global_batch_size"], order.n
    steps = max(math.ceil(steps_in_epoch / args.gradient_accumulation_steps), 1)  # as the Trainer counts them
    samples = steps_in_epoch * now["per_device_train_batch_size"] * now["world_size"]
    if checkpoint is None:
        return Plan(0, Position(0, 0, 0), g, steps, samples, steps, samples, 0, False), None
    step, record, saved = read_checkpoint_records(checkpoint)
    trainer_epoch, done = divmod(step, steps)  # where the Trainer's own count puts this run
    note = None
    try:
        position = Position(**record["position"]) if record.get("position") else None
    except TypeError:
        position = None
    if position is not None and record.get("samples") not in (None, n):
        note = (f"warning: the training data has {n:,} blocks but the checkpoint's run had {record['samples']:,}: "
                "a different order, so the data position cannot be kept; resuming by step count")
        position = None
    if position is None:  # no record: where the checkpoint's batch split reached, else the Trainer's own count
        split = saved or now
        position = whole_run_plan(n, split["per_device_train_batch_size"], split["world_size"],
                                  split["gradient_accumulation_steps"], args.dataloader_drop_last).position(step)
    if (position.epoch, position.offset) == (trainer_epoch, done * g):
        plan = Plan(step, position, g, steps, samples, steps - done, samples - done * g, trainer_epoch, False)
    else:
        if position.offset and (n - position.offset) // g == 0:  # not a step left in this epoch: the next one
            position = Position(position.epoch + 1, 0, position.seen)
        first = (n - position.offset) // g if position.offset else steps
        plan = Plan(step, position, g, steps, samples, first, first * g if position.offset else samples,
                    trainer_epoch, True)
    if saved and saved.get("global_batch_size") != g and note is None:
        note = (f"note: resuming at {position.seen:,} samples seen (epoch {position.epoch}, block {position.offset:,} "
                f"of its order) with a global batch of {g} sequences ({_split(now)}) instead of the checkpoint's "
                f"{saved['global_batch_size']} ({_split(saved)}): the data order goes on from there and the "
                f"learning-rate schedule continues by optimizer steps (from step {step} of {max_steps})")
    return plan, note


class DataPositionCallback(TrainerCallback, ExportableState):
    """Records the data position after the last optimizer step in every checkpoint (trainer_state.json), and the
    number of blocks of the order."""

    def __init__(self, **_restored):
        self.order: SampleOrder | None = None
        self.step = 0

    def state(self) -> dict:
        plan = self.order.plan if self.order is not None else None
        return {"args": {}, "attributes": {"position": asdict(plan.position(self.step)) if plan else None,
                                           "samples": self.order.n if plan else None}}

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.order, self.step = find_order(train_dataloader), state.global_step
        state.stateful_callbacks.setdefault(RECORD, {})  # a checkpoint from before this record lacks the entry

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step


class ResumeBySamples:
    """Trainer mixin (PretrainTrainer): a map-style training set is read in `SampleOrder`, and a resumed run starts it
    at the checkpoint's data position instead of skipping batches. Put it before the Trainer class in the bases."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(DataPositionCallback())

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._order_checkpoint = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if (self.args.train_sampling_strategy == "random" and not isinstance(dataset, torch.utils.data.IterableDataset)
                and hasattr(dataset, "__len__")):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return SampleOrder(len(dataset), seed)
        return super()._get_train_sampler(train_dataset)

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        order = find_order(dataloader)
        if order is None:
            return values
        order.plan, note = resume_plan(order, args, values[5], values[6], getattr(self, "_order_checkpoint", None))
        if note and args.process_index == 0:
            print(note, file=sys.stderr if note.startswith("warning") else sys.stdout, flush=True)
        # Where the plan agrees with the Trainer's own count, the Trainer keeps its resume bookkeeping (which gives an
        # epoch's last, shorter step its update) and asks get_resumed_dataloader (below) for the loader; elsewhere it
        # must count the steps from the start of the loader. Trainers before get_resumed_dataloader skip by themselves.
        args.ignore_data_skip = order.plan.elastic
        order.trainer_skips = not hasattr(Trainer, "get_resumed_dataloader")
        if order.plan.elastic:  # its first epoch is partial, so one more Trainer epoch may be needed for max_steps
            values = (values[0] + 1, *values[1:])
        return values

    def get_resumed_dataloader(self, dataloader, num_batches):
        if find_order(dataloader) is not None:
            return dataloader  # the sampler already starts at the checkpoint's position
        return super().get_resumed_dataloader(dataloader, num_batches)
