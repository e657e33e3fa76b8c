"""`toolkit eval`: loss, perplexity and bits per byte of a model on any text, and lm-eval benchmarks.

    toolkit eval out/pretrain --text_file valid.txt                   # non-overlapping windows of the context
    toolkit eval gpt2 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --stride 512
    toolkit eval gpt2 --tasks hellaswag                               # needs the [eval] extra (lm-eval)
    toolkit eval gpt2 --adapter out/lora-gpt2 --text_file chat.jsonl --json

Text is read as pretrain.py reads it (a .txt file is one document, a table row is one document, EOS after
each) and scored in windows of --block_size tokens. By default the windows do not overlap, as in
pretrain.py's evaluation, so each window's first token has no context and is not scored. With --stride S
(< block size) the windows advance by S tokens and only the tokens no earlier window scored are scored,
each seeing at least block_size - S tokens of context (transformers' perplexity guide): a lower, more
faithful estimate at block_size / S times the compute. Bits per byte divide the scored tokens' total
loss by ln 2 times the UTF-8 bytes those tokens encode (toolkit/lm_metrics.py).

Cost: time is linear in the tokens read (one batched forward per --batch_size windows, x block/stride with
--stride); memory does not grow with the text (read and tokenized in pieces on a background thread by
toolkit/data/corpus.py, windows streamed): batch_size x block_size x vocabulary logits at most.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from toolkit.args.ranges import Range, check_ranges
from toolkit.errors import OneLineArgumentParser, UserError, exit_on_user_error


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults in --help, and the module docstring's examples kept as written."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="toolkit eval", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="model folder or Hub name; may be left out with --adapter")
    p.add_argument("--adapter", default=None, help="LoRA/QLoRA adapter folder or Hub repo to apply on the model")
    text = p.add_argument_group("language-model quality: loss, perplexity, bits per byte")
    text.add_argument("--text_file", nargs="+", default=None,
                      help=".txt/.md (one document per file), .json/.jsonl/.parquet/.csv (one per row) or folders "
                           "of them")
    text.add_argument("--dataset_name", default=None, help="a datasets name (Hub or local folder), e.g. wikitext")
    text.add_argument("--dataset_config_name", default=None, help="its configuration, e.g. wikitext-103-raw-v1")
    text.add_argument("--dataset_split", default=None,
                      help="split to score (default: validation, else valid, else test)")
    text.add_argument("--text_column", default="text", help="column holding the text in tables and datasets")
    text.add_argument("--block_size", type=int, default=None,
                      help="window length in tokens (default: the block size the model was trained on, when "
                           "recipes/pretrain.py recorded it in config.json, else the model's context)")
    text.add_argument("--stride", type=int, default=None,
                      help="advance windows by this many tokens and score only the new ones (default: block_size, "
                           "no overlap)")
    text.add_argument("--max_tokens", type=int, default=None, help="score only the first N tokens of the text")
    bench = p.add_argument_group("benchmarks (lm-evaluation-harness, the [eval] extra)")
    bench.add_argument("--tasks", default=None,
                       help="comma-separated lm-eval tasks or groups, e.g. hellaswag,lambada_openai")
    bench.add_argument("--num_fewshot", type=int, default=None,
                       help="few-shot examples (default: each task's own, usually 0)")
    bench.add_argument("--limit", type=float, default=None,
                       help="examples per task (a fraction if < 1); for quick checks only")
    bench.add_argument("--include_path", default=None, help="folder with your own lm-eval task YAML files")
    p.add_argument("--batch_size", type=int, default=8, help="windows (or lm-eval requests) per forward pass")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bf16 on a GPU that has it, else fp32 (always fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with every result on stdout (messages on stderr)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--token", default=None, help="Hub token for a private model, adapter or dataset (never printed)")
    return p


def check_options(args, context: int | None = None) -> None:
    """Something to evaluate and every numeric option in its range (toolkit/args/ranges.py); once the model's context
    is known, the block size against it and the stride against the block."""
    if not (args.text_file or args.dataset_name or args.tasks):
        raise UserError("nothing to evaluate: pass --text_file or --dataset_name (loss, perplexity, bits per byte) "
                        "and/or --tasks hellaswag,... (lm-eval benchmarks)")
    if args.text_file and args.dataset_name:
        raise UserError("pass either --text_file or --dataset_name, not both")
    check_ranges(args, command="toolkit eval")
    if context is not None:
        block = args.block_size or context
        if block > context:
            raise UserError(f"--block_size {block} is larger than the model's context of {context} tokens; "
                            f"lower it to {context} or less")
        check_ranges(args, {"stride": Range(1, block, note="at most the block size")})


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_options(args)

    from toolkit.evaluation import evaluate_text, text_corpora
    from toolkit.inference import load_for_inference, model_context, resolve_model
    from toolkit.lm_eval_tasks import parse_tasks, run_tasks, scores, table, task_manager

    model_name, adapter_cfg = resolve_model(args.model, args.adapter, args.token)
    context, trained_block = model_context(model_name, args.token)
    check_options(args, context)
    args.block_size = args.block_size or trained_block
    if args.text_file:
        text_corpora(args)  # missing or empty files fail before the model loads
    tasks = parse_tasks(args.tasks) if args.tasks else []
    manager = task_manager(tasks, args.include_path) if tasks else None
    loaded = load_for_inference(model_name, args.adapter, adapter_cfg, args.dtype, args.device, args.token)
    print(f"evaluating {loaded.name} ({loaded.dtype}, {loaded.device})", file=sys.stderr, flush=True)

    report: dict = {"model": model_name, "adapter": args.adapter, "dtype": loaded.dtype}
    if args.text_file or args.dataset_name:
        result = evaluate_text(loaded, args)
        report["text"] = asdict(result)
        if not args.json:
            print(f"{result.source}: {result.tokens:,} tokens scored ({result.bytes:,} bytes) in "
                  f"{result.windows:,} windows of {result.block_size}, stride {result.stride}")
            print(f"loss {result.loss:.4f} nats/token | perplexity {result.perplexity:.3f} | "
                  f"bits per byte {result.bits_per_byte:.4f}")
    if tasks:
        results = run_tasks(loaded.model, loaded.tokenizer, tasks, manager, limit=args.limit,
                            num_fewshot=args.num_fewshot, batch_size=args.batch_size)
        report["tasks"] = scores(results)
        report["lm_eval"] = {"version": results.get("config", {}).get("lm_eval_version") or _lm_eval_version(),
                             "n-shot": results.get("n-shot"), "limit": args.limit}
        if not args.json:
            print(table(results))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None
