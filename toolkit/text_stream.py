"""Text to evaluate, as a stream of token id arrays: read in pieces, tokenized on a background thread.

Read as recipes/pretrain.py reads its data (a .txt/.md file is one document, a .json/.jsonl/.parquet/.csv row is
one, EOS after each document), so `toolkit eval` measures what the recipe's evaluation measures. A long file is
cut into pieces at places GPT-2's pre-tokenizer splits anyway, so the tokens are those of the whole text, and
memory does not grow with its length.
"""

from __future__ import annotations

import glob
import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator

import numpy as np

from toolkit.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md")
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
PIECE_CHARS = 1 << 14  # text per piece; the 16 pieces of one tokenizer call run in parallel (~60k tokens a call)
ROWS_PER_CALL = 1024


# --------------------------------------------------------------------------------------------------


def _safe_cut(text: str, lo: int, hi: int) -> int:
    """A cut position in text[lo:hi] that GPT-2's pre-tokenizer also splits at, so tokenizing the two sides
    apart gives the same tokens as tokenizing them together: after a single newline between non-space
    characters, else before ' word' that follows a non-space character; hi when there is none."""
    i = text.rfind("\n", lo + 1, hi - 1)
    while i > lo:
        if not text[i + 1].isspace() and not text[i - 1].isspace():
            return i + 1
        i = text.rfind("\n", lo + 1, i)
    i = text.rfind(" ", lo + 1, hi - 1)
    while i > lo:
        if text[i + 1].isalpha() and not text[i - 1].isspace():
            return i
        i = text.rfind(" ", lo + 1, i)
    return hi


def _text_file_pieces(path: str, piece_chars: int = PIECE_CHARS) -> Iterator[tuple[list[str], list[bool], float]]:
    size = max(os.path.getsize(path), 1)
    read = 0
    carry = ""
    with open(path, encoding="utf-8") as f:  # text mode: universal newlines, as pretrain.py's loader reads .txt
        while True:
            block = f.read(16 * piece_chars)
            read += len(block)
            final = not block
            text, pieces, pos = carry + block, [], 0
            # Cut pieces at safe places while more than a piece is left; the rest waits for the next block.
            while len(text) - pos > piece_chars or (final and pos < len(text)):
                hi = min(pos + piece_chars, len(text))
                cut = hi if hi == len(text) else _safe_cut(text, pos, hi)
                pieces.append(text[pos:cut])
                pos = cut
            carry = text[pos:]
            if final:
                if pieces:
                    yield pieces, [False] * (len(pieces) - 1) + [True], 1.0
                return
            if pieces:
                yield pieces, [False] * len(pieces), min(read / size, 1.0)


def _table_pieces(rows, column: str, source: str) -> Iterator[tuple[list[str], list[bool], float]]:
    if column not in rows.column_names:
        raise UserError(f"'{source}' has no '{column}' column (columns: {rows.column_names}); pass --text_column NAME")
    n = len(rows)
    for start in range(0, n, ROWS_PER_CALL):
        texts = [t or "" for t in rows[start:start + ROWS_PER_CALL][column]]
        yield texts, [True] * len(texts), min((start + len(texts)) / n, 1.0)


def expand_paths(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f))
            found = [f for f in found if f.lower().endswith(TEXT_SUFFIXES + tuple(TABLE_BUILDERS))]
            if not found:
                raise UserError(f"folder '{path}' has no text files; put .txt/.jsonl/.parquet/.csv files in it")
            files += found
        elif os.path.isfile(path):
            ext = os.path.splitext(path)[1].lower()
            if ext not in TEXT_SUFFIXES and ext not in TABLE_BUILDERS:
                raise UserError(f"unsupported file type '{ext}' ('{path}'); "
                                "use .txt, .md, .json, .jsonl, .parquet or .csv")
            if os.path.getsize(path) == 0:
                raise UserError(f"text file '{path}' is empty; pass a file with text to evaluate")
            files.append(path)
        else:
            raise UserError(f"text file '{path}' does not exist; check the path")
    return files


def file_pieces(files: list[str], text_column: str = "text"):
    """All files in order, as pretrain.py reads them: a text file is one document, a table row is one."""
    for k, path in enumerate(files):
        ext = os.path.splitext(path)[1].lower()
        if ext in TEXT_SUFFIXES:
            pieces = _text_file_pieces(path)
        else:
            import datasets

            try:
                rows = datasets.load_dataset(TABLE_BUILDERS[ext], data_files=[path], split="train")
            except Exception as err:  # noqa: BLE001 - datasets raises many types for a malformed file
                raise UserError(f"could not read '{path}' as {TABLE_BUILDERS[ext]} ({type(err).__name__}); "
                                "check the file's format") from None
            pieces = _table_pieces(rows, text_column, path)
        try:
            for texts, ends, fraction in pieces:
                yield texts, ends, (k + fraction) / len(files)
        except UnicodeDecodeError:
            raise UserError(f"'{path}' is not UTF-8 text; convert it (e.g. iconv -t utf-8) and retry") from None


def dataset_pieces(name: str, config: str | None, split: str | None, text_column: str, token: str | None = None):
    import datasets

    try:
        splits = datasets.load_dataset(name, config, token=token)
    except Exception as err:  # noqa: BLE001 - the Hub client raises many types; the user needs the name
        raise UserError(f"could not load dataset '{name}' "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
                        "check the name and --dataset_config_name, or use --text_file") from None
    if split is None:
        split = next((s for s in ("validation", "valid", "test") if s in splits), None)
        if split is None:
            raise UserError(f"dataset '{name}' has no validation or test split (it has {list(splits)}); "
                            "pass --dataset_split")
    if split not in splits:
        raise UserError(f"dataset '{name}' has no '{split}' split (it has {list(splits)}); pass --dataset_split")
    print(f"evaluating split '{split}' of {name} ({len(splits[split]):,} rows)", file=sys.stderr)
    yield from _table_pieces(splits[split], text_column, name)


def tokenize_pieces(pieces, tokenizer) -> Iterator[tuple[np.ndarray, float]]:
    """Token ids of each group of pieces, EOS after each document's last piece (as pretrain.py packs documents)."""
    eos = tokenizer.eos_token_id
    for texts, ends, fraction in pieces:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        parts = [np.asarray(x + [eos] if end else x, dtype=np.int64) for x, end in zip(ids, ends)]
        yield np.concatenate(parts) if parts else np.zeros(0, np.int64), fraction


def prefetch(iterable: Iterable, depth: int = 4) -> Iterator:
    """Run `iterable` on a background thread (the tokenizer releases the GIL) while the model scores. The thread
    ends when the consumer stops early (--max_tokens) too."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(item):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread, raised there
            put(err)
        put(done)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
