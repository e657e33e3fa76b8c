"""The valid range of every numeric option of every recipe and `toolkit` command, and the one check of them.

One table (`RANGES`), so an option that several recipes or commands share is checked the same way in all of them.
Where a command has an option of the same name that means something else, `COMMAND_RANGES` says so. The recipes'
parser (`toolkit.args.parse`) checks every option against it; an argparse command calls

    args = build_parser().parse_args(argv)
    check_ranges(args, command="toolkit eval")

right after parsing, before any work. A value outside its range is one line naming the option, the value, the range
and the fix; None (an option left unset) passes.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from toolkit.errors import UserError


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval for a numeric option, with the unit a user reads in the error."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()  # values allowed outside the interval (e.g. -1 = "not set" for max_steps)
    note: str = ""  # what a value at an edge means, for the error (e.g. "0 = greedy")

    def holds(self, value) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'above' if self.low_open else 'at least'} {self.low:g}"
        else:
            text = f"{'below' if self.high_open else 'at most'} {self.high:g}"
        return text + "".join(f" (or {v})" for v in self.also) + (f" ({self.note})" if self.note else "")


AT_LEAST_1 = Range(1)  # sizes and counts
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # dropout and friends
BETA = Range(0, 1, high_open=True)

# Every numeric option of every recipe and toolkit command, with its valid range.
RANGES: dict[str, Range] = {
    # training loop (transformers.TrainingArguments and our additions)
    "per_device_train_batch_size": AT_LEAST_1, "per_device_eval_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1, "global_batch_size": AT_LEAST_1,
    "max_steps": Range(1, also=(-1,)), "num_train_epochs": POSITIVE,
    "learning_rate": POSITIVE, "muon_learning_rate": POSITIVE, "warmup_steps": AT_LEAST_0, "warmup_ratio": FRACTION,
    "weight_decay": AT_LEAST_0,
    "adam_beta1": BETA, "adam_beta2": BETA, "adam_epsilon": POSITIVE, "max_grad_norm": AT_LEAST_0,
    "logging_steps": POSITIVE, "eval_steps": POSITIVE, "save_steps": POSITIVE, "save_total_limit": AT_LEAST_1,
    "seed": AT_LEAST_0, "ddp_timeout": AT_LEAST_1, "dataloader_num_workers": AT_LEAST_0,
    "eval_accumulation_steps": AT_LEAST_1, "sample_max_new_tokens": AT_LEAST_0,
    # model shape
    "n_layer": AT_LEAST_1, "n_head": AT_LEAST_1, "n_embd": AT_LEAST_1, "n_positions": AT_LEAST_1,
    "dropout": FRACTION, "vocab_size": Range(257), "pad_vocab_to_multiple_of": AT_LEAST_1,
    # data
    "block_size": Range(2), "validation_split_percentage": Range(0, 50, low_open=True),
    "validation_max_tokens": AT_LEAST_1, "streaming_eval_blocks": AT_LEAST_1,
    "preprocessing_num_workers": AT_LEAST_1, "max_length": Range(2), "max_train_samples": AT_LEAST_1,
    "max_eval_samples": AT_LEAST_1,
    # LoRA
    "lora_r": AT_LEAST_1, "lora_alpha": POSITIVE, "lora_dropout": FRACTION,
    # evaluation during training
    "eval_tasks_limit": POSITIVE,
    # training guard (toolkit/guard.py)
    "spike_threshold": Range(1, low_open=True), "max_rollbacks": AT_LEAST_1,
    # toolkit prepare
    "validation_fraction": Range(0, 0.5), "shard_tokens": AT_LEAST_1, "num_proc": AT_LEAST_1,
    "batch_chars": AT_LEAST_1,
    # toolkit plan
    "batch_size": AT_LEAST_1, "seq_len": AT_LEAST_1, "grad_accum": AT_LEAST_1, "num_devices": AT_LEAST_1,
    "bandwidth": POSITIVE,
    # toolkit generate
    "max_new_tokens": AT_LEAST_1, "temperature": Range(0, note="0 = greedy"), "top_k": Range(0, note="0 = no limit"),
    "top_p": Range(0, 1, low_open=True, note="1 = no limit"), "num_samples": AT_LEAST_1,
    # toolkit eval (its batch_size and block_size are the ones above; --stride is also checked against the block)
    "stride": AT_LEAST_1, "max_tokens": Range(2, note="one token is context for the next"),
    "num_fewshot": AT_LEAST_0, "limit": Range(0, low_open=True, note="a count, or a fraction of each task when < 1"),
}

# A command's option that shares a name with a recipe option but not its range: the planner and `toolkit presets`
# count any vocabulary (a recipe's BPE needs the 256 bytes and EOS), and `toolkit prepare` may hold out nothing.
COMMAND_RANGES: dict[str, dict[str, Range]] = {
    "toolkit presets": {"vocab_size": AT_LEAST_1},
    "toolkit plan": {"vocab_size": AT_LEAST_1},
    "toolkit prepare": {"validation_max_tokens": AT_LEAST_0},
}


def check_ranges(values: dict | argparse.Namespace, ranges: dict[str, Range] | None = None,
                 command: str | None = None) -> None:
    """Raise a one-line UserError for the first option outside its range (None means "not set" and passes).

    `values`: the parsed options (a dict, or argparse's Namespace); `ranges`: the table to check against (default
    RANGES, with the `command`'s own entries of COMMAND_RANGES over it)."""
    if isinstance(values, argparse.Namespace):
        values = vars(values)
    table = ranges if ranges is not None else {**RANGES, **COMMAND_RANGES.get(command or "", {})}
    for name, allowed in table.items():
        value = values.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not allowed.holds(value):
            raise UserError(f"--{name} {value:g} is out of range: it must be {allowed.describe()}; "
                            f"pass a value in range (see --help)")
