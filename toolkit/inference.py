"""Load a model (and optionally a LoRA/QLoRA adapter on it) to generate from or evaluate: `toolkit generate`,
`toolkit eval`.

The model is any `from_pretrained` folder or Hub name: pretrain.py, onefile_train.py and `toolkit merge` outputs.
It runs in bf16 on a GPU that has it and in fp32 on a CPU (bf16 matmuls are many times slower on CPUs without
AMX), like the recipes. An adapter goes on an unquantized base through peft, also a QLoRA adapter: its A and B
matrices do not depend on how the base was stored (toolkit/lora.py).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from toolkit.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class Loaded:
    model: object
    tokenizer: object
    name: str  # what was loaded, for messages and --json
    dtype: str
    device: str


def resolve_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} but no CUDA GPU is visible; use --device cpu (or auto)")
    return name


def adapter_folder(adapter: str, token: str | None = None) -> str:
    """A local adapter folder as given; a Hub repo downloaded (its json, safetensors and tokenizer files only, into
    the Hub cache), so the adapter, its config and its tokenizer are read from one folder, with the token."""
    from toolkit.model_loading import is_local_path

    if is_local_path(adapter):
        if not os.path.isdir(adapter):
            raise UserError(f"adapter folder '{adapter}' does not exist; "
                            "pass the output_dir of recipes/lora.py or recipes/qlora.py")
        return adapter
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(adapter, token=token, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as err:  # noqa: BLE001 - not found, private without a token, offline: "not reachable"
        raise UserError(f"could not download adapter '{adapter}' from the Hub ({type(err).__name__}); check the "
                        "repo name, pass --token (or HF_TOKEN) for a private repo, or a local folder") from None


def adapter_config(adapter: str, token: str | None = None) -> dict:
    """adapter_config.json of a local adapter folder or Hub repo, with one-line errors."""
    folder = adapter_folder(adapter, token)
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        raise UserError(f"'{adapter}' has no adapter_config.json; "
                        "pass the output_dir of recipes/lora.py or recipes/qlora.py")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_model(model: str | None, adapter: str | None, token: str | None = None) -> tuple[str, dict | None]:
    """(base model to load, adapter config or None). MODEL may be left out when the adapter records its base."""
    from toolkit.model_loading import check_model_source

    config = adapter_config(adapter, token) if adapter else None
    if config is not None and config.get("peft_type") not in (None, "LORA"):
        raise UserError(f"'{adapter}' is a {config.get('peft_type')} adapter; only LoRA/QLoRA adapters are supported")
    if not model:
        if config is None:
            raise UserError("no model given; pass MODEL (a save_pretrained folder such as a recipe's --output_dir, "
                            "or a Hub name such as gpt2)")
        model = config.get("base_model_name_or_path")
        if not model:
            raise UserError(f"adapter '{adapter}' does not record its base model; pass MODEL before the options")
    check_model_source(model)
    return model, config


def model_context(model_name: str, token: str | None = None) -> tuple[int, int]:
    """(the model's context length (n_positions), the block size it was trained on), read from config.json before
    loading any weights. The second is the context unless recipes/pretrain.py recorded a shorter one (a gpt2-micro has
    256 positions but is trained on 128-token blocks by default; the positions beyond were never trained)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name, token=token)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the config of model '{model_name}' ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160]}); "
                        "pass a save_pretrained folder or a reachable Hub name") from None
    context = next((int(getattr(config, key)) for key in ("n_positions", "max_position_embeddings", "n_ctx")
                    if getattr(config, key, None)), 1024)
    trained_block = getattr(config, "training_block_size", None)
    return context, min(int(trained_block), context) if trained_block else context


def _same_model(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return True
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def load_for_inference(model_name: str, adapter: str | None = None, adapter_cfg: dict | None = None,
                       dtype: str = "auto", device: str = "auto", token: str | None = None) -> Loaded:
    """The model in eval mode on `device` (with the adapter applied, unmerged), and its tokenizer."""
    import torch

    from toolkit.lora import compute_dtype, load_adapter
    from toolkit.model_loading import load_model
    from toolkit.tokenizer import load_tokenizer

    device = resolve_device(device)
    torch_dtype = compute_dtype("auto") if dtype == "auto" else getattr(torch, dtype)
    if dtype == "auto" and device == "cpu":
        torch_dtype = torch.float32
    model = load_model(model_name, dtype=torch_dtype)
    name = model_name
    folder = adapter_folder(adapter, token) if adapter else None  # a Hub adapter: asked of the Hub once
    if adapter:
        recorded = (adapter_cfg or {}).get("base_model_name_or_path")
        fix = "pass as MODEL the base it was trained on (or leave MODEL out to use the one it records)"
        try:
            model = load_adapter(model, folder)
        except RuntimeError:  # load_state_dict: size mismatch
            raise UserError(f"adapter '{adapter}' does not fit model '{model_name}' (tensor shapes differ: it was "
                            f"trained on another base); {fix}") from None
        except ValueError as err:  # peft: target modules not found
            raise UserError(f"adapter '{adapter}' does not fit model '{model_name}' "
                            f"({str(err).splitlines()[0][:160]}); {fix}") from None
        if not _same_model(recorded, model_name):
            print(f"note: adapter '{adapter}' was trained on '{recorded}'; applied to '{model_name}'", file=sys.stderr)
        name = f"{model_name} + {adapter}"
    tokenizer = None
    if folder and os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        tokenizer = load_tokenizer(folder)  # the tokenizer the adapter was trained with
    tokenizer = tokenizer or load_tokenizer(model_name)
    # GPT-2 pads with its EOS, and a prompt that starts a document starts with EOS: transformers' "input_ids may be
    # padded" check (the config's pad id first or last, the all-ones mask dropped before the forward) would misfire
    # on it. Nothing loaded here is ever padded; generation takes its pad id from generation_config.
    if model.config.pad_token_id is not None and model.config.pad_token_id == model.config.eos_token_id:
        model.config.pad_token_id = None
    model.to(device).eval()
    return Loaded(model, tokenizer, name, str(torch_dtype).replace("torch.", ""), device)
