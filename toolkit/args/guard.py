"""The training guard's options (toolkit/guard.py), one definition for pretrain.py and the fine-tuning recipes.

A dataclass field cannot be shared between two classes, so each recipe's arguments call these factories.
"""

from __future__ import annotations

from dataclasses import field

from toolkit.guard import MAX_IN_A_ROW, SPIKE_THRESHOLD


def on_spike():
    return field(
        default="warn",
        metadata={"help": "On a loss spike (above --spike_threshold x the running median): warn (log it, apply the "
                          "update), skip (log it, skip the update) or rollback (reload the last checkpoint and skip "
                          "the data since). A non-finite loss or gradient is never applied (toolkit/guard.py).",
                  "choices": ["warn", "skip", "rollback"]},
    )


def spike_threshold():
    return field(default=SPIKE_THRESHOLD, metadata={"help": "A step loss above this many times the median of the "
                                                            "last 50 step losses is a spike."})


def max_rollbacks():
    return field(default=MAX_IN_A_ROW,
                 metadata={"help": "Stop (one line) after this many skipped or rolled-back steps in a row."})
