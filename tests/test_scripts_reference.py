"""docs/scripts_reference.md names, for every flag it documents for a recipe or a `toolkit` command, the test that
runs it ("Which test runs each flag"), and for every accelerate config the tests that use it: a flag documented
without a test, or a named test that does not exist or does not pass that flag, fails here. Static (no imports of
the code under test): it reads the page and the test files."""

from __future__ import annotations

import ast
import re
from functools import cache

from conftest import REPO

DOC = REPO / "docs" / "scripts_reference.md"
TABLE = "Which test runs each flag"
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*(?:-[a-z0-9_]+)*)")
TEST = re.compile(r"`(test_\w+\.py)::(test_\w+)`")
# the launchers' own options, shown in the launch lines (accelerate's and torchrun's documentation covers them)
LAUNCHER_FLAGS = {"config_file", "num_processes", "nproc_per_node", "multi_gpu"}
# sections of flags a user runs: the recipes, the `toolkit` commands and the other guides' forms; the benchmarks/
# sections are measurement scripts run by hand (their --quick forms are in tests/test_benchmarks.py)
COVERED = ("recipes/", "toolkit ", "Coming from")


def sections(text: str) -> dict[str, str]:
    """'## title' -> the text under it (to the next '## ')."""
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {part.splitlines()[0].strip().strip("`"): part for part in parts}


@cache
def doc_sections() -> dict[str, str]:
    return sections(DOC.read_text(encoding="utf-8"))


def documented_flags() -> dict[str, set[str]]:
    return {title: set(FLAG.findall(text)) - LAUNCHER_FLAGS for title, text in doc_sections().items()
            if title.startswith(COVERED)}


def named_tests() -> dict[str, dict[str, tuple[str, str]]]:
    """'### title' of the table -> {flag: (test file, test name)}."""
    table = doc_sections()[TABLE]
    named: dict[str, dict[str, tuple[str, str]]] = {}
    for part in re.split(r"^### ", table, flags=re.M)[1:]:
        rows = named.setdefault(part.splitlines()[0].strip().strip("`"), {})
        for line in part.splitlines():
            test = TEST.search(line)
            if line.startswith("|") and test:
                for flag in FLAG.findall(line.split("|")[1]):
                    rows[flag] = test.groups()
    return named


@cache
def functions_of(file: str) -> dict[str, str]:
    """Each test function of tests/FILE -> its source plus that of the module-level names it uses, directly or through
    one another (argument lists, helpers, fixtures), where a flag it passes may be written."""
    text = (REPO / "tests" / file).read_text(encoding="utf-8")
    lines = text.splitlines()
    names = {}
    for node in ast.parse(text).body:
        targets = ([t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign)
                   else [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [])
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])  # parametrize too
        for name in targets:
            names[name] = "\n".join(lines[first - 1:node.end_lineno])
    def with_what_it_uses(name: str) -> str:  # transitively: a fixture's own argument lists, ...
        seen, todo = {name}, [name]
        while todo:
            source = names[todo.pop()]
            for used in names:
                if used not in seen and re.search(rf"\b{used}\b", source):
                    seen.add(used)
                    todo.append(used)
        return "\n".join(names[n] for n in seen)

    return {name: with_what_it_uses(name) for name in names if name.startswith("test_")}


def test_every_documented_flag_names_a_test():
    documented, named = documented_flags(), named_tests()
    assert documented, "no recipe or toolkit sections found in docs/scripts_reference.md"
    missing = [f"--{flag} ({title})" for title, flags in documented.items() for flag in sorted(flags)
               if flag not in named.get(title, {})]
    assert not missing, f"docs/scripts_reference.md documents flags its '{TABLE}' tables name no test for: {missing}"


def test_every_named_test_exists_and_passes_its_flag():
    problems = []
    for title, rows in named_tests().items():
        for flag, (file, name) in rows.items():
            if not (REPO / "tests" / file).is_file() or name not in functions_of(file):
                problems.append(f"{title} --{flag}: no test {file}::{name}")
            elif not re.search(rf"(?<![\w-])--{re.escape(flag)}(?![\w-])", functions_of(file)[name]):
                problems.append(f"{title} --{flag}: {file}::{name} does not pass --{flag}")
    assert not problems, problems


def test_every_accelerate_config_names_existing_tests():
    table = doc_sections()["accelerate_configs/"]
    configs = {p.name for p in (REPO / "accelerate_configs").glob("*.yaml")}
    seen = set()
    for line in table.splitlines():
        files = re.findall(r"`([\w.]+\.yaml)`", line.split("|")[1]) if line.startswith("|") else []
        tests = TEST.findall(line)
        if files:
            assert tests, f"accelerate_configs/ row names no test: {line}"
        for file, name in tests:
            assert name in functions_of(file), f"no test {file}::{name}"
        for config in files:  # each file of the row is used by one of the tests named
            assert any(config in functions_of(file)[name] for file, name in tests), (config, line)
        seen.update(files)
    assert seen == configs, f"accelerate_configs/ files without a row: {configs - seen}"
