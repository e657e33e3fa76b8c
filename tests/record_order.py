"""Run recipes/pretrain.py with the training blocks of every micro-batch recorded, for tests/test_elastic_resume.py:

    python tests/record_order.py OUT recipes/pretrain.py ARGS...   (or as the script of torchrun / accelerate launch)

Each rank appends to OUT.<rank> one JSON line per micro-batch it trains on: {"step": the optimizer step it belongs to,
"blocks": the train block indices} (the guard's data position, toolkit.guard.WithPosition)."""

from __future__ import annotations

import json
import runpy
import sys


def recording(path: str, training_step):
    """PretrainTrainer.training_step, recording each micro-batch's blocks to `path`.<rank> first."""
    from toolkit.guard import POSITION_KEY

    def step(self, model, inputs, *args, **kwargs):
        with open(f"{path}.{self.args.process_index}", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.state.global_step + 1, "blocks": inputs[POSITION_KEY].tolist()}) + "\n")
        return training_step(self, model, inputs, *args, **kwargs)

    return step


def read(path: str, world_size: int) -> dict[int, list[int]]:
    """{step: its blocks in the order of the run's sequence}: micro-batch i of rank r holds the (i * world + r)-th
    per-device batch of the step's slice of the order."""
    per_rank = []
    for rank in range(world_size):
        steps: dict[int, list[list[int]]] = {}
        with open(f"{path}.{rank}", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                steps.setdefault(record["step"], []).append(record["blocks"])
        per_rank.append(steps)
    return {step: [b for i in range(len(micro)) for rank in per_rank for b in rank[step][i]]
            for step, micro in per_rank[0].items()}


if __name__ == "__main__":
    from toolkit.trainer import PretrainTrainer

    out, recipe, *argv = sys.argv[1:]
    PretrainTrainer.training_step = recording(out, PretrainTrainer.training_step)
    sys.argv = [recipe, *argv]
    runpy.run_path(recipe, run_name="__main__")
