"""`toolkit prepare`: tokenize a corpus into a token store (toolkit/token_store.py), in parallel, in bounded memory.

    toolkit prepare corpus/ --output_dir data/store --tokenizer_name gpt2
    toolkit prepare --dataset_name HuggingFaceFW/fineweb-edu --dataset_config_name sample-10BT \\
        --output_dir data/fineweb-edu-10B --tokenizer_name gpt2

Documents are read in batches (toolkit/corpus.py) and tokenized by --num_proc worker processes with the Rust
tokenizer's batch call; results are consumed in order, so the store does not depend on --num_proc. Memory holds
the batches in flight and the validation tokens (capped), never the corpus: training shards stream to disk.

Validation: documents 0, k, 2k, ... (k = round(1 / --validation_fraction)) go to the validation split whole, until
it holds --validation_max_tokens; or every document of --validation_file. A corpus of one document (a single .txt
file) is cut instead: the last round(fraction x its tokens) tokens (at least 1, at most the cap) are validation.

Resumable: after every training shard the manifest records where the next one starts in the source's documents
(document index + tokens of it already written) and saves the validation tokens held so far. Rerunning the same
command after a kill keeps the complete shards and continues; the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
import time

import numpy as np

from toolkit import store_writer as sw
from toolkit import token_store as ts
from toolkit.corpus import Corpus
from toolkit.errors import OneLineArgumentParser, UserError, exit_on_user_error
from toolkit.tokenize_pool import default_num_proc, encoded_batches, peak_rss_kib

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VALIDATION_FRACTION = 0.005
DEFAULT_VALIDATION_MAX_TOKENS = 5_000_000
DEFAULT_BATCH_CHARS = 1 << 20
SMALL_SOURCE_BYTES = 16 << 20  # below this, one process: starting workers costs more than it saves


# ---- the store builder ----


def build_store(
    corpus: Corpus,
    tokenizer,
    output_dir: str,
    *,
    validation_corpus: Corpus | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    validation_max_tokens: int = DEFAULT_VALIDATION_MAX_TOKENS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_proc: int | None = None,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    command: str = "",
    progress: bool = True,
) -> dict:
    """Tokenize `corpus` into a complete store at output_dir (or finish an interrupted one); returns the manifest."""
    backend = ts.backend_json(tokenizer)
    vocab_size, eos_id = len(tokenizer), tokenizer.eos_token_id
    if eos_id is None:
        raise UserError("the tokenizer has no EOS token; documents must be separated by one, choose another tokenizer")
    dtype = ts.token_dtype(vocab_size)
    holds_out = validation_fraction > 0 and validation_max_tokens > 0 and validation_corpus is None
    every = round(1 / validation_fraction) if holds_out else 0
    settings = {
        "tokenizer_fingerprint": ts.tokenizer_fingerprint(backend),
        "dtype": dtype,
        "shard_tokens": shard_tokens,
        "source": corpus.fingerprint(),
        "validation_every": every,
        "validation_max_tokens": validation_max_tokens,
        "validation_fraction": validation_fraction,
        "validation_source": validation_corpus.fingerprint() if validation_corpus else None,
    }
    manifest = sw.start_or_resume(output_dir, settings, command)
    if manifest.get("complete"):
        return manifest
    sw.remove_unlisted(output_dir, manifest)  # temporary files and unlisted shards of an interrupted run
    manifest.update(
        tokenizer={
            "fingerprint": settings["tokenizer_fingerprint"],
            "eos_id": eos_id,
            "vocab_size": vocab_size,
            "name": getattr(tokenizer, "name_or_path", ""),
        },
        dtype=dtype,
        shard_tokens=shard_tokens,
        source=corpus.describe(),
        command=command,
        validation={
            "fraction": validation_fraction,
            "every": every,
            "max_tokens": validation_max_tokens,
            "source": validation_corpus.describe() if validation_corpus else None,
        },
    )
    tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))

    resume = manifest.pop("resume", None) or {"document": 0, "token": 0, "validation_partial": None}
    splits = manifest.get("splits", {})
    train = sw.SplitWriter(output_dir, "train", shard_tokens, dtype, splits.get("train", {}).get("shards"))
    val = sw.SplitWriter(
        output_dir, "validation", shard_tokens, dtype, splits.get("validation", {}).get("shards"), in_memory=True
    )
    partial = resume["validation_partial"]
    if partial:
        held = np.fromfile(os.path.join(output_dir, partial["file"]), dtype=dtype)
        if len(held) != partial["tokens"]:
            raise UserError(ts.corrupt_message(output_dir, partial["file"], "is not the size the manifest says"))
        val.restore(held, partial["documents"], partial["utf8_bytes"])

    def snapshot(record: dict) -> None:
        """After each training shard: the state a rerun continues from."""
        old = (manifest.get("resume") or {}).get("validation_partial")
        saved = None
        if val.fill:
            saved = {
                "file": f"validation-partial-{len(train.shards):05d}.bin",
                "tokens": val.fill,
                "documents": val.documents,
                "utf8_bytes": val.utf8_bytes,
            }
            ts.write_file_atomically(os.path.join(output_dir, saved["file"]), val.held().tobytes())
        manifest["resume"] = {
            "document": record["end"]["document"],
            "token": record["end"]["token"],
            "validation_partial": saved,
        }
        sw.write_manifest_for(manifest, output_dir, train, val, complete=False)
        if old and old != saved:
            sw.remove_file(os.path.join(output_dir, old["file"]))

    num_proc = num_proc or (
        1 if (corpus.source_bytes() or 0) < SMALL_SOURCE_BYTES and corpus.kind != "dataset" else default_num_proc()
    )
    meter = _Progress(corpus, progress, output_dir)
    start, cpu_start = time.time(), time.process_time()
    doc = resume["document"]
    skip = resume["token"]
    pending = None
    batches = corpus.batches(start_document=doc, batch_chars=batch_chars)
    try:
        for (ids, lengths, nbytes, peak), batch in encoded_batches(batches, backend, eos_id, dtype, num_proc):
            meter.update(batch, len(ids), peak if num_proc > 1 else 0)
            if every and doc == 0 and not skip and pending is None and len(lengths) == 1:
                pending = (ids, lengths, nbytes)  # maybe the only document: its split waits for the next one
                continue
            if pending is not None:
                ids, lengths, nbytes = (np.concatenate([a, b]) for a, b in zip(pending, (ids, lengths, nbytes)))
                pending = None
            _route(ids, np.cumsum(lengths), nbytes, doc, skip, train, val, every, validation_max_tokens, snapshot)
            doc += len(lengths)
            skip = 0
        if pending is not None:
            _split_only_document(*pending, tokenizer, validation_fraction, validation_max_tokens, train, val)
            manifest["validation"]["rule"] = "tail of the only document"
        if validation_corpus is not None:  # its own bar after the training one; its tokens count in the summary
            meter.close()
            meter = _Progress(validation_corpus, progress, output_dir, meter, "validation")
            for (ids, lengths, nbytes, peak), batch in encoded_batches(
                validation_corpus.batches(batch_chars=batch_chars), backend, eos_id, dtype, num_proc
            ):
                meter.update(batch, len(ids), peak if num_proc > 1 else 0)
                val.add(ids, np.cumsum(lengths), nbytes, 0)
        if doc == 0 and pending is None and not train.shards and not train.fill:
            raise UserError("the corpus has no documents; point the source at data with text")
        train.finish()
        val.finish()
    finally:
        train.close()
        meter.close()
    manifest.pop("resume", None)
    manifest["validation"].setdefault(
        "rule",
        "documents from --validation_file"
        if validation_corpus is not None
        else f"every {every}th document"
        if every
        else "none",
    )
    sw.write_manifest_for(manifest, output_dir, train, val, complete=True)
    sw.remove_unlisted(output_dir, manifest)
    manifest["_summary"] = meter.summary(time.time() - start, time.process_time() - cpu_start, manifest, num_proc)
    return manifest


def _route(ids, ends, nbytes, first_doc, skip, train, val, every, max_tokens, snapshot) -> None:
    """Send a batch's documents to train or validation, in order (runs of consecutive training documents at once)."""
    if skip:  # the first document's first tokens are in the shards already (a resumed run)
        ids, ends = ids[skip:], ends - skip
    run_start = 0  # first document of the current run of training documents

    def write_train(a: int, b: int) -> None:
        if a < b:
            lo = int(ends[a - 1]) if a else 0
            train.add(
                ids[lo : int(ends[b - 1])], ends[a:b] - lo, nbytes[a:b], first_doc + a, skip if a == 0 else 0, snapshot
            )

    if every:
        for c in range((-first_doc) % every, len(ends), every):
            if val.tokens >= max_tokens:
                break
            write_train(run_start, c)
            lo = int(ends[c - 1]) if c else 0
            val.add(ids[lo : int(ends[c])], ends[c : c + 1] - lo, nbytes[c : c + 1], first_doc + c)
            run_start = c + 1
    write_train(run_start, len(ends))


