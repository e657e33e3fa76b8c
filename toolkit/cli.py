"""The `toolkit` console command (also `python -m toolkit`).

Each subcommand lives in its own module with a `main(argv)` function; they are imported lazily so
`toolkit --help` stays fast (importing transformers takes seconds).
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Modules expose main(argv: list[str]) -> int | None.
SUBCOMMANDS = {
    "prepare": ("toolkit.commands.prepare",
                "tokenize a corpus into a sharded token store for pretraining (resumable)"),
    "presets": ("toolkit.commands.presets", "list the GPT-2 model presets and their parameter counts"),
    "plan": ("toolkit.commands.plan", "memory/throughput planner: which recipe and accelerate config to use"),
    "merge": ("toolkit.commands.merge", "merge a LoRA/QLoRA adapter into its base model (full precision)"),
    "push": ("toolkit.commands.push", "push an existing model or adapter folder to the Hugging Face Hub"),
    "generate": ("toolkit.commands.generate",
                 "sample text from a model (optionally with a LoRA/QLoRA adapter), streamed"),
    "eval": ("toolkit.commands.eval", "loss, perplexity, bits per byte on text; lm-eval benchmarks (hellaswag, ...)"),
}


def _usage() -> str:
    lines = ["usage: toolkit <command> [options]", "", "commands:"]
    for name, (_, help_text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<10} {help_text}")
    lines += ["", "Run `toolkit <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown command '{name}'; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
