"""Sampling from a loaded model: the prompt's token ids, the generation settings (greedy at temperature 0, else
sampled; EOS stops), the recipes' closing sample (`continuation`) and `toolkit generate`'s streamed samples
(`generate`; the command is toolkit/commands/generate.py).
"""

from __future__ import annotations

from toolkit.errors import UserError


def read_prompt(args) -> str:
    if args.prompt_file is None:
        return args.prompt or ""
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"prompt file '{args.prompt_file}' does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read prompt file '{args.prompt_file}' ({type(err).__name__}); "
                        "pass a UTF-8 text file") from None


def prompt_ids(tokenizer, prompt: str):
    """Token ids of the prompt; an empty prompt starts a new document (EOS, as in training)."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else [tokenizer.eos_token_id]
    return torch.tensor([ids], dtype=torch.long)


def generation_kwargs(tokenizer, max_new_tokens: int, temperature: float, top_k: int | None = None,
                      top_p: float = 1.0) -> dict:
    """model.generate arguments: greedy at temperature 0, else sampled; stops at EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
    if temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p)
    return kwargs


def continuation(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0, min_new_tokens: int | None = None,
                 skip_special_tokens: bool = True) -> str:
    """One continuation of `prompt` (the new text only), from a model already loaded: the recipes' closing sample.
    `min_new_tokens` keeps EOS from being picked before that many tokens (a model that would end the document at
    once still shows text)."""
    import torch
    from transformers import set_seed

    ids = prompt_ids(tokenizer, prompt).to(next(model.parameters()).device)
    kwargs = generation_kwargs(tokenizer, max_new_tokens, temperature, top_k)
    set_seed(seed)
    model.eval()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), min_new_tokens=min_new_tokens,
                             **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=skip_special_tokens)


def generate(model, tokenizer, prompt: str, args, stream: bool = True) -> list[str]:
    """args.num_samples continuations of `prompt` (without the prompt); each streamed to stdout when `stream`."""
    import torch
    from transformers import TextStreamer, set_seed

    ids = prompt_ids(tokenizer, prompt).to(model.device)
    kwargs = generation_kwargs(tokenizer, args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    set_seed(args.seed)
    outputs = []
    for i in range(args.num_samples):
        if args.num_samples > 1 and stream:
            print(f"--- sample {i + 1}/{args.num_samples} ---", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True) if stream else None
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
        outputs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs
