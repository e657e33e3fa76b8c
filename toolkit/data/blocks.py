"""Training blocks for recipes/pretrain.py: a token store's split by block index, or a stream packed on the fly.

Blocks: block i = tokens [i*B, (i+1)*B) of the training stream (EOS after every document, documents packed
across block and shard boundaries; the remainder shorter than a block is unused). A map-style Dataset, so the
HF Trainer's seeded sampler and accelerate give the same order and exact resume on 1 process, DDP, FSDP2 and
several nodes. Why packing is hand-written: run_clm.py's group_texts concatenates without EOS between documents
(transformers#23198) and drops a remainder per map batch.
"""

from __future__ import annotations

import numpy as np
import torch

from toolkit.data.corpus import Corpus, pack_documents
from toolkit.data.files import null_rows_message
from toolkit.data.store import TokenStore, TokenStream
from toolkit.errors import UserError


class BlockDataset(torch.utils.data.Dataset):
    """Blocks of a store's split as {'input_ids', 'labels'} (labels = input_ids; the model shifts them).

    Holds paths, not data: DataLoader workers and every rank map the shards themselves (shared page cache)."""

    def __init__(self, stream: TokenStream, block_size: int):
        self.stream, self.block_size = stream, block_size

    def __len__(self) -> int:
        return self.stream.n_tokens // self.block_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids = torch.from_numpy(self.stream.read(i * self.block_size, (i + 1) * self.block_size))
        return {"input_ids": ids, "labels": ids}


def block_datasets(store: TokenStore, block_size: int, min_train_blocks: int) -> tuple[BlockDataset, BlockDataset]:
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

    def __init__(self, stream, tokenizer, block_size: int, text_column: str = "text", skip: int = 0,
                 take: int | None = None, rows_per_batch: int = 256):
        self.stream, self.tokenizer, self.block_size = stream, tokenizer, block_size
        self.text_column, self.skip, self.take, self.rows_per_batch = text_column, skip, take, rows_per_batch

    def __iter__(self):
        buffer = np.zeros(0, dtype=np.int64)
        index = produced = 0
        for batch in self.stream.iter(batch_size=self.rows_per_batch):
            texts = batch[self.text_column]
            if any(t is None for t in texts):
                raise UserError(null_rows_message("the streamed dataset", self.text_column))
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # one Rust batch call
            buffer = np.concatenate([buffer, pack_documents(ids, self.tokenizer.eos_token_id)[0]])
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


def streaming_datasets(data_args, tokenizer) -> tuple[StreamingBlocks, StreamingBlocks]:
    """(train, eval) IterableDatasets from a streaming dataset; eval = the first blocks of the stream."""
    stream = Corpus.from_dataset(data_args.dataset_name, data_args.dataset_config_name, "train",
                                 data_args.text_column, streaming=True).dataset()
    n_eval = data_args.streaming_eval_blocks
    args = (stream, tokenizer, data_args.block_size, data_args.text_column)
    return StreamingBlocks(*args, skip=n_eval), StreamingBlocks(*args, take=n_eval)
