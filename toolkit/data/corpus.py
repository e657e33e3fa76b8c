"""Documents of a corpus, read in batches in a fixed order, never whole, and the one EOS packing.

Sources: local files or folders (toolkit/data/files.py: the file types, their readers and the null rule), a
datasets dataset (a Hub name or a local dataset folder, streamed or from the local datasets cache), or the
embedded default corpus (the Python documentation topics that ship with every Python, so the default job needs
no download). `toolkit prepare`, recipes/pretrain.py and `toolkit eval` all read text here.

Packing (`pack_documents`): every document is followed by EOS, documents are concatenated in order. The token
store, the streaming blocks and `toolkit eval` pack this way, so they all see the same token stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from toolkit.data import files as formats
from toolkit.errors import UserError

VALIDATION_SPLITS = ("validation", "valid", "test")  # a dataset's held-out split, by these names in this order
ROWS_PER_PIECE = 1024  # rows per group from `pieces`: one tokenizer call each, whatever the reader's block


def embedded_documents() -> list[str]:
    """The default corpus: one document per Python documentation topic, in sorted order."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[key] for key in sorted(topics)]


def pack_documents(ids: list[list[int]], eos_id: int, dtype="int64", ends=None) -> tuple[np.ndarray, np.ndarray]:
    """(the documents' ids concatenated, EOS after each, as `dtype`; tokens per document incl. its EOS).
    `ends[i]` False: piece i continues in the next piece (a long text read in pieces), no EOS after it."""
    ends = [True] * len(ids) if ends is None else ends
    lengths = np.fromiter((len(x) + bool(end) for x, end in zip(ids, ends)), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for x, end in zip(ids, ends):
        out[pos : pos + len(x)] = x
        pos += len(x)
        if end:
            out[pos] = eos_id
            pos += 1
    return out, lengths


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
    token: str | None = field(default=None, repr=False)  # Hub token for a private dataset; never shown

    @classmethod
    def from_files(cls, path: str, text_column: str = "text") -> Corpus:
        file_type, files = formats.data_files(path)
        return cls("files", text_column, file_type, files)

    @classmethod
    def from_dataset(cls, name: str, config: str | None = None, split: str = "train", text_column: str = "text",
                     streaming: bool = True, token: str | None = None) -> Corpus:
        return cls("dataset", text_column, dataset_name=name, dataset_config_name=config, split=split,
                   streaming=streaming, token=token)

    @classmethod
    def embedded(cls) -> Corpus:
        return cls("embedded")

    def describe(self) -> dict:
        """What the source is, for a store's manifest (paths as given by the user)."""
        if self.kind == "files":
            return {"files": self.files, "type": self.file_type, "text_column": self.text_column,
                    "bytes": sum(os.path.getsize(f) for f in self.files)}
        if self.kind == "dataset":
            return {"dataset": self.dataset_name, "config": self.dataset_config_name, "split": self.split,
                    "text_column": self.text_column, "streaming": self.streaming}
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
            h.update(str(getattr(self.dataset(), "_fingerprint", "")).encode())
        return h.hexdigest()[:24]

    def progress_total(self) -> tuple[float | None, str]:
        """(total, unit) of `Batch.position`: file bytes, or documents when a dataset says how many it has."""
        if self.kind == "files":
            return float(sum(os.path.getsize(f) for f in self.files)), "B"
        if self.kind == "embedded":
            return float(len(embedded_documents())), "doc"
        ds = self.dataset()
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

    def pieces(self) -> Iterator[tuple[list[str], list[bool], float]]:
        """Every document in order as (texts, which text ends its document, fraction of the source read): a text
        file in pieces (files.text_file_pieces), so memory does not grow with its length; rows whole."""
        total = self.progress_total()[0] or 0.0
        if self.kind == "files" and self.file_type == "text":
            done = 0.0
            for path in self.files:
                size = os.path.getsize(path)
                for texts, ends, fraction in formats.text_file_pieces(path):
                    yield texts, ends, (done + fraction * size) / max(total, 1.0)
                done += size
            return
        for texts, position in self._chunks(0):
            for i in range(0, len(texts), ROWS_PER_PIECE):
                rows = texts[i : i + ROWS_PER_PIECE]
                yield rows, [True] * len(rows), position / total if total else 0.0

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
                    rows = 1 if self.file_type == "text" else formats.parquet_rows(path)
                    if rows <= skip:  # the whole file was done before: skip it without reading it
                        skip -= rows
                        done += size
                        continue
                for texts, fraction in formats.read_file(self.file_type, path, self.text_column):
                    if skip:
                        dropped = min(skip, len(texts))
                        texts, skip = texts[dropped:], skip - dropped
                    if texts:
                        yield texts, done + fraction * size
                done += size

    def dataset(self):
        """The datasets Dataset (IterableDataset when streaming) of this split, its text column only; loaded once."""
        import datasets

        if getattr(self, "_dataset", None) is None:
            try:
                ds = datasets.load_dataset(self.dataset_name, self.dataset_config_name, split=self.split,
                                           streaming=self.streaming, token=self.token)
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
        ds = self.dataset()
        if skip:  # a stream is re-read (not re-tokenized) up to where the last run stopped
            ds = ds.skip(skip) if self.streaming else ds.select(range(skip, len(ds)))
        done = float(skip)
        for batch in ds.iter(batch_size=1000):
            texts = batch[self.text_column]
            if any(t is None for t in texts):
                raise UserError(formats.null_rows_message(f"dataset '{self.dataset_name}'", self.text_column))
            done += len(texts)
            yield texts, done


def dataset_split_names(name: str, config: str | None, token: str | None = None) -> list[str] | None:
    """The dataset's split names, or None when they cannot be found without loading it."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(name, config, token=token))
    except Exception:  # noqa: BLE001 - no split information offline or for some builders
        return None


def dataset_validation_split(name: str, config: str | None) -> str | None:
    """The dataset's held-out split name (validation, valid or test), or None."""
    names = dataset_split_names(name, config) or []
    return next((s for s in VALIDATION_SPLITS if s in names), None)
