"""`toolkit merge`: fold a LoRA / QLoRA adapter into its base and save a normal model folder.

The merge and its check are toolkit/merge.py; the push, toolkit/hub.py.
"""

from __future__ import annotations

from toolkit.errors import OneLineArgumentParser, UserError, exit_on_user_error
from toolkit.merge import merge_adapter


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
    parser.add_argument("--no_verify", action="store_true",
                        help="skip comparing the merged logits with base + adapter before writing")
    parser.add_argument("--push_to_hub", action="store_true", help="push the merged folder to --hub_model_id")
    parser.add_argument("--hub_model_id", default=None)
    parser.add_argument("--hub_private_repo", action="store_true")
    parser.add_argument("--token", default=None, help="Hub token for a Hub adapter/base or the push (never printed)")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        raise UserError("--push_to_hub needs --hub_model_id user/name")
    merge_adapter(args.adapter, args.output_dir, args.base_model_name_or_path, args.dtype, args.token,
                  args.overwrite_output_dir, verify=not args.no_verify)
    if args.push_to_hub:
        from toolkit.hub import push_folder

        push_folder(args.output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.token)
    return 0
