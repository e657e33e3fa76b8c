"""Fold a LoRA / QLoRA adapter into its base and save a normal model folder (`toolkit merge`).

The base is always loaded unquantized (fp32 by default), also for a QLoRA adapter: merging into 4-bit
weights re-quantizes W + BA and loses the adapter's small update in the rounding (peft#2321). The
result is a plain GPT2LMHeadModel folder (config.json, model.safetensors, tokenizer) that loads
without peft, and that recipes/lora.py or pretrain.py can start from again.

Before writing, the merged model's logits on a built-in sample text are compared with base + adapter (unmerged, same
dtype); a difference beyond the dtype's tolerance (MERGE_TOLERANCE) refuses the merge and writes nothing, because a
merge that silently changes the model (peft#1388, unsloth#1089) is found only later, by its users. The figure goes
into the merged folder's README.md. `--no_verify` skips the check.
"""

from __future__ import annotations

import os

from toolkit.errors import UserError
from toolkit.inference import adapter_config, adapter_folder

# Largest relative logit difference, max|merged - unmerged| / max|unmerged|, accepted for a merge in each dtype:
# rounding W + BA once to the dtype, a few units of its epsilon (fp32 1.2e-7, bf16 7.8e-3, fp16 9.8e-4) through
# the layers. A merge that drops or mis-scales the adapter's update differs by the update's whole effect.
MERGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.05, "float16": 0.01}
SAMPLE_TEXT = (
    "The old lighthouse keeper climbed the stairs every evening to light the lamp. Ships passing in the night "
    "trusted its beam to guide them past the rocks. One winter, a storm knocked out the power, and he kept the "
    "flame alive by hand until morning.\n\ndef add(a, b):\n    return a + b\n"
)


def sample_ids(tokenizer, max_positions: int):
    """The built-in sample text as a (1, n) batch of token ids, cut to the model's context."""
    import torch

    ids = tokenizer(SAMPLE_TEXT)["input_ids"][:max_positions]
    return torch.tensor([ids])


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _loss(logits, ids) -> float:
    import torch.nn.functional as F

    return F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


def merge_check(merged_logits, reference_logits, ids, dtype: str) -> dict:
    """The merge check's figures; a one-line UserError when the merged logits differ beyond the dtype's tolerance
    (or are not finite)."""
    tolerance = MERGE_TOLERANCE[dtype]
    diff = (merged_logits - reference_logits).abs().max().item()
    relative = diff / max(reference_logits.abs().max().item(), 1e-12)
    figures = {"relative_logit_difference": relative, "tolerance": tolerance, "tokens": ids.shape[1],
               "loss_merged": _loss(merged_logits, ids), "loss_base_plus_adapter": _loss(reference_logits, ids)}
    if not relative <= tolerance:  # also catches NaN
        raise UserError(
            f"merge check failed: the merged model's logits differ from base + adapter by {relative:.3g} (relative; "
            f"tolerance {tolerance:g} for {dtype}), loss on the sample text {figures['loss_merged']:.4f} merged vs "
            f"{figures['loss_base_plus_adapter']:.4f} base + adapter; nothing written. Check the base is the one the "
            "adapter was trained on, try --dtype float32, or pass --no_verify to write it anyway"
        )
    return figures


def merge_adapter(adapter: str, output_dir: str, base_model: str | None = None, dtype: str = "float32",
                  token: str | None = None, overwrite: bool = False, verify: bool = True) -> str:
    """Load base (full precision) + adapter, merge_and_unload, check the merged logits against base + adapter
    (unless verify=False), save_pretrained; return output_dir."""
    import torch

    from toolkit.lora import load_adapter
    from toolkit.model_card import write_merged_model_card
    from toolkit.model_loading import load_model
    from toolkit.tokenizer import load_tokenizer

    if os.path.isfile(os.path.join(output_dir, "config.json")) and not overwrite:
        raise UserError(f"'{output_dir}' already holds a model; "
                        "pass --overwrite_output_dir or choose another --output_dir")
    config = adapter_config(adapter, token)
    folder = adapter_folder(adapter, token)  # a Hub adapter: downloaded once, read here
    if config.get("peft_type") not in (None, "LORA"):
        raise UserError(f"'{adapter}' is a {config.get('peft_type')} adapter; toolkit merge merges LoRA adapters only")
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise UserError("the adapter does not record its base model; pass --base_model_name_or_path")
    model = load_model(base, dtype=getattr(torch, dtype))
    try:
        model = load_adapter(model, folder)
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
    try:  # the adapter folder carries the tokenizer (and chat template) it was trained with
        tokenizer = load_tokenizer(folder)
    except UserError:
        tokenizer = load_tokenizer(base)
    model.eval()
    if verify:
        ids = sample_ids(tokenizer, getattr(model.config, "n_positions", 1024))
        reference = _logits(model, ids)
    merged = model.merge_and_unload()
    figures = merge_check(_logits(merged, ids), reference, ids, dtype) if verify else None
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    write_merged_model_card(output_dir, adapter=adapter, base_model=base, dtype=dtype, check=figures)
    note = (f"; merge check: relative logit difference {figures['relative_logit_difference']:.2g} "
            f"(tolerance {figures['tolerance']:g})" if figures else "; merge check skipped (--no_verify)")
    print(f"merged {adapter} into {base} ({dtype}) -> {output_dir}{note}")
    return output_dir
