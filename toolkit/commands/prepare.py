"""`toolkit prepare`: tokenize a corpus into a token store (toolkit/data/store.py), in parallel, in bounded memory.

    toolkit prepare corpus/ --output_dir data/store --tokenizer_name gpt2
    toolkit prepare --dataset_name HuggingFaceFW/fineweb-edu --dataset_config_name sample-10BT \\
        --output_dir data/fineweb-edu-10B --tokenizer_name gpt2

The build itself (parallel tokenization, validation split, resume after a kill) is toolkit/data/prepare.py.
"""

from __future__ import annotations

import argparse
import errno
import shlex
import sys

from toolkit.args.ranges import check_ranges
from toolkit.data.corpus import Corpus
from toolkit.data.prepare import (
    DEFAULT_BATCH_CHARS,
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VALIDATION_FRACTION,
    DEFAULT_VALIDATION_MAX_TOKENS,
    build_store,
)
from toolkit.errors import OneLineArgumentParser, UserError, exit_on_user_error


def parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="toolkit prepare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Layout and reading: docs/pretraining_at_scale.md; train with recipes/pretrain.py --token_store STORE.",
    )
    p.add_argument(
        "source",
        nargs="?",
        help="a file or folder of .txt (one document per file), .jsonl/.json/.parquet/.csv "
        "(one document per row) files",
    )
    p.add_argument("--dataset_name", help="instead of SOURCE: a datasets dataset (Hub name or local dataset folder)")
    p.add_argument("--dataset_config_name", help="the dataset's configuration (e.g. sample-10BT)")
    p.add_argument("--dataset_split", default="train", help="the dataset's split to read (default: train)")
    p.add_argument(
        "--streaming",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=True,
        help="stream the dataset (default true: no download to the datasets cache, no Arrow copies)",
    )
    p.add_argument(
        "--output_dir", required=True, help="the store folder (new or empty; or an interrupted store to finish)"
    )
    p.add_argument("--tokenizer_name", required=True, help="tokenizer folder or Hub name (e.g. gpt2)")
    p.add_argument(
        "--text_column", default="text", help="column/field holding the text in tabular data (default: text)"
    )
    p.add_argument(
        "--validation_file", help="hold out this file/folder as the validation split instead of documents of SOURCE"
    )
    p.add_argument(
        "--validation_fraction",
        type=float,
        default=DEFAULT_VALIDATION_FRACTION,
        help="documents held out for validation: every round(1/F)-th (default 0.005; 0 = none)",
    )
    p.add_argument(
        "--validation_max_tokens",
        type=int,
        default=DEFAULT_VALIDATION_MAX_TOKENS,
        help="stop holding out documents once validation has this many tokens (default 5_000_000)",
    )
    p.add_argument(
        "--shard_tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help="tokens per shard (default 100_000_000: 200 MB as uint16)",
    )
    p.add_argument(
        "--num_proc",
        type=int,
        default=None,
        help="tokenizer processes (default: all cores; one for sources under 16 MB)",
    )
    p.add_argument(
        "--batch_chars",
        type=int,
        default=DEFAULT_BATCH_CHARS,
        help="characters of text per tokenization batch (default 1 MiB)",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    check_ranges(args, command="toolkit prepare")  # every numeric option (toolkit/args/ranges.py)
    if bool(args.source) == bool(args.dataset_name):
        raise UserError("give either a SOURCE file/folder or --dataset_name (one of them)")
    if args.source:
        corpus = Corpus.from_files(args.source, args.text_column)
    else:
        corpus = Corpus.from_dataset(
            args.dataset_name, args.dataset_config_name, args.dataset_split, args.text_column, streaming=args.streaming
        )
    validation = Corpus.from_files(args.validation_file, args.text_column) if args.validation_file else None
    from toolkit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer_name)
    command = "toolkit prepare " + shlex.join(argv)
    try:
        manifest = build_store(
            corpus,
            tokenizer,
            args.output_dir,
            validation_corpus=validation,
            validation_fraction=args.validation_fraction,
            validation_max_tokens=args.validation_max_tokens,
            shard_tokens=args.shard_tokens,
            num_proc=args.num_proc,
            batch_chars=args.batch_chars,
            command=command,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(f"\nInterrupted; complete shards are kept in {args.output_dir}. Rerun the same command to continue.",
              file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise UserError(
                f"disk full while writing '{args.output_dir}'; free space and rerun the same command "
                "(complete shards are kept)"
            ) from None
        raise
    print(f"{args.output_dir}: {manifest['_summary']}")
    print(f"Train with: python recipes/pretrain.py --token_store {shlex.quote(args.output_dir)} ...")
    return 0
