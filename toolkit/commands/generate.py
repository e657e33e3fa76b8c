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

from toolkit.args.ranges import check_ranges
from toolkit.errors import OneLineArgumentParser, UserError, exit_on_user_error
from toolkit.generate import generate, prompt_ids, read_prompt


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


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_ranges(args, command="toolkit generate")
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
