"""Push a model or adapter folder to the Hugging Face Hub: `toolkit push FOLDER REPO_ID`.

Also `push_folder()`, used by the recipes' --push_to_hub. The token comes from where huggingface_hub
looks for it (HF_TOKEN, `hf auth login`'s stored token) or --token; it is sent to the Hub only and
never printed or logged. HF_ENDPOINT (read when huggingface_hub is imported) selects another Hub.
"""

from __future__ import annotations

import os

from toolkit.errors import OneLineArgumentParser, UserError, exit_on_user_error

# Never uploaded: pickled training state and bulky checkpoints (the folder keeps them locally).
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "runs/**", "training_args.bin", "optimizer.pt", "scheduler.pt",
                   "rng_state*.pth", "*.lock", ".cache/**"]


def fix_card_base_model(folder: str) -> str | None:
    """Drop README.md `base_model` entries that are not Hub ids (a local path makes the Hub refuse the
    commit, transformers#33922); return a note when something was dropped."""
    from huggingface_hub import ModelCard

    from toolkit.model_card import is_hub_model_id

    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return None
    card = ModelCard.load(path)
    base = card.data.get("base_model")
    if base is None:
        return None
    values = base if isinstance(base, list) else [base]
    keep = [v for v in values if is_hub_model_id(v)]
    if len(keep) == len(values):
        return None
    card.data.base_model = (keep if isinstance(base, list) else keep[0]) if keep else None
    card.save(path)
    dropped = [v for v in values if v not in keep]
    return f"README.md: removed base_model {', '.join(map(str, dropped))} (not a Hub model id; the Hub rejects it)"


def _check_repo_id(repo_id: str | None, option: str = "the repo id") -> None:
    """A user/name (or org/name) repo id, or a one-line error naming the option it came from."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not repo_id:
        raise UserError("--push_to_hub needs --hub_model_id user/name (the repo to create or update)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"{option} '{repo_id}' is not a Hub repo id; "
                        "use the form user/name (letters, digits, - _ .)") from None
    if "/" not in repo_id:
        raise UserError(f"{option} '{repo_id}' has no namespace; pass user/{repo_id} (or org/{repo_id})")


def push_folder(folder: str, repo_id: str, private: bool = False, commit_message: str = "Upload with gpt2-toolkit",
                token: str | None = None, revision: str | None = None) -> str:
    """Create `repo_id` if needed and upload `folder` to it in one commit; return the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from toolkit.model_card import hub_adapter_config

    if not os.path.isdir(folder) or not os.listdir(folder):
        raise UserError(f"'{folder}' is not a folder with files to push; "
                        "pass the output_dir of a recipe or a model folder")
    _check_repo_id(repo_id)
    note = fix_card_base_model(folder)
    if note:
        print(note)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        adapter_config = hub_adapter_config(folder)  # an adapter on a local base: name its Hub base instead
        ignore = IGNORE_PATTERNS + (["adapter_config.json"] if adapter_config else [])
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message,
                                   ignore_patterns=ignore, revision=revision)
        if adapter_config:
            commit = api.upload_file(path_or_fileobj=adapter_config, path_in_repo="adapter_config.json",
                                     repo_id=repo_id, commit_message=commit_message, revision=revision)
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise UserError(
                "the Hub refused the token (401); log in with `hf auth login` or set HF_TOKEN to a token with "
                "write access"
            ) from None
        if status == 403:
            raise UserError(f"no write access to '{repo_id}' (403); "
                            "use a namespace you own or a token with write access") from None
        raise UserError(f"the Hub refused the upload to '{repo_id}' ({status}): {_first_line(err)}") from None
    except ValueError as err:  # huggingface_hub's README metadata check
        raise UserError(f"the Hub rejected README.md metadata: {_first_line(err)}; "
                        "fix the card and push again") from None
    except OSError as err:  # connection refused, DNS, timeouts
        raise UserError(f"cannot reach the Hub ({type(err).__name__}); check the network or HF_ENDPOINT, then run "
                        f"`toolkit push {folder} {repo_id}` again") from None
    print(f"pushed {folder} to {url} (commit {getattr(commit, 'oid', '')[:12]})")
    return str(url)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return " ".join(text[:2])[:300] if text else type(err).__name__


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
    args = parser.parse_args(argv)
    push_folder(args.folder, args.repo_id, private=args.private, commit_message=args.commit_message,
                token=args.token, revision=args.revision)
    return 0


def check_push_ready(repo_id: str | None, token: str | None = None) -> None:
    """Before training: a valid user/name repo id and a token (HF_TOKEN or `hf auth login`), or a one-line error.

    Only checks that a token exists; it is never printed. Whether it may write is learnt at push time.
    """
    from huggingface_hub import get_token

    _check_repo_id(repo_id, "--hub_model_id")
    if not (token or get_token()):
        raise UserError("--push_to_hub but no Hub token found; run `hf auth login` or set HF_TOKEN, then start again")
