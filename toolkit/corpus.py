"""Documents of a training corpus, read in batches in a fixed order, never whole.

Sources: local files or folders (.txt/.text/.md: one document per file; .jsonl/.json/.parquet/.csv: one
document per row, column --text_column), a datasets dataset (a Hub name or a local dataset folder, streamed
or from the local datasets cache), or the embedded default corpus (the Python documentation topics that ship
with every Python, so the default job needs no download).

Why not `datasets.load_dataset` for local files: it converts the whole corpus to Arrow files in its cache
before the first row is read (a 0.5 GB jsonl left 1.7 GB of them); pyarrow's streaming readers give the same
rows in bounded memory and no intermediate files. Parquet is skipped by its metadata when a run resumes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from toolkit.errors import UserError
from toolkit.sources import FILE_BUILDERS as FILE_TYPES  # extension -> reader, one table for every data path

READ_BLOCK_BYTES = 32 << 20  # pyarrow's CSV reader block
JSON_LINES_BYTES = 8 << 20  # whole lines of a jsonl file parsed at a time (a longer line is read whole)
PARQUET_BATCH_ROWS = 1024


def embedded_documents() -> list[str]:
    """The default corpus: one document per Python documentation topic, in sorted order (~465k chars)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[key] for key in sorted(topics)]


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
    if len(types) > 1:
        raise UserError(f"'{path}' mixes file types {sorted(extensions)}; use one type per source")
    for f in files:
        if not os.access(f, os.R_OK):
            raise UserError(f"data file '{f}' is not readable; fix its permissions")
        if os.path.getsize(f) == 0:
            raise UserError(f"data file '{f}' is empty; point the source at a file with text")
    return types.pop(), files


@dataclass
class Batch:
    texts: list[str]
    position: float  # progress through the source when this batch was read (bytes of files, or documents)


