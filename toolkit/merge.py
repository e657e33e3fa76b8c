"""`toolkit merge`: fold a LoRA / QLoRA adapter into its base and save a normal model folder.

The base is always loaded unquantized (fp32 by default), also for a QLoRA adapter: merging into 4-bit
weights re-quantizes W + BA and loses the adapter's small update in the rounding (peft#2321). The
result is a plain GPT2LMHeadModel folder (config.json, model.safetensors, tokenizer) that loads
without peft, and that recipes/lora.py or pretrain.py can start from again.
"""

from __future__ import annotations

import os

from toolkit.errors import OneLineArgumentParser, UserError, exit_on_user_error
from toolkit.inference import adapter_config


def merge_adapter(adapter: str, output_dir: str, base_model: str | None = None, dtype: str = "float32",
                  token: str | None = None, overwrite: bool = False) -> str:
    """Load base (full precision) + adapter, merge_and_unload, save_pretrained; return output_dir."""
    import torch

    from toolkit.lora import load_adapter, load_base_model
    from toolkit.tokenizer import load_tokenizer

    if os.path.isfile(os.path.join(output_dir, "config.json")) and not overwrite:
        raise UserError(f"'{output_dir}' already holds a model; "
                        "pass --overwrite_output_dir or choose another --output_dir")
    config = adapter_config(adapter, token)
    if config.get("peft_type") not in (None, "LORA"):
        raise UserError(f"'{adapter}' is a {config.get('peft_type')} adapter; toolkit merge merges LoRA adapters only")
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise UserError("the adapter does not record its base model; pass --base_model_name_or_path")
    model = load_base_model(base, dtype=getattr(torch, dtype))
    try:
        model = load_adapter(model, adapter, token=token)
    except RuntimeError:  # load_state_dict: size mismatch
        raise UserError(
            f"adapter '{adapter}' does not fit base '{base}' (tensor shapes differ: it was trained on another base); "
            f"pass --base_model_name_or_path with the model it was trained on"
        ) from None
    except ValueError as err:  # peft: target modules not found
        raise UserError(
            f"adapter '{adapter}' does not fit base '{base}' ({str(err).splitlines()[0][:160]}); "
            f"pass --base_model_name_or_path with the model it was trained on"
        ) from None
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir)
    try:  # the adapter folder carries the tokenizer (and chat template) it was trained with
        tokenizer = load_tokenizer(adapter) if os.path.isdir(adapter) else load_tokenizer(base)
    except UserError:
        tokenizer = load_tokenizer(base)
    tokenizer.save_pretrained(output_dir)
    print(f"merged {adapter} into {base} ({dtype}) -> {output_dir}")
    return output_dir


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="toolkit merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True,
                        help="adapter folder (recipes/lora.py or qlora.py output_dir) or Hub repo")
    parser.add_argument("--output_dir", required=True, help="where to save the merged model folder")
    parser.add_argument("--base_model_name_or_path", default=None,
                        help="the base the adapter was trained on (default: the one recorded in adapter_config.json)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the merge and of the saved weights (never quantized)")
    parser.add_argument("--overwrite_output_dir", action="store_true")
    parser.add_argument("--push_to_hub", action="store_true", help="push the merged folder to --hub_model_id")
    parser.add_argument("--hub_model_id", default=None)
    parser.add_argument("--hub_private_repo", action="store_true")
    parser.add_argument("--token", default=None, help="Hub token for a Hub adapter/base or the push (never printed)")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        raise UserError("--push_to_hub needs --hub_model_id user/name")
    merge_adapter(args.adapter, args.output_dir, args.base_model_name_or_path, args.dtype, args.token,
                  args.overwrite_output_dir)
    if args.push_to_hub:
        from toolkit.hub import push_folder

        push_folder(args.output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.token)
    return 0
