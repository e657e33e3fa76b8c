"""Benchmarks through EleutherAI's lm-evaluation-harness (`lm-eval`, the optional `[eval]` extra).

`toolkit eval MODEL --tasks hellaswag` and pretrain.py's `--eval_tasks` call its Python API
(`lm_eval.simple_evaluate`) on the model already in memory, wrapped in its `HFLM` class, so the scores are
the harness's own (same prompts, same length-normalised accuracy `acc_norm`) and comparable with published
ones. Task names are checked before any model is loaded. Indexing the harness's thousands of built-in task
files takes seconds, so tasks found in an --include_path folder are loaded from it alone.
"""

from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager

from toolkit.errors import UserError

INSTALL_FIX = 'pip install -e ".[eval]" (or pip install lm-eval)'


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"lm-evaluation-harness is not installed; install it with {INSTALL_FIX}") from None
    return lm_eval


def parse_tasks(value) -> list[str]:
    """'hellaswag,lambada_openai' or ['hellaswag', 'arc_easy,arc_challenge'] -> a list of names."""
    items = [value] if isinstance(value, str) else list(value or [])
    return [t.strip() for item in items for t in str(item).split(",") if t.strip()]


def _known(manager, task: str) -> bool:
    return task in manager.all_tasks or os.path.isfile(task) or bool(manager.match_tasks([task]))


@contextmanager
def _quiet_harness():
    """The harness warns on every call that a model object (not a name) was passed; that is what we mean."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def task_manager(tasks: list[str], include_path: str | None = None):
    """An lm-eval TaskManager that knows every task in `tasks`; an unknown name is a one-line error."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise UserError("--tasks is empty; name lm-eval tasks, e.g. --tasks hellaswag,lambada_openai")
    if include_path and not os.path.isdir(include_path):
        raise UserError(f"--include_path '{include_path}' is not a folder; "
                        "pass the folder that holds your task YAML files")
    with _quiet_harness():
        if include_path:
            manager = TaskManager(include_path=include_path, include_defaults=False)
            if all(_known(manager, t) for t in tasks):
                return manager
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not _known(manager, t)]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)}; list the names with `lm-eval ls tasks`, "
                        "or pass --include_path DIR with your own task YAML")
    return manager


def run_tasks(model, tokenizer, tasks: list[str], manager, *, limit: float | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, mixed_precision_dtype=None,
              bootstrap_iters: int = 100000, seeds: bool = True) -> dict:
    """lm_eval.simple_evaluate on the loaded model; returns the harness's result dict (its 'results', 'versions', ...).

    `seeds=False` leaves Python's, NumPy's and torch's global random state untouched (for use inside training).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _quiet_harness():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  mixed_precision_dtype=mixed_precision_dtype)
        seed_kwargs = {} if seeds else {"random_seed": None, "numpy_random_seed": None, "torch_random_seed": None}
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                              num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                              log_samples=False, **seed_kwargs)
        except (ConnectionError, OSError) as err:  # the task's data is fetched from the Hub on first use
            raise UserError(f"could not load the data of task(s) {', '.join(tasks)} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:160] if str(err) else ''}); lm-eval downloads it from the "
                            "Hub on first use: check the connection "
                            "(or unset HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)") from None
    return results


def scores(results: dict) -> dict[str, dict[str, float]]:
    """{'hellaswag': {'acc': 0.289, 'acc_stderr': 0.0045, 'acc_norm': 0.311, ...}}: numeric metrics per task and group.
    A metric computed under a filter other than 'none' keeps it in its name ('exact_match_strict-match')."""
    out: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            row = out.setdefault(task, {})
            for key, value in metrics.items():
                if (not isinstance(value, (int, float)) or isinstance(value, bool)
                        or key in ("sample_len", "sample_count")):
                    continue
                metric, _, filt = key.partition(",")
                row[metric if filt in ("", "none") else f"{metric}_{filt}"] = float(value)
    return out


def flat_scores(results: dict, prefix: str = "") -> dict[str, float]:
    """{'hellaswag_acc_norm': 0.311, ...} without standard errors: for training logs and model cards."""
    return {f"{prefix}{task}_{metric}": value for task, row in scores(results).items()
            for metric, value in row.items() if not metric.endswith("_stderr") and "_stderr_" not in metric}


def table(results: dict) -> str:
    """The harness's own results table (markdown)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


class BenchmarkDuringTraining:
    """pretrain.py's --eval_tasks: lm-eval tasks on the model being trained, at every evaluation, on rank 0.

    Created before training (so a bad task name fails at once). PretrainTrainer calls it inside its evaluation,
    so the scores are logged with eval_loss (console, tensorboard, trainer_state.json). The global random state
    is saved and restored around it, so training continues exactly as it would have without it.
    """

    def __init__(self, tasks, limit: float | None = None, include_path: str | None = None, batch_size: int = 8,
                 bf16: bool = False):
        if limit is not None and limit <= 0:
            raise UserError(f"--eval_tasks_limit {limit} must be > 0 (a count, or a fraction of each task when < 1)")
        self.tasks = parse_tasks(tasks)
        self.manager = task_manager(self.tasks, include_path)
        self.limit, self.batch_size, self.bf16 = limit, batch_size, bf16
        self.last: dict[str, dict[str, float]] = {}  # the latest scores, {task: {metric: value}}, for the model card

    def __call__(self, model, tokenizer) -> dict[str, float]:
        import numpy as np
        import torch

        state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
                 torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        was_training = model.training
        try:
            results = run_tasks(model, tokenizer, self.tasks, self.manager, limit=self.limit,
                                batch_size=self.batch_size,
                                mixed_precision_dtype=torch.bfloat16 if self.bf16 else None,
                                bootstrap_iters=0, seeds=False)
        finally:
            model.train(was_training)
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.random.set_rng_state(state[2])
            if state[3] is not None:
                torch.cuda.set_rng_state_all(state[3])
        self.last = {task: {m: v for m, v in row.items() if not m.endswith("_stderr")}
                     for task, row in scores(results).items()}
        return flat_scores(results)


def benchmark_during_training(training_args, fsdp: bool) -> BenchmarkDuringTraining | None:
    """pretrain.py's --eval_tasks, checked now (task names, FSDP), not hours later; None without --eval_tasks."""
    if not training_args.eval_tasks:
        return None
    if fsdp:
        raise UserError("--eval_tasks runs lm-eval on the main process alone, which an FSDP-sharded model cannot "
                        "do; drop --eval_tasks and run `toolkit eval OUTPUT_DIR --tasks ...` on the saved model")
    return BenchmarkDuringTraining(training_args.eval_tasks, training_args.eval_tasks_limit,
                                   training_args.eval_tasks_include_path, training_args.per_device_eval_batch_size,
                                   bool(training_args.bf16))
