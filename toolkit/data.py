"""Training data for recipes/pretrain.py: a token store served as blocks, or a stream packed on the fly.

One pipeline: a store made by `toolkit prepare` (--token_store), or, for --train_file / --dataset_name / the
embedded default corpus, the same kind of store prepared once into a cache (~/.cache/gpt2-toolkit/stores/KEY,
KEY = source + tokenizer + validation settings), so a second run does not tokenize again.

Blocks: block i = tokens [i*B, (i+1)*B) of the training stream (EOS after every document, documents packed
across block and shard boundaries; the remainder shorter than a block is unused). A map-style Dataset, so the
HF Trainer's seeded sampler and accelerate give the same order and exact resume on 1 process, DDP, FSDP2 and
several nodes. Why packing is hand-written: run_clm.py's group_texts concatenates without EOS between documents
(transformers#23198) and drops a remainder per map batch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil

import numpy as np
import torch

from toolkit import token_store as ts
from toolkit.corpus import Corpus, dataset_validation_split, embedded_documents  # noqa: F401 (re-exported)
from toolkit.errors import UserError

DEFAULT_CACHE = os.path.join("~", ".cache", "gpt2-toolkit", "stores")


def store_path(data_args) -> str | None:
    """The store to train from: --token_store, or a --train_file that is a store folder."""
    if data_args.token_store:
        if data_args.train_file or data_args.dataset_name or data_args.validation_file:
            raise UserError(
                "--token_store already holds the training and validation data; drop --train_file, "
                "--validation_file and --dataset_name (or drop --token_store)"
            )
        return data_args.token_store
    if data_args.train_file and os.path.isdir(data_args.train_file) and ts.is_store(data_args.train_file):
        if data_args.validation_file:
            raise UserError(
                f"'{data_args.train_file}' is a token store with its own validation split; drop --validation_file"
            )
        return data_args.train_file
    return None


def training_corpus(data_args) -> tuple[Corpus, Corpus | None]:
    """(training documents, separate validation documents or None) for the small-corpus path."""
    if data_args.dataset_name:
        train = Corpus.from_dataset(
            data_args.dataset_name, data_args.dataset_config_name, "train", data_args.text_column, streaming=False
        )
        split = dataset_validation_split(data_args.dataset_name, data_args.dataset_config_name)
        validation = (
            Corpus.from_dataset(
                data_args.dataset_name, data_args.dataset_config_name, split, data_args.text_column, streaming=False
            )
            if split
            else None
        )
        return train, validation
    train = (
        Corpus.from_files(data_args.train_file, data_args.text_column) if data_args.train_file else Corpus.embedded()
    )
    validation = (
        Corpus.from_files(data_args.validation_file, data_args.text_column) if data_args.validation_file else None
    )
    return train, validation


def cached_store(
    train: Corpus, validation: Corpus | None, tokenizer, data_args, progress: bool = True
) -> ts.TokenStore:
    """The store for these documents and this tokenizer, prepared into the cache the first time.

    A lock makes one process prepare it while the others wait (several ranks or launchers on one machine); an
    interrupted preparation is resumed by the next run."""
    from toolkit.prepare import build_store

    fraction = data_args.validation_split_percentage / 100
    key = hashlib.sha256(
        json.dumps(
            [
                ts.FORMAT_VERSION,
                train.fingerprint(),
                validation.fingerprint() if validation else None,
                ts.tokenizer_fingerprint(ts.backend_json(tokenizer)),
                fraction,
                data_args.validation_max_tokens,
            ]
        ).encode()
    ).hexdigest()[:20]
    root = os.path.expanduser(data_args.data_cache_dir or DEFAULT_CACHE)
    path = os.path.join(root, key)
    if not ts.is_store(path) or not ts.read_manifest(path).get("complete"):
        os.makedirs(root, exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (ts.is_store(path) and ts.read_manifest(path).get("complete")):
                partial = path + ".partial"
                if os.path.isdir(partial) and not ts.is_store(partial):
                    shutil.rmtree(partial)  # stopped before its first manifest: nothing to keep
                build_store(
                    train,
                    tokenizer,
                    partial,
                    validation_corpus=validation,
                    validation_fraction=fraction,
                    validation_max_tokens=data_args.validation_max_tokens,
                    num_proc=data_args.preprocessing_num_workers,
                    command=f"recipes/pretrain.py cache of {train.describe()}",
                    progress=progress,
                )
                os.replace(partial, path)
    return ts.TokenStore(path)


class BlockDataset(torch.utils.data.Dataset):
    """Blocks of a store's split as {'input_ids', 'labels'} (labels = input_ids; the model shifts them).

    Holds paths, not data: DataLoader workers and every rank map the shards themselves (shared page cache)."""

    def __init__(self, stream: ts.TokenStream, block_size: int):
        self.stream, self.block_size = stream, block_size

    def __len__(self) -> int:
        return self.stream.n_tokens // self.block_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids = torch.from_numpy(self.stream.read(i * self.block_size, (i + 1) * self.block_size))
        return {"input_ids": ids, "labels": ids}


def block_datasets(store: ts.TokenStore, block_size: int, min_train_blocks: int) -> tuple[BlockDataset, BlockDataset]:
    """(train, validation) datasets, with clear errors when either is shorter than needed."""
    train, validation = BlockDataset(store.train, block_size), BlockDataset(store.validation, block_size)
    if len(train) == 0:
        raise UserError(
            f"the training data ({store.train.n_tokens:,} tokens) is shorter than one block of {block_size} tokens; "
            "add data or lower --block_size"
        )
    if len(train) < min_train_blocks:
        raise UserError(
            f"the training data has {len(train)} blocks of {block_size} tokens, fewer than one batch "
            f"({min_train_blocks}); add data, or lower --block_size or --per_device_train_batch_size"
        )
    if len(validation) == 0:
        raise UserError(
            f"the validation data ({store.validation.n_tokens:,} tokens) is shorter than one block of {block_size} "
            "tokens; hold out more (--validation_split_percentage, or `toolkit prepare --validation_fraction` / "
            "--validation_file for a store) or lower --block_size"
        )
    return train, validation


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Blocks packed on the fly from a streaming dataset, one tokenizer call per batch of rows; skip/take count blocks.

    datasets' IterableDataset.map cannot pack across rows with EOS between documents, so this small generator
    does it; accelerate shards it across ranks like any IterableDataset."""

    def __init__(
        self,
        stream,
        tokenizer,
        block_size: int,
        text_column: str = "text",
        skip: int = 0,
        take: int | None = None,
        rows_per_batch: int = 256,
    ):
        self.stream, self.tokenizer, self.block_size = stream, tokenizer, block_size
        self.text_column, self.skip, self.take, self.rows_per_batch = text_column, skip, take, rows_per_batch

    def __iter__(self):
        eos = self.tokenizer.eos_token_id
        buffer = np.zeros(0, dtype=np.int64)
        index = produced = 0
        for batch in self.stream.iter(batch_size=self.rows_per_batch):
            ids = self.tokenizer(batch[self.text_column], add_special_tokens=False)["input_ids"]  # one Rust batch call
            buffer = np.concatenate([buffer, *(np.asarray(x + [eos], dtype=np.int64) for x in ids)])
            n = len(buffer) // self.block_size
            for block in buffer[: n * self.block_size].reshape(n, self.block_size):
                index += 1
                if index <= self.skip:
                    continue
                tensor = torch.from_numpy(block.copy())
                yield {"input_ids": tensor, "labels": tensor}
                produced += 1
                if self.take is not None and produced >= self.take:
                    return
            buffer = buffer[n * self.block_size :]


def streaming_datasets(data_args, tokenizer):
    """(train, eval) IterableDatasets from a streaming dataset; eval = the first blocks of the stream."""
    import datasets

    try:
        stream = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, split="train", streaming=True
        )
    except Exception as err:  # noqa: BLE001 - the Hub client raises many types; the user needs the name and the fix
        raise UserError(
            f"could not stream dataset '{data_args.dataset_name}' ({type(err).__name__}); "
            "check the name and your connection"
        ) from None
    n_eval = data_args.streaming_eval_blocks
    args = (stream, tokenizer, data_args.block_size, data_args.text_column)
    return StreamingBlocks(*args, skip=n_eval), StreamingBlocks(*args, take=n_eval)
