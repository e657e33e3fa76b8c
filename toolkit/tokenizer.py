"""Tokenizers: load a Hub/local one, or train a byte-level BPE on the training text.

run_clm.py refuses to train from scratch without a tokenizer; we train one with the `tokenizers`
library instead (GPT-2's own recipe: byte-level pre-tokenization, so any text round-trips, and a
single special token `<|endoftext|>` that ends every document). It is saved next to the model, so
`AutoTokenizer.from_pretrained(output_dir)` gives back the same tokenizer.
"""

from __future__ import annotations

import os
from typing import Iterable

from toolkit.errors import UserError
from toolkit.model_loading import is_local_path

EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a GPT-2 style byte-level BPE with `vocab_size` entries (EOS included).

    Deterministic for the same texts and settings; recipes/onefile_train.py repeats these exact steps.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise UserError(f"--vocab_size {vocab_size} is too small for a byte-level BPE; "
                        "use at least 257 (256 bytes + EOS)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, model_max_length=1_000_000
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """AutoTokenizer from a Hub name or a local folder, with a pad token (GPT-2 has none: use EOS)."""
    from transformers import AutoTokenizer

    if is_local_path(name_or_path) and not os.path.isdir(name_or_path):
        raise UserError(f"tokenizer folder '{name_or_path}' does not exist; "
                        "pass a folder with tokenizer files or a Hub name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load tokenizer '{name_or_path}' ({type(err).__name__}); pass a local folder with "
            f"tokenizer.json or vocab.json+merges.txt, or a Hub name reachable from this machine"
        ) from None
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer '{name_or_path}' has no EOS token; documents must be separated by one, "
                        "choose another tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Packed blocks are cut to block_size by us, so the tokenizer's own length warning is noise.
    tokenizer.model_max_length = max(tokenizer.model_max_length or 0, 1_000_000_000)
    return tokenizer


GPT2_TOKENIZER = "gpt2"  # the Hub's GPT-2 tokenizer


def gpt2_tokenizer_cached() -> bool:
    """Whether the local Hub cache holds GPT-2's tokenizer (no request: works offline)."""
    from huggingface_hub import try_to_load_from_cache

    files = ("tokenizer.json", "vocab.json")  # the fast tokenizer's file, or the slow one's (with merges.txt)
    return any(isinstance(try_to_load_from_cache(GPT2_TOKENIZER, name), str) for name in files)


def choose_pretrain_tokenizer(model_args, data_args) -> str | None:
    """pretrain.py's tokenizer when none is given, and the one line that says which and why (None: nothing to say).

    A GPT-2 shape (shape flags without --preset) takes GPT-2's tokenizer when the local Hub cache has it, else a
    byte-level BPE of GPT-2's vocabulary size trained on the training text: a tokenizer is never downloaded
    unasked, so the same command runs offline. Sets model_args.tokenizer_name when it picks GPT-2's."""
    if model_args.tokenizer_name:
        return f"Tokenizer: {model_args.tokenizer_name} (--tokenizer_name)"
    if model_args.model_name_or_path:
        return f"Tokenizer: {model_args.model_name_or_path}'s own (--model_name_or_path)"
    if data_args.token_store:
        return f"Tokenizer: the token store's own ({data_args.token_store})"
    if getattr(model_args, "gpt2_shape", False):
        if gpt2_tokenizer_cached():
            model_args.tokenizer_name = GPT2_TOKENIZER
            return ("Tokenizer: GPT-2's (gpt2, from the local Hub cache): shape flags without --preset build a GPT-2, "
                    "vocabulary included")
        return (f"Tokenizer: a byte-level BPE of up to {model_args.vocab_size:,} tokens trained on the training text "
                "(GPT-2's vocabulary size: shape flags without --preset build a GPT-2; GPT-2's own tokenizer is not "
                "in the local Hub cache: pass --tokenizer_name gpt2 to download it)")
    return (f"Tokenizer: a byte-level BPE of {model_args.vocab_size:,} tokens trained on the training text (the "
            f"{model_args.preset} preset's default; --tokenizer_name for another)")
