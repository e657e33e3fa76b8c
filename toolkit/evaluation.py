"""Loss, perplexity and bits per byte of a model on a token stream, in windows: `toolkit eval`'s scoring (the
command is toolkit/commands/eval.py).

How text is read, windowed and scored, and what it costs: the docstring of toolkit/commands/eval.py (also its
--help).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from toolkit.errors import UserError


@dataclass
class TextScore:
    source: str
    tokens: int  # scored (target) tokens
    bytes: int  # UTF-8 bytes of the scored tokens
    loss: float  # mean nats per scored token
    perplexity: float
    bits_per_byte: float
    block_size: int
    stride: int
    windows: int


# --------------------------------------------------------------------------------------------------
# Windows and scoring
# --------------------------------------------------------------------------------------------------


def windows(chunks: Iterable[np.ndarray], block_size: int, stride: int) -> Iterator[tuple[np.ndarray, int]]:
    """(window ids, index of its first scored position) over a token stream given in chunks.

    Window k covers [k*stride, k*stride + block_size) (the last one ends with the stream) and scores the
    positions no earlier window scored; position 0 of the stream has no context and is never scored.
    """
    buf = np.zeros(0, np.int64)
    buf_start = begin = prev_end = 0  # absolute positions in the stream
    for chunk in chunks:
        buf = np.concatenate([buf, np.asarray(chunk, dtype=np.int64)])
        while buf_start + len(buf) >= begin + block_size:
            lo = begin - buf_start
            first = max(prev_end, begin + 1) - begin
            yield buf[lo:lo + block_size].copy(), first
            prev_end = begin + block_size
            begin += stride
            buf, buf_start = buf[begin - buf_start:], begin
    end = buf_start + len(buf)
    first = max(prev_end, begin + 1) - begin
    if end - begin > first:
        yield buf[begin - buf_start:].copy(), first


def _score_batch(model, batch: list[tuple[np.ndarray, int]], device):
    """Sum of target NLLs (nats, a 0-d float64 tensor left on the device) for windows of one length."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.stack([w for w, _ in batch])).to(device)
    lo = min(first for _, first in batch)
    keep = torch.arange(lo - 1, x.shape[1] - 1, device=device)  # logits only where a target is scored
    logits = model(input_ids=x, logits_to_keep=keep).logits
    targets = x[:, lo:].clone()
    for row, (_, first) in enumerate(batch):
        targets[row, : first - lo] = -100
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return nll.double()


def score_token_chunks(model, chunks: Iterable, byte_counter, block_size: int, stride: int | None = None,
                       batch_size: int = 8, progress: bool = True, source: str = "tokens") -> TextScore:
    """Score a token stream. `chunks` yields token id arrays, or (ids, fraction of the source read) pairs for
    the progress bar's estimate. This is the entry point for text already tokenized (e.g. a token store)."""
    import torch
    from tqdm.auto import tqdm

    stride = stride or block_size
    device = next(model.parameters()).device
    state = {"fraction": 0.0, "read": 0}

    def ids_only():
        for item in chunks:
            ids, fraction = item if isinstance(item, tuple) else (item, None)
            state["read"] += len(ids)
            state["fraction"] = fraction
            yield ids

    bar = tqdm(total=None, unit="tok", unit_scale=True, desc="scoring", disable=not progress, file=sys.stderr)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = n_bytes = n_windows = 0
    pending: list[tuple[np.ndarray, int]] = []

    def run(batch):
        nonlocal nll, n_tokens, n_bytes, n_windows
        nll += _score_batch(model, batch, device)
        scored = sum(len(w) - first for w, first in batch)
        n_tokens += scored
        n_bytes += sum(byte_counter.count(w[first:]) for w, first in batch)
        n_windows += len(batch)
        if state["fraction"]:
            bar.total = max(int(state["read"] / state["fraction"]), bar.n + scored)
        bar.update(scored)

    with torch.inference_mode():
        for window, first in windows(ids_only(), block_size, stride):
            if len(window) < block_size:  # the stream's last, shorter window: a batch of its own
                if pending:
                    run(pending)
                    pending = []
                run([(window, first)])
                continue
            pending.append((window, first))
            if len(pending) == batch_size:
                run(pending)
                pending = []
        if pending:
            run(pending)
    bar.close()
    if n_tokens == 0:
        raise UserError(f"{source} has fewer than 2 tokens: nothing to score; pass a longer text")
    from toolkit.lm_metrics import bits_per_byte, perplexity

    total = nll.item()
    mean = total / n_tokens
    return TextScore(source, n_tokens, n_bytes, mean, perplexity(mean), bits_per_byte(total, n_bytes), block_size,
                     stride, n_windows)


