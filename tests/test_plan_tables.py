"""The planner's tables and scenario verdicts in docs/ are written by benchmarks/plan_tables.py: the committed text
must be what the planner gives now, and a change of one planner constant must show up as a difference."""

from __future__ import annotations

import importlib.util

from conftest import REPO


def plan_tables():
    spec = importlib.util.spec_from_file_location("plan_tables", REPO / "benchmarks" / "plan_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_planner_table_in_the_docs_is_what_the_planner_gives_now(capsys):
    tables = plan_tables()
    stale = {path: changed for path, (_, changed) in tables.regenerate().items() if changed}
    assert not stale, f"run `python benchmarks/plan_tables.py`: stale {stale}"
    assert tables.main(["--check"]) == 0 and "is current" in capsys.readouterr().out
    strategies = (REPO / "docs" / "training_strategies.md").read_text()
    for name in ("pretrain", "finetune", "speed", "scenarios", "preflight"):
        assert f"<!-- plan_tables: {name} -->" in strategies


def test_one_changed_planner_constant_makes_the_check_fail(monkeypatch, capsys):
    from toolkit.plan import memory

    tables = plan_tables()
    monkeypatch.setattr(memory, "GPU_CONTEXT", memory.GPU_CONTEXT + 64 * 2**20)  # the CUDA context, 64 MiB more
    changed = tables.regenerate()[("docs/training_strategies.md")][1]
    assert {"pretrain", "finetune", "scenarios"} <= set(changed)
    assert tables.main(["--check"]) == 1 and "stale planner tables" in capsys.readouterr().out
    monkeypatch.setitem(memory.CPU_OVERHEAD, "qlora", memory.CPU_OVERHEAD["qlora"] + 64 * 2**20)
    assert tables.regenerate()["docs/benchmarks.md"][1] == ["qlora-vs-lora-cpu"]
