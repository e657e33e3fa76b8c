"""Language-model scores from a mean loss: perplexity, and bits per byte, which does not depend on the tokenizer.

Nats per token cannot be compared between runs with different tokenizers (a larger vocabulary puts more text
in each token); bits per byte can. One definition, used by `toolkit eval` and by recipes/pretrain.py:

    bits per byte = (sum of the scored tokens' negative log-likelihoods, in nats)
                    / (ln 2 x UTF-8 bytes of those tokens)

The bytes are those the scored (target) tokens decode to. A byte-level BPE (GPT-2's, and the one pretrain.py
trains) maps every token to a fixed byte string, so a table of byte lengths per token id gives the exact count
for any data source at the cost of one lookup per token; special tokens such as EOS encode no text and count
0 bytes. Other tokenizers are counted by decoding the scored ids.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

LN2 = math.log(2)


def bits_per_byte(nll_nats_sum: float, n_bytes: int) -> float:
    """Total negative log-likelihood (nats) over the scored tokens -> bits per UTF-8 byte of their text."""
    if n_bytes <= 0:
        return float("nan")
    return nll_nats_sum / (LN2 * n_bytes)


def bits_per_byte_from_mean(mean_loss: float, bytes_per_token: float) -> float:
    """The same from a mean loss (nats per scored token) and the scored tokens' bytes per token."""
    return mean_loss / (LN2 * bytes_per_token) if bytes_per_token > 0 else float("nan")


def perplexity(mean_loss: float) -> float:
    """exp(mean nats per token), capped so a diverged run prints a number instead of inf."""
    return math.exp(min(mean_loss, 50.0))


def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """UTF-8 byte length of every token id of a byte-level BPE tokenizer (special tokens 0), or None.

    In a byte-level vocabulary every byte is written as one printable character (GPT-2's bytes_to_unicode), so
    a token's byte length is the length of its vocabulary string.
    """
    from tokenizers import decoders, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    lengths = np.zeros(n, dtype=np.int64)
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            continue
        if i in added:  # a user-added token is stored as its text, not in the byte alphabet
            lengths[i] = len(added[i].encode("utf-8"))
        elif set(piece) <= alphabet:
            lengths[i] = len(piece)
        else:
            return None  # not a pure byte-level vocabulary: count by decoding
    return lengths


class ByteCounter:
    """Counts the UTF-8 bytes that token ids stand for, with `tokenizer`'s vocabulary."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lengths = token_byte_lengths(tokenizer)

    @property
    def exact(self) -> bool:
        """True for byte-level BPE (a per-token table); decoding other tokenizers may merge or drop spaces."""
        return self.lengths is not None

    def count(self, ids) -> int:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return 0
        if self.lengths is not None:
            return int(self.lengths[ids].sum())
        text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        return len(text.encode("utf-8"))


def scored_targets(example) -> np.ndarray:
    """The target ids a causal LM is scored on for one example: labels (else input_ids) shifted by one, without
    the ignored (-100) positions. This is what the Trainer's eval loss averages over."""
    labels = example.get("labels") if isinstance(example, dict) else None
    if labels is None:
        labels = example["input_ids"]
    labels = np.asarray(labels.numpy() if hasattr(labels, "numpy") else labels, dtype=np.int64).reshape(-1)
    targets = labels[1:]
    return targets[targets != -100]


def eval_bytes_per_token(examples: Iterable, tokenizer) -> tuple[float, int, int]:
    """(bytes per scored token, scored tokens, bytes) of an evaluation set of {'input_ids', 'labels'} blocks.

    Run once at start-up on the validation set (every example is read once: a few M tokens at most), so the
    trainer can turn each eval loss into bits per byte: bpb = eval_loss / (ln 2 x bytes per token). Exact when
    the loss is the mean over all targets, as the Trainer's eval loss over equal-length blocks is.
    """
    counter = ByteCounter(tokenizer)
    n_tokens = n_bytes = 0
    for example in examples:
        targets = scored_targets(example)
        n_tokens += targets.size
        n_bytes += counter.count(targets)
    return (n_bytes / n_tokens if n_tokens else 0.0), n_tokens, n_bytes