def _limit_tokens(chunks, max_tokens: int | None):
    if max_tokens is None:
        yield from chunks
        return
    left = max_tokens
    for ids, _fraction in chunks:
        ids = ids[:left]
        left -= len(ids)
        yield ids, (max_tokens - left) / max_tokens
        if left <= 0:
            return


def text_corpora(args) -> list:
    """The --text_file paths as corpora (toolkit/data/corpus.py, as recipes/pretrain.py reads its data); a missing,
    empty or unsupported file fails here, before the model loads."""
    from toolkit.data.corpus import Corpus

    return [Corpus.from_files(path, args.text_column) for path in args.text_file]


def dataset_corpus(args):
    """--dataset_name's split to score (default: validation, else valid, else test)."""
    from toolkit.data.corpus import VALIDATION_SPLITS, Corpus, dataset_split_names

    name, split = args.dataset_name, args.dataset_split
    names = dataset_split_names(name, args.dataset_config_name, args.token)
    if names is None:
        raise UserError(f"could not load dataset '{name}'; check the name and --dataset_config_name, or use "
                        "--text_file")
    if split is None:
        split = next((s for s in VALIDATION_SPLITS if s in names), None)
        if split is None:
            raise UserError(f"dataset '{name}' has no validation or test split (it has {names}); pass --dataset_split")
    if split not in names:
        raise UserError(f"dataset '{name}' has no '{split}' split (it has {names}); pass --dataset_split")
    corpus = Corpus.from_dataset(name, args.dataset_config_name, split, args.text_column, streaming=False,
                                 token=args.token)
    print(f"evaluating split '{split}' of {name} ({int(corpus.progress_total()[0]):,} rows)", file=sys.stderr)
    return corpus


def text_pieces(corpora_of):
    """(texts, which text ends a document, fraction read) over the corpora in order; `corpora_of()` runs on the
    reading thread, so a dataset loads while the model does."""
    corpora = corpora_of()
    for k, corpus in enumerate(corpora):
        for texts, ends, fraction in corpus.pieces():
            yield texts, ends, (k + fraction) / len(corpora)


def tokenize_pieces(pieces, tokenizer) -> Iterator[tuple[np.ndarray, float]]:
    """Token ids of each group of pieces, packed as every corpus is (toolkit/data/corpus.pack_documents)."""
    from toolkit.data.corpus import pack_documents

    for texts, ends, fraction in pieces:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        yield pack_documents(ids, tokenizer.eos_token_id, ends=ends)[0], fraction


def prefetch(iterable: Iterable, depth: int = 4) -> Iterator:
    """Run `iterable` on a background thread (the tokenizer releases the GIL) while the model scores. The thread
    ends when the consumer stops early (--max_tokens) too."""
    import queue
    import threading

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


def evaluate_text(loaded, args) -> TextScore:
    from toolkit.lm_metrics import ByteCounter

    if args.text_file:
        pieces, source = text_pieces(lambda: text_corpora(args)), ", ".join(args.text_file)
    else:
        pieces, source = text_pieces(lambda: [dataset_corpus(args)]), args.dataset_name
    chunks = _limit_tokens(prefetch(tokenize_pieces(pieces, loaded.tokenizer)), args.max_tokens)
    return score_token_chunks(loaded.model, chunks, ByteCounter(loaded.tokenizer), args.block_size, args.stride,
                              args.batch_size, progress=not args.no_progress, source=f"'{source}'")
