"""Data files: the one file-type table, listing a file or folder, and one reader per file type.

    .txt .text .md          one document per file (read whole, or in pieces for `toolkit eval`)
    .jsonl .json            one document per row (JSON lines, or a JSON array of objects), field --text_column
    .parquet .csv           one document per row, column --text_column

The null rule (every reader, and the datasets reader in toolkit/data/corpus.py): a row whose text is null is
refused with a one-line error naming the file; a missing column names the columns there are. An empty string
is a document (EOS alone).

Why not `datasets.load_dataset` for local files: it converts the whole corpus to Arrow files in its cache
before the first row is read; pyarrow's streaming readers give the same rows in bounded memory and no
intermediate files. Parquet is skipped by its metadata when a run resumes.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

from toolkit.errors import UserError

# File extension -> file type; the types are also the names of the `datasets` builders that read them.
FILE_TYPES = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
              ".parquet": "parquet", ".csv": "csv"}
READ_BLOCK_BYTES = 32 << 20  # pyarrow's CSV reader block
JSON_LINES_BYTES = 8 << 20  # whole lines of a jsonl file parsed at a time (a longer line is read whole)
PARQUET_BATCH_ROWS = 1024
PIECE_CHARS = 1 << 14  # text per piece of a long text file; a tokenizer call takes 16 pieces, run in parallel


def data_files(path: str) -> tuple[str, list[str]]:
    """(file type, files in sorted order) for a file or folder; clear errors for the usual mistakes."""
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f))
        files = [f for f in files if os.path.splitext(f)[1].lower() in FILE_TYPES]
        if not files:
            raise UserError(f"folder '{path}' has no data files; put .txt/.json/.jsonl/.parquet/.csv files in it")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UserError(
            f"data file '{path}' does not exist; check the path (relative paths are from the current directory)"
        )
    extensions = {os.path.splitext(f)[1].lower() for f in files}
    types = {FILE_TYPES.get(ext) for ext in extensions}
    if None in types:
        raise UserError(
            f"unsupported data file type {sorted(extensions)} in '{path}'; use .txt, .json, .jsonl, .parquet or .csv"
        )
    if len(types) > 1:  # a README.md beside the .jsonl files would become a document
        raise UserError(f"'{path}' mixes file types {sorted(extensions)}; use one type per source")
    for f in files:
        if not os.access(f, os.R_OK):
            raise UserError(f"data file '{f}' is not readable; fix its permissions")
        if os.path.getsize(f) == 0:
            raise UserError(f"data file '{f}' is empty; pass a file with text")
    return types.pop(), files


def read_file(file_type: str, path: str, text_column: str) -> Iterator[tuple[list[str], float]]:
    """(documents, fraction of the file read) in order."""
    if file_type == "text":
        return _text_file(path)
    return {"json": _json_file, "csv": _csv_file, "parquet": _parquet_file}[file_type](path, text_column)


def column_texts(column, source: str, text_column: str, first_line: bytes = b"") -> list[str]:
    """An Arrow column's strings, under the null rule."""
    if column.null_count:
        if column.null_count == len(column):
            keys = ""
            try:
                keys = f" (keys of the first row: {sorted(json.loads(first_line))[:20]})" if first_line else ""
            except ValueError:
                pass
            raise UserError(f"'{source}' has no '{text_column}' field{keys}; pass --text_column NAME")
        raise UserError(null_rows_message(f"'{source}'", text_column))
    return column.to_pylist()


def null_rows_message(source: str, text_column: str) -> str:
    """The null rule's error; `source` as it reads in the sentence: "'x.jsonl'", "dataset 'name'"."""
    return f"{source} has rows whose '{text_column}' is empty (null); remove them or fill them with text"


def _text_file(path: str):
    with _utf8(path), open(path, encoding="utf-8") as f:
        text = f.read()
    yield [text], 1.0


@contextmanager
def _utf8(path: str):
    """A UnicodeDecodeError while reading `path` as the one-line error that names the file and the fix."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise UserError(f"could not read '{path}' as UTF-8 text ({err.reason} at byte {err.start}); "
                        "convert it to UTF-8") from None


def text_file_pieces(path: str, piece_chars: int = PIECE_CHARS) -> Iterator[tuple[list[str], list[bool], float]]:
    """A text file (one document) in pieces of about piece_chars characters: (pieces, which piece ends the
    document, fraction of the file read). The cuts are where GPT-2's pre-tokenizer splits anyway (`safe_cut`), so
    the pieces' tokens are those of the whole text, and memory does not grow with the file."""
    size = max(os.path.getsize(path), 1)
    read = 0
    carry = ""
    with _utf8(path), open(path, encoding="utf-8") as f:  # text mode: universal newlines, as _text_file reads
        while True:
            block = f.read(16 * piece_chars)
            read += len(block)
            final = not block
            text, pieces, pos = carry + block, [], 0
            # Cut pieces at safe places while more than a piece is left; the rest waits for the next block.
            while len(text) - pos > piece_chars or (final and pos < len(text)):
                hi = min(pos + piece_chars, len(text))
                cut = hi if hi == len(text) else safe_cut(text, pos, hi)
                pieces.append(text[pos:cut])
                pos = cut
            carry = text[pos:]
            if final:
                if pieces:
                    yield pieces, [False] * (len(pieces) - 1) + [True], 1.0
                return
            if pieces:
                yield pieces, [False] * len(pieces), min(read / size, 1.0)


