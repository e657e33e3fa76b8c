"""Training data: raw documents -> tokens with EOS between documents -> packed blocks, cached.

Sources: a Hub dataset (`datasets.load_dataset`, optionally streaming), local files or folders
(.txt = one document per file; .json/.jsonl/.parquet/.csv = one document per row), or the embedded
default corpus (the Python documentation topics that ship with every Python, so the main job needs
no download).

Why packing is hand-written: run_clm.py's group_texts concatenates without an EOS between documents
(transformers#23198) and drops a remainder per map batch; we append EOS after every document and
pack the whole stream once. The packed blocks are a fixed-shape int array, so we cache them as .npy
and memory-map them: a second run does not tokenize again, and random access costs nothing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from toolkit.errors import UserError

PACKING_VERSION = 1  # bump when the packing rules change, so old caches are not reused
FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def embedded_documents() -> list[str]:
    """The default corpus: one document per Python documentation topic, in sorted order (~465k chars)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[key] for key in sorted(topics)]


def _data_files(path: str) -> tuple[str, list[str]]:
    """(datasets builder, files) for a file or folder; clear errors for the usual mistakes."""
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f))
        files = [f for f in files if os.path.splitext(f)[1].lower() in FILE_BUILDERS]
        if not files:
            raise UserError(f"folder '{path}' has no data files; put .txt/.json/.jsonl/.parquet/.csv files in it")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UserError(f"data file '{path}' does not exist; check the path (relative paths are from the current directory)")
    extensions = {os.path.splitext(f)[1].lower() for f in files}
    builders = {FILE_BUILDERS.get(ext) for ext in extensions}
    if None in builders:
        raise UserError(f"unsupported data file type {sorted(extensions)} in '{path}'; use .txt, .json, .jsonl, .parquet or .csv")
    if len(builders) > 1:
        raise UserError(f"'{path}' mixes file types {sorted(extensions)}; use one type per --train_file/--validation_file")
    for f in files:
        if not os.access(f, os.R_OK):
            raise UserError(f"data file '{f}' is not readable; fix its permissions")
        if os.path.getsize(f) == 0:
            raise UserError(f"data file '{f}' is empty; point --train_file at a file with text")
    return builders.pop(), files


def load_documents(data_args, split: str) -> "object | None":
    """A datasets.Dataset (column 'text', one document per row) for 'train' or 'validation', or None."""
    import datasets

    if data_args.dataset_name:
        try:
            dsets = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        except Exception as err:  # the Hub client raises many types; the user needs the name and the fix
            raise UserError(f"could not load dataset '{data_args.dataset_name}' ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                            "check the name, or use --train_file for local data") from None
        if split == "validation":
            split = next((s for s in ("validation", "valid", "test") if s in dsets), None)
            if split is None:
                return None
        if split not in dsets:
            raise UserError(f"dataset '{data_args.dataset_name}' has no '{split}' split (it has {list(dsets)})")
        ds = dsets[split]
    else:
        path = data_args.train_file if split == "train" else data_args.validation_file
        if path is None:
            if split == "train":
                return datasets.Dataset.from_dict({"text": embedded_documents()})
            return None
        builder, files = _data_files(path)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files={split: files}, split=split, **kwargs)
        except Exception as err:
            raise UserError(f"could not read '{path}' as {builder} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); check the file's format") from None
    if data_args.text_column not in ds.column_names:
        raise UserError(f"the data has no '{data_args.text_column}' column (columns: {ds.column_names}); pass --text_column NAME")
    if len(ds) == 0:
        raise UserError("the data has no rows; point --train_file/--dataset_name at data with text")
    return ds.select_columns([data_args.text_column]).rename_column(data_args.text_column, "text") if data_args.text_column != "text" else ds.select_columns(["text"])


def _tokenize_stream(docs, tokenizer, num_proc: int | None) -> np.ndarray:
    """All documents' token ids in order, each followed by EOS, as one int32 array."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    tokenized = docs.map(tokenize, batched=True, remove_columns=docs.column_names, num_proc=num_proc, desc="Tokenizing")
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.int32
    return np.concatenate([np.asarray(x, dtype=dtype) for x in tokenized["ids"]]) if len(tokenized) else np.zeros(0, dtype)


def pack(stream: np.ndarray, block_size: int) -> np.ndarray:
    """Cut the token stream into [n_blocks, block_size] (the remainder shorter than a block is dropped)."""
    n_blocks = len(stream) // block_size
    return stream[: n_blocks * block_size].reshape(n_blocks, block_size)


def split_validation(blocks: np.ndarray, percentage: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the LAST blocks (contiguous, so no block in validation overlaps a training document's neighbour)."""
    n_val = max(1, int(len(blocks) * percentage / 100))
    if len(blocks) - n_val < 1:
        raise UserError(f"only {len(blocks)} block(s) of data: too little to hold out validation; add data or lower --block_size")
    return blocks[:-n_val], blocks[-n_val:]