def _split_only_document(ids, lengths, nbytes, tokenizer, fraction, max_tokens, train, val) -> None:
    """A corpus of one document: its tail is the validation split (a cut inside the document)."""
    n = len(ids)
    tail = min(max_tokens, max(1, round(n * fraction)))
    if n - tail < 1:
        raise UserError(f"the corpus is one document of {n} tokens: too short to hold out validation; add text")
    head_bytes = len(tokenizer.decode(ids[: n - tail].tolist()).encode("utf-8", "surrogatepass"))
    train.add(ids[: n - tail], np.array([n - tail]), np.array([head_bytes]), 0)
    val.add(ids[n - tail :], np.array([tail]), np.array([max(0, int(nbytes[0]) - head_bytes)]), 0)


class _Progress:
    """A tqdm bar over the source (bytes of files, or documents) with tokens/s and MB/s of text."""

    def __init__(self, corpus: Corpus, enabled: bool, output_dir: str, before: _Progress | None = None,
                 split: str = ""):
        from tqdm.auto import tqdm

        total, unit = corpus.progress_total()
        self.bar = tqdm(
            total=total,
            unit=unit,
            unit_scale=True,
            disable=not enabled,
            desc=f"prepare {os.path.basename(output_dir)}" + (f" ({split})" if split else ""),
            dynamic_ncols=True,
            smoothing=0.1,
        )
        # a later source's bar (the --validation_file) carries the counts on, so the summary covers both
        self.tokens, self.chars, self.worker_peak_kib = (
            (before.tokens, before.chars, before.worker_peak_kib) if before else (0, 0, 0)
        )
        self.start = before.start if before else time.time()
        self.position = None

    def update(self, batch, tokens: int, worker_peak_kib: int) -> None:
        self.tokens += tokens
        self.worker_peak_kib = max(self.worker_peak_kib, worker_peak_kib)
        self.chars += sum(map(len, batch.texts))
        if self.position is None:  # a resumed run starts where the last one stopped
            self.bar.n = self.bar.last_print_n = batch.position
            self.bar.refresh()
        else:
            self.bar.update(batch.position - self.position)
        self.position = batch.position
        elapsed = max(time.time() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"{self.tokens / elapsed / 1e6:.2f}M tok/s, {self.chars / elapsed / 1e6:.1f} MB/s text", refresh=False
        )

    def close(self) -> None:
        self.bar.close()

    def summary(self, seconds: float, main_cpu: float, manifest: dict, num_proc: int) -> str:
        splits = manifest["splits"]
        n_shards = sum(len(s["shards"]) for s in splits.values())
        memory = f"peak memory {peak_rss_kib() / 1024:,.0f} MiB"
        if self.worker_peak_kib:
            memory += f" (+ {self.worker_peak_kib / 1024:,.0f} MiB per worker)"
        seconds = max(seconds, 1e-9)
        # The main process reads, routes and writes for all workers: its share of a core says how many workers it can
        # feed (num_proc / share) before it, not tokenization, sets the pace.
        main = f"; main process {main_cpu / seconds:.0%} busy with {num_proc} worker(s)" if num_proc > 1 else ""
        return (
            f"{splits['train']['tokens']:,} training + {splits['validation']['tokens']:,} validation tokens "
            f"({splits['train']['documents'] + splits['validation']['documents']:,} documents), {n_shards} shard(s); "
            f"{self.tokens:,} tokens tokenized in {seconds:.1f} s ({self.tokens / seconds:,.0f} tokens/s); "
            f"{memory}{main}"
        )


# ---- the command ----


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 0.5:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 0.5]")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


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
        type=_fraction,
        default=DEFAULT_VALIDATION_FRACTION,
        help="documents held out for validation: every round(1/F)-th (default 0.005; 0 = none)",
    )
    p.add_argument(
        "--validation_max_tokens",
        type=_non_negative,
        default=DEFAULT_VALIDATION_MAX_TOKENS,
        help="stop holding out documents once validation has this many tokens (default 5_000_000)",
    )
    p.add_argument(
        "--shard_tokens",
        type=_positive,
        default=DEFAULT_SHARD_TOKENS,
        help="tokens per shard (default 100_000_000: 200 MB as uint16)",
    )
    p.add_argument(
        "--num_proc",
        type=_positive,
        default=None,
        help="tokenizer processes (default: all cores; one for sources under 16 MB)",
    )
    p.add_argument(
        "--batch_chars",
        type=_positive,
        default=DEFAULT_BATCH_CHARS,
        help="characters of text per tokenization batch (default 1 MiB)",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
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
