"""One parser for every recipe: `--config file.yaml`, then `--key value` overrides, then range checks.

Order of precedence, lowest first: the dataclass field defaults, the recipe's `defaults` (what
`toolkit.args.resolve_defaults` picked for this machine), the YAML file, the command line. Unknown keys, in
the YAML or on the command line, are errors, and so is any numeric option outside its valid range
(`toolkit/args/ranges.py`): every such mistake is one line naming the option, the value and the fix, before any data or
model work starts.

Also accepted, for people arriving with other tools' commands: dash forms (`--n-layer 48` = `--n_layer 48`),
`--steps` (= `--max_steps`), `--data` (= `--train_file`), `--model` (a preset name for pretraining, else
`--model_name_or_path`), `--gradient_checkpointing` (transformers' older name of `--activation_checkpointing`)
and `--dataset_config` (trl's name of `--dataset_config_name`).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from toolkit.args.ranges import check_ranges
from toolkit.errors import UserError

# Other names of options: key -> canonical name. "model" depends on the value (see _canonical_name).
ALIASES = {
    "steps": "max_steps",
    "data": "train_file",
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
    "dataset_config": "dataset_config_name",
    "out_dir": "output_dir",
}


def _canonical_name(name: str, value: str | None, fields: set[str]) -> str:
    name = name.replace("-", "_")
    if name == "model" and "model" not in fields:
        from toolkit.presets import PRESETS

        return "preset" if "preset" in fields and value in PRESETS else "model_name_or_path"
    return ALIASES.get(name, name)


def normalize_argv(argv: list[str], fields: set[str]) -> list[str]:
    """Dash forms and aliases -> the canonical `--snake_case` names; values are left alone."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token.startswith("--") and len(token) > 2 and (i == 0 or not _takes_dash_value(argv[i - 1])):
            name, eq, value = token[2:].partition("=")
            following = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            token = f"--{_canonical_name(name, following, fields)}{eq}{value}"
        out.append(token)
    return out


def _takes_dash_value(previous: str) -> bool:
    # a value that starts with "--" only follows options that take free text (a prompt); keep it as typed
    return previous in ("--sample_prompt", "--prompt")