def _fingerprint(docs, tokenizer, *extra) -> str:
    h = hashlib.sha256()
    h.update(getattr(docs, "_fingerprint", "").encode())
    if not getattr(docs, "_fingerprint", None) or docs._fingerprint.startswith("from_dict"):
        for text in docs["text"]:
            h.update(text.encode("utf-8", "surrogatepass"))
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else str(tokenizer.get_vocab()).encode())
    h.update(json.dumps([PACKING_VERSION, *extra]).encode())
    return h.hexdigest()[:20]


def _cached(path: str, build) -> np.ndarray:
    """Load path (.npy, memory-mapped) or build it and write it atomically (no half-written cache)."""
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")
    array = build()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


@dataclass
class PackedData:
    train: np.ndarray  # [n_train_blocks, block_size]
    validation: np.ndarray  # [n_val_blocks, block_size]
    cache_dir: str

    def describe(self) -> str:
        n, b = self.train.shape
        return f"{n:,} train blocks and {len(self.validation):,} validation blocks of {b} tokens ({n * b:,} training tokens)"


def packed_blocks(train_docs, val_docs, tokenizer, data_args) -> PackedData:
    """Tokenize + pack (or load from cache). Under several processes, call it inside
    `training_args.main_process_first()` so the main process builds the cache and the others read it."""
    block_size = data_args.block_size
    root = data_args.data_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "gpt2-toolkit", "packed")
    key = _fingerprint(train_docs, tokenizer, block_size, data_args.validation_split_percentage,
                       _fingerprint(val_docs, tokenizer) if val_docs is not None else None)
    cache_dir = os.path.join(root, key)
    num_proc = data_args.preprocessing_num_workers
    train_path, val_path = os.path.join(cache_dir, "train.npy"), os.path.join(cache_dir, "validation.npy")
    if val_docs is None:
        def build_both():
            blocks = pack(_tokenize_stream(train_docs, tokenizer, num_proc), block_size)
            _check_enough(blocks, block_size, "training")
            return split_validation(blocks, data_args.validation_split_percentage)

        if not (os.path.exists(train_path) and os.path.exists(val_path)):
            train, val = build_both()
            _cached(val_path, lambda: np.ascontiguousarray(val))
            _cached(train_path, lambda: np.ascontiguousarray(train))
    else:
        def build(docs, what):
            blocks = pack(_tokenize_stream(docs, tokenizer, num_proc), block_size)
            _check_enough(blocks, block_size, what)
            return blocks

        _cached(train_path, lambda: build(train_docs, "training"))
        _cached(val_path, lambda: build(val_docs, "validation"))
    return PackedData(np.load(train_path, mmap_mode="r"), np.load(val_path, mmap_mode="r"), cache_dir)


def _check_enough(blocks: np.ndarray, block_size: int, what: str) -> None:
    if len(blocks) == 0:
        raise UserError(f"the {what} data is shorter than one block of {block_size} tokens; add data or lower --block_size")


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks as {'input_ids', 'labels'} (labels = input_ids; the model shifts them)."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.blocks[i].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Blocks packed on the fly from a streaming Hub dataset; `skip`/`take` count blocks.

    datasets' IterableDataset.map cannot pack across rows with EOS between documents, so this small
    generator does it; accelerate shards it across ranks like any IterableDataset.
    """

    def __init__(self, stream, tokenizer, block_size: int, text_column: str = "text", skip: int = 0, take: int | None = None):
        self.stream, self.tokenizer, self.block_size = stream, tokenizer, block_size
        self.text_column, self.skip, self.take = text_column, skip, take

    def __iter__(self):
        buffer: list[int] = []
        index = produced = 0
        eos = self.tokenizer.eos_token_id
        for row in self.stream:
            buffer.extend(self.tokenizer(row[self.text_column], add_special_tokens=False)["input_ids"] + [eos])
            while len(buffer) >= self.block_size:
                block, buffer = buffer[: self.block_size], buffer[self.block_size:]
                index += 1
                if index <= self.skip:
                    continue
                ids = torch.tensor(block, dtype=torch.long)
                yield {"input_ids": ids, "labels": ids}
                produced += 1
                if self.take is not None and produced >= self.take:
                    return


def streaming_datasets(data_args, tokenizer):
    """(train, eval) IterableDatasets from a streaming Hub dataset; eval = the first blocks of the stream."""
    import datasets

    try:
        stream = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, split="train", streaming=True)
    except Exception as err:
        raise UserError(f"could not stream dataset '{data_args.dataset_name}' ({type(err).__name__}); check the name and your connection") from None
    n_eval = data_args.streaming_eval_blocks
    args = (stream, tokenizer, data_args.block_size, data_args.text_column)
    return StreamingBlocks(*args, skip=n_eval), StreamingBlocks(*args, take=n_eval)
