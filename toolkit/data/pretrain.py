"""The data of recipes/pretrain.py, from one entry point: `pretrain_data(...)` decides where the tokens come from
and which tokenizer reads them; `.datasets()` then serves them as blocks.

Where the tokens come from: a store made by `toolkit prepare` (--token_store, or a --train_file that is a store
folder); --streaming: a Hub dataset packed on the fly; otherwise --train_file / --dataset_name / the embedded
default corpus, prepared once into a store in a cache (~/.cache/gpt2-toolkit/stores/KEY, KEY = source +
tokenizer + validation settings), so a second run does not tokenize again.

Which tokenizer: --tokenizer_name, else the model's own (--model_name_or_path), else the one this run saved
before it was interrupted (resuming), else the store's own, else a new byte-level BPE trained on the training text.
A store refuses any tokenizer but the one that made it.

Two calls because the model's vocabulary follows the tokenizer, and the model is built (and its config checked)
before any tokenizing work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

from toolkit.data import prepare
from toolkit.data import store as ts
from toolkit.data.corpus import Corpus, dataset_validation_split
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
        name, config, column = data_args.dataset_name, data_args.dataset_config_name, data_args.text_column
        split = dataset_validation_split(name, config)
        validation = Corpus.from_dataset(name, config, split, column, streaming=False) if split else None
        return Corpus.from_dataset(name, config, "train", column, streaming=False), validation
    column = data_args.text_column
    train = Corpus.from_files(data_args.train_file, column) if data_args.train_file else Corpus.embedded()
    validation = Corpus.from_files(data_args.validation_file, column) if data_args.validation_file else None
    return train, validation


def cached_store(train: Corpus, validation: Corpus | None, tokenizer, data_args,
                 progress: bool = True) -> ts.TokenStore:
    """The store for these documents and this tokenizer, prepared into the cache the first time.

    A lock makes one process prepare it while the others wait (several ranks or launchers on one machine); an
    interrupted preparation is resumed by the next run."""
    fraction = data_args.validation_split_percentage / 100
    key = hashlib.sha256(json.dumps([
        ts.FORMAT_VERSION,
        train.fingerprint(),
        validation.fingerprint() if validation else None,
        ts.tokenizer_fingerprint(ts.backend_json(tokenizer)),
        fraction,
        data_args.validation_max_tokens,
    ]).encode()).hexdigest()[:20]
    root = os.path.expanduser(data_args.data_cache_dir or DEFAULT_CACHE)
    path = os.path.join(root, key)
    if not ts.is_complete_store(path):
        os.makedirs(root, exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not ts.is_complete_store(path):
                partial = path + ".partial"
                if os.path.isdir(partial) and not ts.is_store(partial):
                    shutil.rmtree(partial)  # stopped before its first manifest: nothing to keep
                prepare.build_store(
                    train, tokenizer, partial, validation_corpus=validation, validation_fraction=fraction,
                    validation_max_tokens=data_args.validation_max_tokens,
                    num_proc=data_args.preprocessing_num_workers,
                    command=f"recipes/pretrain.py cache of {train.describe()}", progress=progress,
                )
                os.replace(partial, path)
    return ts.TokenStore(path)


def pretrain_data(model_args, data_args, training_args, resume_from: str | None) -> PretrainData:
    """The run's data source and its tokenizer (trained and saved to the output folder when there is none)."""
    from toolkit.tokenizer import load_tokenizer, train_bpe_tokenizer

    streaming = data_args.streaming
    if streaming and not data_args.dataset_name:
        raise UserError("--streaming needs --dataset_name (a Hub dataset); local files are read directly")
    if streaming and training_args.max_steps <= 0:
        raise UserError("--streaming needs --max_steps (a stream has no length to count epochs in)")
    store_dir = None if streaming else store_path(data_args)
    store = ts.TokenStore(store_dir) if store_dir else None
    corpora = training_corpus(data_args) if not streaming and store is None else (None, None)
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source is None and resume_from and os.path.exists(os.path.join(training_args.output_dir, "tokenizer.json")):
        source = training_args.output_dir
    if source is None and store is not None:
        source = store.tokenizer_dir()
        if source is None:
            raise UserError(f"token store '{store.dir}' has no tokenizer/ folder; pass the --tokenizer_name it was "
                            "prepared with")
    if source is None:
        if streaming:
            raise UserError("--streaming needs --tokenizer_name (a BPE is trained on a full dataset, not a stream)")
        with training_args.main_process_first(desc="train tokenizer"):
            if training_args.process_index == 0:
                tokenizer = train_bpe_tokenizer(corpora[0].texts(), model_args.vocab_size)
                tokenizer.save_pretrained(training_args.output_dir)
            source = training_args.output_dir
    tokenizer = load_tokenizer(source, model_args.trust_remote_code)
    if store is not None:
        store.check_tokenizer(tokenizer, source)
    return PretrainData(tokenizer, data_args, training_args, store, *corpora)


@dataclass
class PretrainData:
    """The tokenizer now; the datasets once the model is built."""

    tokenizer: object
    data_args: object
    training_args: object
    store: ts.TokenStore | None
    train_corpus: Corpus | None
    validation_corpus: Corpus | None

    def datasets(self):
        """(train, eval, one line describing them): blocks of the token store (memory-mapped shards; --train_file and
        the default corpus are prepared into one in the cache the first time), or a stream packed on the fly."""
        from toolkit.data.blocks import block_datasets, streaming_datasets

        data_args, training_args, block_size = self.data_args, self.training_args, self.data_args.block_size
        if data_args.streaming:
            train, evaluation = streaming_datasets(data_args, self.tokenizer)
            return train, evaluation, f"streaming {data_args.dataset_name}, blocks of {block_size} tokens"
        if self.store is None:
            with training_args.main_process_first(desc="prepare token store"):
                self.store = cached_store(self.train_corpus, self.validation_corpus, self.tokenizer, data_args,
                                          progress=training_args.process_index == 0)
        global_batch = training_args.per_device_train_batch_size * training_args.world_size
        train, evaluation = block_datasets(self.store, block_size, global_batch)
        return train, evaluation, (f"{len(train):,} train and {len(evaluation):,} validation blocks of {block_size} "
                                   f"tokens from the token store {self.store.dir} ({self.store.describe()})")