class _Parser:
    """transformers' HfArgumentParser (dataclass fields -> argparse) with errors turned into one line."""

    def __init__(self, dataclass_types):
        from transformers import HfArgumentParser

        class OneLineErrors(HfArgumentParser):
            def error(self, message):  # argparse's default prints the whole usage block and exits
                raise UserError(f"{message}; see --help")

        self.types = list(dataclass_types)
        self.hf = OneLineErrors(self.types)
        self.fields = {f.name for t in self.types for f in dataclasses.fields(t) if f.init}
        self._document_aliases()

    def _document_aliases(self) -> None:
        """--help shows the other guides' forms: beside each option they stand for, and as a list at the end."""
        import argparse

        others = {name: [alias for alias, canonical in ALIASES.items() if canonical == name] for name in self.fields}
        others["model_name_or_path"] = ["model"]
        if "preset" in self.fields:
            others["preset"] = ["model"]
        for action in self.hf._actions:
            if others.get(action.dest) and action.help is not None:
                action.help += " (also " + ", ".join(f"--{a}" for a in others[action.dest]) + ")"
        lines = [f"  --{alias:<24} = --{canonical}" for alias, canonical in ALIASES.items()
                 if canonical in self.fields]
        if "preset" in self.fields:
            lines.append(f"  --{'model NAME':<24} = --preset NAME for a preset name, else --model_name_or_path NAME")
        else:
            lines.append(f"  --{'model NAME':<24} = --model_name_or_path NAME")
        lines.append(f"  {'--n-layer 48, ...':<26} = --n_layer 48: any option with dashes for underscores")
        self.hf.epilog = "other names of options (the command forms of other GPT-2 guides):\n" + "\n".join(lines)

        class KeepEpilogLines(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
            pass

        self.hf.formatter_class = KeepEpilogLines

    def set_defaults(self, values: dict, source: str) -> None:
        unknown = []
        for key, value in values.items():
            name = _canonical_name(str(key), value if isinstance(value, str) else None, self.fields)
            if name not in self.fields:
                unknown.append(str(key))
                continue
            for action in self.hf._actions:
                if action.dest == name:
                    action.default, action.required = value, False
        if unknown:
            raise UserError(f"unknown key(s) in {source}: {', '.join(unknown)}; "
                            "remove them or fix the spelling (see --help)")


def load_yaml_config(path: str) -> dict:
    """A YAML mapping; broken syntax is one line with the file, line and column."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except OSError as err:
        raise UserError(f"cannot read config file '{path}' ({err.strerror}); check the path") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file '{path}' is not valid YAML{where} ({problem}); fix the syntax there") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"config file '{path}' must hold a mapping of option: value lines, "
                        f"not a {type(config).__name__}")
    env = config.pop("env", {})  # trl's convention: environment variables for the run
    if not isinstance(env, dict):
        raise UserError(f"'env' in config file '{path}' must be a mapping of NAME: value")
    for key, value in env.items():
        os.environ[str(key)] = str(value)
    return config


HELP_FLAGS = ("-h", "--help")


def _help_cache(recipe: str) -> str:
    """Where this recipe's --help text is kept: one file per version of the options (the argument modules' source,
    toolkit/presets.py and toolkit/guard.py whose constants some defaults are, transformers and trl) and machine (its
    defaults are in the text)."""
    import glob
    import hashlib
    import importlib.metadata
    import platform

    digest = hashlib.sha256(f"{recipe} {sys.version} {platform.node()}".encode())
    for dist in ("transformers", "trl", "torch"):
        try:
            digest.update(importlib.metadata.version(dist).encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    here = os.path.dirname(__file__)
    for path in [*sorted(glob.glob(os.path.join(here, "*.py"))), os.path.join(here, os.pardir, "presets.py"),
                 os.path.join(here, os.pardir, "guard.py")]:
        with open(path, "rb") as f:
            digest.update(f.read())
    name = f"{recipe}-{digest.hexdigest()[:16]}.txt"
    return os.path.join(os.path.expanduser("~"), ".cache", "gpt2-toolkit", "help", name)


def print_cached_help(recipe: str, argv: list[str] | None = None) -> bool:
    """--help answered from the text a previous --help of the same version wrote, without importing transformers and
    torch (seconds): True when it was printed."""
    argv = sys.argv[1:] if argv is None else argv
    if not any(flag in argv for flag in HELP_FLAGS):
        return False
    try:
        with open(_help_cache(recipe), encoding="utf-8") as f:
            print(f.read(), end="")
        return True
    except OSError:
        return False


def parse(dataclass_types, argv: list[str] | None = None, defaults: dict | None = None,
          recipe: str | None = None) -> tuple:
    """Parse `--config file.yaml` + command-line overrides into instances of `dataclass_types`, in that order;
    `recipe` names the --help text kept for print_cached_help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(dataclass_types)
    if defaults:
        parser.set_defaults(defaults, "the recipe's defaults")
    if any(flag in argv for flag in HELP_FLAGS):
        text = parser.hf.format_help()
        if recipe:  # kept for print_cached_help: the next --help needs no transformers import
            try:
                path = _help_cache(recipe)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(path + ".tmp", path)
            except OSError:
                pass  # a read-only home: --help is only slower
        print(text, end="")
        raise SystemExit(0)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a YAML file path, e.g. --config recipes/configs/pretrain_gpt2-micro.yaml")
        path = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
        parser.set_defaults(load_yaml_config(path), f"the YAML config '{path}'")
    namespace, unknown = parser.hf.parse_known_args(normalize_argv(argv, parser.fields))
    if unknown:
        raise UserError(f"unknown command-line option(s): {' '.join(unknown)}; fix the spelling (see --help)")
    values = vars(namespace)
    check_ranges(values)
    check_precision(values)
    outputs = []
    for dtype in parser.types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:
            outputs.append(dtype(**{k: v for k, v in values.items() if k in keys}))
        except ValueError as err:  # transformers' and trl's own checks of option combinations
            raise UserError(f"invalid configuration: {str(err).strip().splitlines()[0]}") from None
    return tuple(outputs)


def check_precision(values: dict) -> None:
    """--bf16 where it cannot run well: a GPU without bf16, or a CPU whose bf16 matmuls are slower than fp32."""
    if not values.get("bf16"):
        return
    import torch

    if torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise UserError("--bf16 on a GPU without bf16 support; drop --bf16 or use --fp16 on this GPU")
        return
    from toolkit.flops import cpu_bf16_speedup

    speedup = cpu_bf16_speedup()
    if speedup < 1.0:
        raise UserError(f"--bf16 on a CPU without fast bf16 (bf16 matmul measured {1 / speedup:.0f}x slower than fp32 "
                        "here); drop --bf16: CPU runs use fp32")
    values["use_cpu"] = True  # transformers refuses bf16 without a GPU unless told the run is on the CPU
