"""Push a model or adapter folder to the Hugging Face Hub: `push_folder()`, for `toolkit push FOLDER REPO_ID`
(toolkit/commands/push.py) and the recipes' --push_to_hub. The token comes from where huggingface_hub
looks for it (HF_TOKEN, `hf auth login`'s stored token) or --token; it is sent to the Hub only and
never printed or logged. HF_ENDPOINT (read when huggingface_hub is imported) selects another Hub.

An adapter folder is checked before anything is uploaded (`check_adapter_folder`): no base model weights in it
(transformers#28297), no more weight bytes than its adapter_config.json implies (trl#1287), and it reloads on its
base with the weights, and the outputs, of the model that was trained (accelerate#4206 saved a shard only).
"""

from __future__ import annotations

import fnmatch
import json
import os

from toolkit.errors import UserError

# Never uploaded: pickled training state and bulky checkpoints (the folder keeps them locally).
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "runs/**", "training_args.bin", "optimizer.pt", "scheduler.pt",
                   "rng_state*.pth", "*.lock", ".cache/**"]
BASE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
# An adapter folder may hold up to this many times the weight bytes its config implies at fp32 (plus SIZE_SLACK):
# a saved adapter is that size or half of it (bf16); more means something else was saved with it.
SIZE_FACTOR = 2
SIZE_SLACK = 1 << 20
RELOAD_TOLERANCE = 1e-4  # relative logit difference, reloaded vs trained: the same weights give the same logits


def take_push_to_hub(args) -> bool:
    """Validate --push_to_hub before training (repo id, a token) and turn off the Trainer's own push: the recipes
    push the finished folder once, with its model card. Returns whether to push."""
    push = bool(args.push_to_hub)
    if push:
        check_push_ready(args.hub_model_id, args.hub_token)
    args.push_to_hub = False
    return push


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
                token: str | None = None, revision: str | None = None, trained_model=None, verify: bool = True,
                base_model: str | None = None) -> str:
    """Create `repo_id` if needed and upload `folder` to it in one commit; return the repo URL.

    An adapter folder (adapter_config.json) is checked first (check_adapter_folder) unless verify=False;
    `trained_model` is the PeftModel it was saved from, whose outputs the reloaded adapter must give."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from toolkit.model_card import hub_adapter_config

    if not os.path.isdir(folder) or not os.listdir(folder):
        raise UserError(f"'{folder}' is not a folder with files to push; "
                        "pass the output_dir of a recipe or a model folder")
    _check_repo_id(repo_id)
    if verify and os.path.isfile(os.path.join(folder, "adapter_config.json")):
        print(check_adapter_folder(folder, trained_model, base_model, token))
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


def check_push_ready(repo_id: str | None, token: str | None = None) -> None:
    """Before training: a valid user/name repo id and a token (HF_TOKEN or `hf auth login`), or a one-line error.

    Only checks that a token exists; it is never printed. Whether it may write is learnt at push time.
    """
    from huggingface_hub import get_token

    _check_repo_id(repo_id, "--hub_model_id")
    if not (token or get_token()):
        raise UserError("--push_to_hub but no Hub token found; run `hf auth login` or set HF_TOKEN, then start again")


def _uploaded_files(folder: str) -> list[str]:
    """The folder's files (relative paths) that upload_folder sends: IGNORE_PATTERNS left out."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not any(fnmatch.fnmatch(rel, pattern) for pattern in IGNORE_PATTERNS):
                out.append(rel)
    return out


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def _relative_difference(a, b) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def _is_sharded(model) -> bool:
    """FSDP2 parameters are DTensors: a forward on one rank alone would wait for the others."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def check_adapter_folder(folder: str, trained_model=None, base_model: str | None = None,
                         token: str | None = None) -> str:
    """Refuse (one line) an adapter folder holding base weights, far larger than its config implies, or that does
    not reload on its base as `trained_model` (the in-memory PeftModel the recipe trained, if given) computes;
    return a note on what was checked."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    files = _uploaded_files(folder)
    base_files = [f for f in files if f in BASE_WEIGHT_FILES or fnmatch.fnmatch(f, "model-*-of-*.safetensors")]
    if base_files:
        raise UserError(f"'{folder}' holds base model weights ({base_files[0]}) beside its adapter; remove them (the "
                        "adapter loads on its base) or push the merged model (toolkit merge) to its own repo")
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise UserError(f"'{folder}' has adapter_config.json but no adapter_model.safetensors; "
                        "save the adapter with save_pretrained (safetensors) and push again")
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    sharded = trained_model is not None and _is_sharded(trained_model)
    if trained_model is None or sharded:
        from toolkit.lora import load_adapter
        from toolkit.model_loading import load_model

        base = base_model or config.get("base_model_name_or_path")
        if not base:
            raise UserError(f"'{folder}' does not record its base model; pass --base_model_name_or_path to check "
                            "it reloads (or --no_verify)")
        try:
            model = load_adapter(load_model(base), folder, token=token)
        except (RuntimeError, ValueError):  # shapes or target modules do not fit
            raise UserError(f"adapter '{folder}' does not reload on its base '{base}' (it does not fit: trained "
                            "on another base?); pass --base_model_name_or_path with the model it was trained on"
                            ) from None
    else:
        model = trained_model
    expected = get_peft_model_state_dict(model)
    with safe_open(weights, "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    extra = [k for k in saved if k not in expected]
    if extra:
        raise UserError(f"'{folder}' adapter_model.safetensors holds {len(extra)} tensor(s) that are not part of the "
                        f"adapter its config describes (such as {extra[0]}: base model weights?); save the adapter "
                        "alone with save_pretrained of the PeftModel and push again")
    implied = 4 * sum(t.numel() for t in expected.values())
    weight_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in files if f.endswith(WEIGHT_SUFFIXES))
    if weight_bytes > SIZE_FACTOR * implied + SIZE_SLACK:
        raise UserError(f"'{folder}' holds {_size(weight_bytes)} of weight files, far more than the "
                        f"{_size(implied)} its adapter_config.json implies (r={config.get('r')}, "
                        f"{len(config.get('target_modules') or [])} target module name(s)); remove the extra files "
                        "or save the adapter alone, then push again")
    missing = [k for k in expected if k not in saved]
    if missing:
        raise UserError(f"'{folder}' adapter_model.safetensors lacks {len(missing)} of the adapter's "
                        f"{len(expected)} tensors (such as {missing[0]}: a save from one rank's shard?); save the "
                        "whole adapter (on rank 0 after gathering) and push again")
    if trained_model is None or sharded:
        for key, tensor in saved.items():  # the reload put the saved values in the model
            if not torch.equal(expected[key].cpu().to(tensor.dtype), tensor):
                raise UserError(f"'{folder}' did not reload as saved ({key} differs after loading); "
                                "save it again with save_pretrained")
        return f"checked {folder}: {len(saved)} adapter tensors reload on their base"
    return _compare_with_trained(folder, model, config, saved)


