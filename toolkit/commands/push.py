"""`toolkit push FOLDER REPO_ID`: push a model or adapter folder to the Hugging Face Hub (toolkit/hub.py)."""

from __future__ import annotations

from toolkit.errors import OneLineArgumentParser, exit_on_user_error
from toolkit.hub import push_folder


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(
        prog="toolkit push",
        description="Push a model or adapter folder to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`).",
    )
    parser.add_argument("folder", help="folder to upload (an adapter output_dir, a merged model, a pretrain output)")
    parser.add_argument("repo_id", help="target repo, user/name or org/name (created if missing)")
    parser.add_argument("--private", "--hub_private_repo", dest="private", action="store_true",
                        help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--commit_message", default="Upload with gpt2-toolkit")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--token", default=None,
                        help="Hub token (default: HF_TOKEN or the stored login); never printed")
    parser.add_argument("--base_model_name_or_path", default=None,
                        help="an adapter's base, for the reload check (default: the one in adapter_config.json)")
    parser.add_argument("--no_verify", action="store_true",
                        help="push an adapter folder without checking that it reloads on its base")
    args = parser.parse_args(argv)
    push_folder(args.folder, args.repo_id, private=args.private, commit_message=args.commit_message,
                token=args.token, revision=args.revision, verify=not args.no_verify,
                base_model=args.base_model_name_or_path)
    return 0
