"""Phase markers for a recipe run, without changing what it does: with this folder first on PYTHONPATH, Python
imports this file at start-up, and each toolkit function listed in PHASES prints `[phase] NAME start|end` to stderr
when it is entered and left (benchmarks/vs_nanogpt.py reads the arrival time of those lines). The functions are
wrapped right after their module is first imported, before the recipe binds them with `from ... import`, so
nothing is imported early and start-up is not slowed (one dictionary lookup per import).

Why hand-written: cProfile would time the same phases but slows a Python-heavy start-up by 20-50%, which is the
very thing measured.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys

# module -> functions ("Class.method" for methods) to mark. A name the module no longer has is skipped.
PHASES = {
    "toolkit.args": ["parse"],
    "toolkit.data.pretrain": ["training_corpus", "cached_store"],
    "toolkit.tokenizer": ["train_bpe_tokenizer", "load_tokenizer"],
    "toolkit.flops": ["peak_flops"],
    "toolkit.lm_metrics": ["eval_bytes_per_token"],
    "toolkit.trainer": [
        "PretrainTrainer.__init__",
        "PretrainTrainer.train",
        "PretrainTrainer.training_step",
        "PretrainTrainer.evaluate",
        "PretrainTrainer._save_checkpoint",
    ],
    "toolkit.run_dir": ["export_full_model"],
    "toolkit.callbacks": ["plot_loss_curve"],
    "toolkit.inference": ["load_for_inference"],
    "toolkit.generate": ["continuation"],
    "toolkit.model_card": ["write_pretrain_card"],
}
ONCE = {"PretrainTrainer.training_step"}  # marked on its first call only (the first training step)


def mark(name: str, what: str) -> None:
    print(f"[phase] {name} {what}", file=sys.stderr, flush=True)


def wrap(fn, name: str):
    calls = [0]

    @functools.wraps(fn)
    def marked(*args, **kwargs):
        calls[0] += 1
        if name in ONCE and calls[0] > 1:
            return fn(*args, **kwargs)
        mark(name, "start")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(name, "end")

    return marked


def patch(module, names: list[str]) -> None:
    for name in names:
        owner, _, attr = name.rpartition(".")
        target = getattr(module, owner, None) if owner else module
        fn = getattr(target, attr, None) if target is not None else None
        if callable(fn):
            setattr(target, attr, wrap(fn, name))


class PhaseFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module in PHASES it asks the other finders and patches the module once loaded."""

    def __init__(self, phases: dict[str, list[str]]):
        self.phases = phases

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.phases:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module
                names = self.phases[fullname]

                def exec_module(module, run=run, names=names):
                    run(module)
                    patch(module, names)

                spec.loader.exec_module = exec_module
                return spec
        return None


def install(phases: dict[str, list[str]] | None = None) -> PhaseFinder:
    finder = PhaseFinder(PHASES if phases is None else phases)
    sys.meta_path.insert(0, finder)
    return finder


if __name__ == "sitecustomize":  # loaded by Python at start-up (not when a test imports this file)
    install()
