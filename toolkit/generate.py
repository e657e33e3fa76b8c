"""`toolkit generate`: sample text from a trained model, optionally with a LoRA/QLoRA adapter on it.

    toolkit generate out/pretrain --prompt "The meaning of" --max_new_tokens 100
    toolkit generate gpt2 --adapter out/lora-gpt2 --prompt_file prompt.txt --num_samples 3 --seed 1
    toolkit generate out/pretrain --temperature 0 --prompt "def main("      # greedy

Text streams to stdout as it is generated (transformers' TextStreamer: the prompt, then the continuation);
messages go to stderr, so `> sample.txt` keeps only the text. Each sample stops at EOS or --max_new_tokens.
The same --seed gives the same samples on the same machine and dtype.
"""

from __future__ import annotations

import argparse
import sys

from toolkit.errors import OneLineArgumentParser, UserError, exit_on_user_error


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults in --help, and the module docstring's examples kept as written."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="toolkit generate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="model folder (a recipe's output_dir, a merged model) or Hub name; may be left out with "
                        "--adapter (the adapter's recorded base is used)")
    p.add_argument("--adapter", default=None,
                   help="LoRA/QLoRA adapter folder or Hub repo to apply on the model (unmerged)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, help="text to continue; left out: the start of a new document")
    source.add_argument("--prompt_file", default=None, help="file whose whole content is the prompt (UTF-8)")
    p.add_argument("--max_new_tokens", type=int, default=100,
                   help="tokens to generate per sample at most (EOS stops earlier)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy (the most likely token)")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens; 0 = no limit")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens with this "
                                                             "much probability; 1 = no limit")
    p.add_argument("--num_samples", type=int, default=1, help="samples to generate, one after another")
    p.add_argument("--seed", type=int, default=42, help="random seed for sampling")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype: auto = bf16 on a GPU that has it, else fp32 (always fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--token", default=None, help="Hub token for a private model or adapter (never printed)")
    return p


def check_options(args) -> None:
    """Every numeric option's range, before anything is loaded."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} must be at least 1")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature} must be >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise UserError(f"--top_k {args.top_k} must be >= 0 (0 = no limit)")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p {args.top_p} must be in (0, 1] (1 = no limit)")
    if args.num_samples < 1:
        raise UserError(f"--num_samples {args.num_samples} must be at least 1")


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


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_options(args)
    prompt = read_prompt(args)

    from toolkit.inference import load_for_inference, model_context, resolve_model
    from toolkit.tokenizer import load_tokenizer

    model_name, adapter_cfg = resolve_model(args.model, args.adapter, args.token)
    context, _ = model_context(model_name, args.token)
    n_prompt = prompt_ids(load_tokenizer(model_name), prompt).shape[1]
    if n_prompt + args.max_new_tokens > context:
        room = context - n_prompt
        fix = f"lower --max_new_tokens to {room}" if room >= 1 else f"shorten the prompt below {context} tokens"
        raise UserError(f"the prompt ({n_prompt} tokens) plus --max_new_tokens {args.max_new_tokens} exceeds the "
                        f"model's context of {context} tokens; {fix}")
    loaded = load_for_inference(model_name, args.adapter, adapter_cfg, args.dtype, args.device, args.token)
    print(f"generating with {loaded.name} ({loaded.dtype}, {loaded.device})", file=sys.stderr, flush=True)
    generate(loaded.model, loaded.tokenizer, prompt, args)
    return 0
