"""Build a token store (layout and manifest: toolkit/data/store.py) from a corpus, in parallel, in bounded memory.
`toolkit prepare` (toolkit/commands/prepare.py) and the pretraining cache (toolkit/data/pretrain.py) call
`build_store`.

Documents are read in batches (toolkit/data/corpus.py) and tokenized by --num_proc worker processes with the Rust
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

import hashlib
import os
import time

import numpy as np

from toolkit.data import store as ts
from toolkit.data.corpus import Corpus
from toolkit.data.tokenize_pool import default_num_proc, encoded_batches, peak_rss_kib
from toolkit.errors import UserError

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VALIDATION_FRACTION = 0.005
DEFAULT_VALIDATION_MAX_TOKENS = 5_000_000
DEFAULT_BATCH_CHARS = 1 << 20
SMALL_SOURCE_BYTES = 16 << 20  # below this, one process: starting workers costs more than it saves


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
    manifest = ts.start_or_resume(output_dir, settings, command)
    if manifest.get("complete"):
        return manifest
    ts.remove_unlisted(output_dir, manifest)  # temporary files and unlisted shards of an interrupted run
    ts.describe_build(manifest, eos_id, vocab_size, getattr(tokenizer, "name_or_path", ""), corpus.describe(),
                      validation_corpus.describe() if validation_corpus else None, command)
    tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))
    train, val, resume = open_writers(manifest, output_dir)

    def snapshot(record: dict) -> None:
        ts.save_resume_point(manifest, output_dir, record, train, val)

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
    manifest["validation"].setdefault(
        "rule",
        "documents from --validation_file"
        if validation_corpus is not None
        else f"every {every}th document"
        if every
        else "none",
    )
    ts.finish_store(manifest, output_dir, train, val)
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


class SplitWriter:
    """Appends one split's documents to shards of exactly shard_tokens tokens (the last one shorter), each renamed
    into place when complete.

    Training shards stream to a temporary file (no shard-sized buffer in memory) that is renamed when full.
    Validation is small (capped) and kept in memory, so a resumable snapshot can save what it holds so far.
    """

    def __init__(self, store_dir: str, split: str, shard_tokens: int, dtype: str, shards: list[dict] | None = None,
                 in_memory: bool = False):
        self.store_dir, self.split, self.shard_tokens, self.dtype = store_dir, split, shard_tokens, np.dtype(dtype)
        self.shards = list(shards or [])
        self.in_memory = in_memory
        self._reset()

    def _reset(self) -> None:
        self.fill = self.documents = self.utf8_bytes = 0
        self.pieces: list[np.ndarray] = []
        self.hash = hashlib.sha256()
        self.file = None

    @property
    def tokens(self) -> int:
        """Tokens written to this split so far, complete shards and the current one."""
        return sum(s["tokens"] for s in self.shards) + self.fill

    def restore(self, ids: np.ndarray, documents: int, utf8_bytes: int) -> None:
        """Continue a shard from a snapshot (validation only)."""
        self.add(ids, np.array([len(ids)]), np.array([0]), 0)
        self.documents, self.utf8_bytes = documents, utf8_bytes

    def add(self, ids: np.ndarray, ends: np.ndarray, nbytes: np.ndarray, first_doc: int, first_offset: int = 0,
            on_shard=None) -> None:
        """Write consecutive documents first_doc, first_doc+1, ...: `ids` their tokens, `ends` the cumulative end of
        each document in `ids`, `nbytes` their UTF-8 sizes. The first document's first `first_offset` tokens were
        written before (a resumed run). on_shard(record) is called after every shard that completes."""
        pos = 0
        while pos < len(ids):
            take = min(len(ids) - pos, self.shard_tokens - self.fill)
            self._write(ids[pos : pos + take])
            lo, hi = np.searchsorted(ends, [pos, pos + take], side="right")
            self.documents += int(hi - lo)
            self.utf8_bytes += int(nbytes[lo:hi].sum())
            pos += take
            if self.fill == self.shard_tokens:
                k = int(np.searchsorted(ends, pos, side="right"))  # the first document not finished yet
                offset = pos - (int(ends[k - 1]) if k else 0) + (first_offset if k == 0 else 0)
                record = self._finish({"document": first_doc + k, "token": offset if k < len(ends) else 0})
                if on_shard:
                    on_shard(record)

    def _write(self, ids: np.ndarray) -> None:
        data = np.ascontiguousarray(ids, dtype=self.dtype)
        self.hash.update(data.tobytes() if not data.flags.c_contiguous else memoryview(data).cast("B"))
        if self.in_memory:
            self.pieces.append(data.copy())
        else:
            if self.file is None:
                self.file = open(self._path() + ".tmp", "wb")  # noqa: SIM115 - open across add() calls, closed in _finish
            data.tofile(self.file)
        self.fill += len(data)

    def _path(self) -> str:
        return os.path.join(self.store_dir, ts.shard_file(self.split, len(self.shards)))

    def held(self) -> np.ndarray:
        """The current (unfinished) shard's tokens kept in memory."""
        return np.concatenate(self.pieces) if self.pieces else np.zeros(0, self.dtype)

    def finish(self) -> dict | None:
        """Close the last, shorter shard (if it has tokens)."""
        return self._finish(None) if self.fill else None

    def _finish(self, end: dict | None) -> dict:
        path = self._path()
        if self.in_memory:
            ts.write_file_atomically(path, self.held().tobytes())
        else:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(path + ".tmp", path)
        record = {"file": os.path.basename(path), "tokens": self.fill, "documents": self.documents,
                  "utf8_bytes": self.utf8_bytes, "sha256": self.hash.hexdigest()}
        if end is not None:
            record["end"] = end  # where the next shard starts in the source's documents (resume point)
        self.shards.append(record)
        self._reset()
        return record

    def close(self) -> None:
        if self.file is not None:
            self.file.close()




def open_writers(manifest: dict, output_dir: str) -> tuple[SplitWriter, SplitWriter, dict]:
    """(train writer, validation writer, resume point) continuing the shards the manifest lists."""
    resume = manifest.pop("resume", None) or {"document": 0, "token": 0, "validation_partial": None}
    splits, dtype, shard_tokens = manifest.get("splits", {}), manifest["dtype"], manifest["shard_tokens"]
    train = SplitWriter(output_dir, "train", shard_tokens, dtype, splits.get("train", {}).get("shards"))
    val = SplitWriter(output_dir, "validation", shard_tokens, dtype, splits.get("validation", {}).get("shards"),
                      in_memory=True)
    partial = resume["validation_partial"]
    if partial:
        held = np.fromfile(os.path.join(output_dir, partial["file"]), dtype=dtype)
        if len(held) != partial["tokens"]:
            raise UserError(ts.corrupt_message(output_dir, partial["file"], "is not the size the manifest says"))
        val.restore(held, partial["documents"], partial["utf8_bytes"])
    return train, val, resume


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
