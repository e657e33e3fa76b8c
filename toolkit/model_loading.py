"""Loading a model, in one place: full precision, or quantized by bitsandbytes while it loads; one-line errors.

Every recipe and command loads a model here: pretrain.py's --model_name_or_path, lora.py's and qlora.py's base,
`toolkit generate` / `toolkit eval` (toolkit/inference.py), `toolkit merge` and `toolkit push`'s reload check. A
model is a Hub name or a save_pretrained folder (pretrain.py, onefile_train.py and `toolkit merge` write them).
A missing folder, a folder that is not a model and a checkpoint that does not load are each one line naming the fix,
never a download attempt for a path or a traceback.
"""

from __future__ import annotations

import gc
import json
import os
import re

from toolkit import third_party
from toolkit.cpu_allocator import large_blocks_from_mmap, release_freed_memory
from toolkit.errors import UserError

# what the Hub accepts as a repo id: "name" or "namespace/name"
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def is_local_path(name_or_path: str) -> bool:
    """A folder, or something that cannot be a Hub repo id ('/abs/path', './x', 'a/b/c'): a missing local folder then
    gets a "does not exist" error instead of a failed Hub download (models, adapters, tokenizers). A missing 'a/b' is
    asked of the Hub, as from_pretrained does."""
    return os.path.isdir(name_or_path) or not HUB_ID.fullmatch(name_or_path)


def check_model_source(name_or_path: str | None) -> str:
    """A Hub name, or a folder with a config.json; else one line, before anything loads."""
    if not name_or_path:
        raise UserError("no model; pass --model_name_or_path (a Hub name such as gpt2, or a save_pretrained folder)")
    if is_local_path(name_or_path):
        if not os.path.isdir(name_or_path):
            raise UserError(f"model folder '{name_or_path}' does not exist; pass a save_pretrained folder (e.g. a "
                            "recipe's --output_dir) or a Hub name such as gpt2")
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise UserError(f"'{name_or_path}' has no config.json, so it is not a model folder; pass the folder that "
                            "save_pretrained wrote (config.json + model.safetensors)")
    return name_or_path


def _load_error(name_or_path: str, err: Exception) -> UserError:
    text = str(err).strip()
    first = f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__
    return UserError(f"could not load model '{name_or_path}' ({first}); check that it is a complete save_pretrained "
                     "folder (config.json + model.safetensors) or a Hub name reachable from this machine")


def _out_of_memory(err: Exception) -> bool:
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"


def load_model(name_or_path: str, dtype=None, revision: str = "main", trust_remote_code: bool = False,
               attn_implementation: str | None = None, device_map=None, config=None):
    """AutoModelForCausalLM.from_pretrained in full precision (fp32 unless `dtype`); `config` replaces the saved one
    (pretrain.py passes the config it checked)."""
    import torch
    from transformers import AutoModelForCausalLM

    check_model_source(name_or_path)
    kwargs = {"config": config} if config is not None else {}
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype or torch.float32, revision=revision, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, device_map=device_map, **kwargs,
        )
    except Exception as err:  # OSError, SafetensorError, size mismatches...: all mean "not a usable checkpoint"
        if _out_of_memory(err):
            raise
        raise _load_error(name_or_path, err) from None


def _checkpoint_files(name_or_path: str, revision: str) -> list[str] | None:
    """The safetensors file(s) of a local folder or Hub repo, or None when it has none."""
    from transformers.utils import cached_file

    kwargs = dict(revision=revision, _raise_exceptions_for_missing_entries=False)
    single = cached_file(name_or_path, "model.safetensors", **kwargs)
    if single:
        return [single]
    index = cached_file(name_or_path, "model.safetensors.index.json", **kwargs)
    if not index:
        return None
    with open(index, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [cached_file(name_or_path, shard, revision=revision) for shard in shards]


def load_quantized_model(name_or_path: str, quantization_config, dtype, device_map, revision: str = "main",
                              trust_remote_code: bool = False, attn_implementation: str | None = None):
    """The model quantized by bitsandbytes while it loads, one tensor at a time (QLoRA's base).

    transformers quantizes each weight as it is read, but reads every tensor through one memory map
    of the file, and the map stays alive while an unquantized tensor (GPT-2's embedding) is a view of
    it: each page it touched, i.e. every full-precision weight, keeps counting in the process's
    memory. So the same loader gets a `state_dict` of lazy slices instead: the weights that will be
    quantized come through safetensors' `backend="pread"` (read, quantized, freed; transformers
    picks pread itself only on MPS/Windows), the ones kept in full precision through the memory map
    (no copy). And while it runs, glibc is told to serve large blocks with mmap, so the freed
    full-precision buffers go back to the OS instead of piling up as heap fragments.
    Measured at the 124M shape in docs/qlora_explained.md.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    check_model_source(name_or_path)
    if getattr(quantization_config, "load_in_4bit", False) and device_map in (None, "cpu", {"": "cpu"}):
        third_party.note_4bit_on_cpu()
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        files = _checkpoint_files(name_or_path, revision)
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from None
    common = dict(quantization_config=quantization_config, dtype=dtype, device_map=device_map,
                  trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if files is None:  # a .bin checkpoint: transformers' own path (torch.load with weights_only=True)
        try:
            return AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, **common)
        except (OSError, ValueError) as err:
            raise _load_error(name_or_path, err) from None
    # The Auto class deep-copies its kwargs (slices cannot be copied), so call the concrete class.
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    handles = []
    state_dict = {}
    try:
        for f in files:
            mapped = safe_open(f, framework="pt", device="cpu")
            read = safe_open(f, framework="pt", device="cpu", backend="pread")
            handles += [mapped, read]
            for key in mapped.keys():
                state_dict[key] = (read if _will_be_quantized(key, mapped.get_slice(key).get_shape())
                                   else mapped).get_slice(key)
        with large_blocks_from_mmap():
            model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **common)
        del state_dict
    finally:
        for h in handles:
            h.__exit__(None, None, None)
    keep_training_layout(model)
    # from_pretrained(None, ...) leaves the name empty; peft records it as the adapter's base_model_name_or_path
    model.config.name_or_path = model.name_or_path = name_or_path
    try:
        model.generation_config = GenerationConfig.from_pretrained(name_or_path, revision=revision)
    except OSError:
        pass  # no generation_config.json: keep the one derived from config.json
    gc.collect()
    release_freed_memory()
    return model


def _will_be_quantized(key: str, shape) -> bool:
    """bitsandbytes quantizes the 2-D weights of the linear layers, not embeddings or the head."""
    return (len(shape) == 2 and key.endswith(".weight")
            and not any(k in key for k in ("wte", "wpe", "embed", "lm_head")))


def keep_training_layout(model) -> None:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights into its CPU inference layout.

    On a CPU with AVX512-BF16, a Linear4bit repacks its weight the first time it runs in eval mode and
    keeps that layout, whose matmul path has no autograd: training after an eval (our eval-before)
    then fails with "a view of a leaf Variable ... in-place operation". The training layout serves
    eval too, with the same numerics as training.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