def _compare_with_trained(folder: str, model, config: dict, saved: dict) -> str:
    """Load the folder's config and weights into the trained model's own adapter, compare the logits with the
    trained ones, then put the trained weights back: same base, device and dtype, no second copy of the model."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    active = model.active_adapter
    trained_config = model.peft_config[active].to_dict()
    for key in ("peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "target_modules", "modules_to_save"):
        mine, theirs = trained_config.get(key), config.get(key)
        if isinstance(mine, (list, set, tuple)) or isinstance(theirs, (list, set, tuple)):
            mine, theirs = sorted(mine or []), sorted(theirs or [])
        if mine != theirs:
            raise UserError(f"'{folder}' adapter_config.json does not match the trained adapter ({key} {theirs} vs "
                            f"{mine}); save it again with save_pretrained and push with `toolkit push`")
    ids = torch.arange(32).reshape(1, 32) % model.config.vocab_size
    was_training = model.training
    model.eval()
    trained_weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    try:
        trained = _logits(model, ids)
        set_peft_model_state_dict(model, saved, adapter_name=active)
        reloaded = _logits(model, ids)
    finally:
        set_peft_model_state_dict(model, trained_weights, adapter_name=active)
        model.train(was_training)
    difference = _relative_difference(reloaded, trained)
    if not difference <= RELOAD_TOLERANCE:
        raise UserError(f"the adapter in '{folder}' does not reload as trained: its outputs differ from the trained "
                        f"model's by {difference:.3g} (relative; tolerance {RELOAD_TOLERANCE:g}); nothing pushed. "
                        "Save it again with save_pretrained and push with `toolkit push`")
    return f"checked {folder}: reloaded on its base, outputs match the trained model (difference {difference:.2g})"