def safe_cut(text: str, lo: int, hi: int) -> int:
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


def _json_file(path: str, text_column: str):
    import pyarrow as pa
    import pyarrow.json as pj

    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
        if head.startswith(b"["):  # a JSON array: no streaming reader exists for it, so it is read whole
            f.seek(0)
            try:
                rows = json.load(f)
            except (ValueError, UnicodeDecodeError) as err:
                message = f"could not read '{path}' as JSON ({str(err)[:200]}); check the file's format"
                raise UserError(message) from None
            yield [_row_text(row, path, text_column) for row in rows], 1.0
            return
        first = head.split(b"\n", 1)[0]
        f.seek(0)
        size = max(1, os.path.getsize(path))
        schema = pa.schema([(text_column, pa.string())])
        options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        # Whole lines, JSON_LINES_BYTES at a time, each piece parsed by pyarrow on its own: pyarrow's streaming
        # reader (open_json) reads ahead of a slow consumer, so its memory would grow with the file.
        tail = b""
        try:
            while True:
                block = f.read(JSON_LINES_BYTES)
                data = tail + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                if block and cut == 0:  # a line longer than the block so far: read on
                    tail = data
                    continue
                data, tail = data[:cut], data[cut:]
                if data.strip():  # one parser block for the whole piece: no line can straddle two
                    read = pj.ReadOptions(block_size=len(data) + 1, use_threads=False)
                    table = pj.read_json(pa.BufferReader(data), read_options=read, parse_options=options)
                    texts = column_texts(table.column(0), path, text_column, first)
                    del table, data
                    yield texts, min(1.0, f.tell() / size)
                if not block:
                    break
        except pa.ArrowException as err:
            raise UserError(
                f"could not read '{path}' as JSON lines ({str(err).splitlines()[0][:200]}); "
                "write one JSON object per line"
            ) from None


def _csv_file(path: str, text_column: str):
    import csv

    import pyarrow as pa
    import pyarrow.csv as pc

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    if text_column not in header:
        raise UserError(f"'{path}' has no '{text_column}' column (columns: {header[:20]}); pass --text_column NAME")
    size = max(1, os.path.getsize(path))
    with open(path, "rb") as f:
        try:
            reader = pc.open_csv(
                f,
                read_options=pc.ReadOptions(block_size=READ_BLOCK_BYTES),
                parse_options=pc.ParseOptions(newlines_in_values=True),
                convert_options=pc.ConvertOptions(include_columns=[text_column],
                                                  column_types={text_column: pa.string()}),
            )
            for record_batch in reader:
                yield column_texts(record_batch.column(0), path, text_column), min(1.0, f.tell() / size)
        except pa.ArrowException as err:
            raise UserError(
                f"could not read '{path}' as CSV ({str(err).splitlines()[0][:200]}); check the file's format"
            ) from None


def _parquet_file(path: str, text_column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if text_column not in pf.schema_arrow.names:
            raise UserError(
                f"'{path}' has no '{text_column}' column (columns: {pf.schema_arrow.names[:20]}); "
                "pass --text_column NAME"
            )
        rows, done = max(1, pf.metadata.num_rows), 0
        for record_batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_column]):
            done += record_batch.num_rows
            yield column_texts(record_batch.column(0), path, text_column), done / rows
    except pa.ArrowException as err:
        raise UserError(
            f"could not read '{path}' as parquet ({str(err).splitlines()[0][:200]}); check the file"
        ) from None


def parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _row_text(row, path: str, text_column: str) -> str:
    if isinstance(row, dict) and row.get(text_column, "") is None:
        raise UserError(null_rows_message(f"'{path}'", text_column))
    if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
        keys = sorted(row)[:20] if isinstance(row, dict) else type(row).__name__
        raise UserError(f"'{path}' has a row without a '{text_column}' string ({keys}); pass --text_column NAME")
    return row[text_column]