@dataclass
class Corpus:
    """A source of documents in a fixed order. Build with `Corpus.from_files/from_dataset/embedded`."""

    kind: str  # "files", "dataset" or "embedded"
    text_column: str = "text"
    file_type: str | None = None
    files: list[str] = field(default_factory=list)
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    split: str = "train"
    streaming: bool = True

    @classmethod
    def from_files(cls, path: str, text_column: str = "text") -> Corpus:
        file_type, files = data_files(path)
        return cls("files", text_column, file_type, files)

    @classmethod
    def from_dataset(
        cls,
        name: str,
        config: str | None = None,
        split: str = "train",
        text_column: str = "text",
        streaming: bool = True,
    ) -> Corpus:
        return cls(
            "dataset", text_column, dataset_name=name, dataset_config_name=config, split=split, streaming=streaming
        )

    @classmethod
    def embedded(cls) -> Corpus:
        return cls("embedded")

    def describe(self) -> dict:
        """What the source is, for a store's manifest (paths as given by the user)."""
        if self.kind == "files":
            return {
                "files": self.files,
                "type": self.file_type,
                "text_column": self.text_column,
                "bytes": sum(os.path.getsize(f) for f in self.files),
            }
        if self.kind == "dataset":
            return {
                "dataset": self.dataset_name,
                "config": self.dataset_config_name,
                "split": self.split,
                "text_column": self.text_column,
                "streaming": self.streaming,
            }
        return {"embedded": "pydoc_data.topics"}

    def fingerprint(self) -> str:
        """Changes when the documents may have changed: files' sizes and times, a dataset's name and split."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        if self.kind == "files":
            for f in self.files:
                st = os.stat(f)
                h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
        elif self.kind == "embedded":
            for text in embedded_documents():
                h.update(text.encode("utf-8", "surrogatepass"))
        elif not self.streaming:
            h.update(str(getattr(self._load_dataset(), "_fingerprint", "")).encode())
        return h.hexdigest()[:24]

    def progress_total(self) -> tuple[float | None, str]:
        """(total, unit) of `Batch.position`: file bytes, or documents when a dataset says how many it has."""
        if self.kind == "files":
            return float(sum(os.path.getsize(f) for f in self.files)), "B"
        if self.kind == "embedded":
            return float(len(embedded_documents())), "doc"
        ds = self._load_dataset()
        if not self.streaming:
            return float(len(ds)), "doc"
        splits = getattr(ds.info, "splits", None) or {}
        split = splits.get(self.split) if hasattr(splits, "get") else None
        return (float(split.num_examples) if split is not None and split.num_examples else None), "doc"

    def source_bytes(self) -> int | None:
        return sum(os.path.getsize(f) for f in self.files) if self.kind == "files" else None

    def texts(self) -> Iterator[str]:
        """Every document in order (for training a tokenizer on the corpus)."""
        for batch in self.batches():
            yield from batch.texts

    def batches(self, start_document: int = 0, batch_chars: int = 1 << 20) -> Iterator[Batch]:
        """Documents start_document, start_document+1, ... in batches of about batch_chars characters."""
        texts: list[str] = []
        size = 0
        position = before = 0.0
        for chunk, after in self._chunks(start_document):
            for i, text in enumerate(chunk):
                texts.append(text)
                size += len(text)
                position = before + (after - before) * (i + 1) / len(chunk)  # readers read ahead in blocks
                if size >= batch_chars:
                    yield Batch(texts, position)
                    texts, size = [], 0
            before = after
        if texts:
            yield Batch(texts, position)

    # ---- readers: each yields (list of texts, position) and skips `skip` documents first ----

    def _chunks(self, skip: int) -> Iterator[tuple[list[str], float]]:
        if self.kind == "embedded":
            docs = embedded_documents()
            yield docs[skip:], float(len(docs))
        elif self.kind == "dataset":
            yield from self._dataset_chunks(skip)
        else:
            done = 0.0
            for path in self.files:
                size = os.path.getsize(path)
                if skip and self.file_type in ("text", "parquet"):
                    rows = 1 if self.file_type == "text" else _parquet_rows(path)
                    if rows <= skip:  # the whole file was done before: skip it without reading it
                        skip -= rows
                        done += size
                        continue
                reader = {
                    "text": _text_file,
                    "json": self._json_file,
                    "csv": self._csv_file,
                    "parquet": self._parquet_file,
                }
                for texts, fraction in reader[self.file_type](path):
                    if skip:
                        dropped = min(skip, len(texts))
                        texts, skip = texts[dropped:], skip - dropped
                    if texts:
                        yield texts, done + fraction * size
                done += size

    def _json_file(self, path: str):
        import pyarrow as pa
        import pyarrow.json as pj

        with open(path, "rb") as f:
            head = f.read(1 << 16).lstrip()
            if head.startswith(b"["):  # a JSON array: no streaming reader exists for it, so it is read whole
                f.seek(0)
                try:
                    rows = json.load(f)
                except (ValueError, UnicodeDecodeError) as err:
                    raise UserError(
                        f"could not read '{path}' as JSON ({str(err)[:200]}); check the file's format"
                    ) from None
                yield [self._row_text(row, path) for row in rows], 1.0
                return
            first = head.split(b"\n", 1)[0]
            f.seek(0)
            size = max(1, os.path.getsize(path))
            schema = pa.schema([(self.text_column, pa.string())])
            options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
            # Whole lines, JSON_LINES_BYTES at a time, each piece parsed by pyarrow on its own: pyarrow's streaming
            # reader (open_json) read ahead of a slow consumer and held ~1.5x the file (measured: 152 MiB for a
            # 100 MB file), so memory grew with the corpus.
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
                        texts = self._column(table.column(0), path, first)
                        del table, data
                        yield texts, min(1.0, f.tell() / size)
                    if not block:
                        break
            except pa.ArrowException as err:
                raise UserError(
                    f"could not read '{path}' as JSON lines ({str(err).splitlines()[0][:200]}); "
                    "write one JSON object per line"
                ) from None

    def _csv_file(self, path: str):
        import csv

        import pyarrow as pa
        import pyarrow.csv as pc

        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), [])
        if self.text_column not in header:
            raise UserError(
                f"'{path}' has no '{self.text_column}' column (columns: {header[:20]}); pass --text_column NAME"
            )
        size = max(1, os.path.getsize(path))
        with open(path, "rb") as f:
            try:
                reader = pc.open_csv(
                    f,
                    read_options=pc.ReadOptions(block_size=READ_BLOCK_BYTES),
                    parse_options=pc.ParseOptions(newlines_in_values=True),
                    convert_options=pc.ConvertOptions(
                        include_columns=[self.text_column], column_types={self.text_column: pa.string()}
                    ),
                )
                for record_batch in reader:
                    yield self._column(record_batch.column(0), path, b""), min(1.0, f.tell() / size)
            except pa.ArrowException as err:
                raise UserError(
                    f"could not read '{path}' as CSV ({str(err).splitlines()[0][:200]}); check the file's format"
                ) from None

    def _parquet_file(self, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            if self.text_column not in pf.schema_arrow.names:
                raise UserError(
                    f"'{path}' has no '{self.text_column}' column (columns: {pf.schema_arrow.names[:20]}); "
                    "pass --text_column NAME"
                )
            rows, done = max(1, pf.metadata.num_rows), 0
            for record_batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[self.text_column]):
                done += record_batch.num_rows
                yield self._column(record_batch.column(0), path, b""), done / rows
        except pa.ArrowException as err:
            raise UserError(
                f"could not read '{path}' as parquet ({str(err).splitlines()[0][:200]}); check the file"
            ) from None

    def _column(self, column, path: str, first_line: bytes) -> list[str]:
        if column.null_count:
            if column.null_count == len(column):
                keys = ""
                try:
                    keys = f" (keys of the first row: {sorted(json.loads(first_line))[:20]})" if first_line else ""
                except ValueError:
                    pass
                raise UserError(f"'{path}' has no '{self.text_column}' field{keys}; pass --text_column NAME")
            raise UserError(
                f"'{path}' has rows whose '{self.text_column}' is empty (null); remove them or fill them with text"
            )
        return column.to_pylist()

    def _row_text(self, row, path: str) -> str:
        if not isinstance(row, dict) or not isinstance(row.get(self.text_column), str):
            keys = sorted(row)[:20] if isinstance(row, dict) else type(row).__name__
            raise UserError(
                f"'{path}' has a row without a '{self.text_column}' string ({keys}); pass --text_column NAME"
            )
        return row[self.text_column]

    def _load_dataset(self):
        import datasets

        if getattr(self, "_dataset", None) is None:
            try:
                ds = datasets.load_dataset(
                    self.dataset_name, self.dataset_config_name, split=self.split, streaming=self.streaming
                )
            except Exception as err:  # noqa: BLE001 - the Hub client raises many types; the user needs the name and the fix
                message = str(err).splitlines()[0][:200] if str(err) else ""
                raise UserError(
                    f"could not load dataset '{self.dataset_name}' split '{self.split}' ({type(err).__name__}: "
                    f"{message}); check the name, the split and your connection, or use local files"
                ) from None
            columns = ds.column_names or list((ds.features or {}).keys())
            if columns and self.text_column not in columns:
                raise UserError(
                    f"dataset '{self.dataset_name}' has no '{self.text_column}' column (columns: {columns[:20]}); "
                    "pass --text_column NAME"
                )
            self._dataset = ds.select_columns([self.text_column])
        return self._dataset

    def _dataset_chunks(self, skip: int):
        ds = self._load_dataset()
        if skip:  # a stream is re-read (not re-tokenized) up to where the last run stopped
            ds = ds.skip(skip) if self.streaming else ds.select(range(skip, len(ds)))
        done = float(skip)
        for batch in ds.iter(batch_size=1000):
            texts = batch[self.text_column]
            if any(t is None for t in texts):
                raise UserError(f"dataset '{self.dataset_name}' has rows whose '{self.text_column}' is empty (null)")
            done += len(texts)
            yield texts, done


def _text_file(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            yield [f.read()], 1.0
    except UnicodeDecodeError as err:
        raise UserError(
            f"could not read '{path}' as UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8"
        ) from None


def _parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def dataset_validation_split(name: str, config: str | None) -> str | None:
    """The dataset's held-out split name (validation, valid or test), or None."""
    import datasets

    try:
        names = datasets.get_dataset_split_names(name, config)
    except Exception:  # noqa: BLE001 - no split information offline or for some builders: fall back to holding out documents
        return None
    return next((s for s in ("validation", "valid", "test") if s in names), None)
