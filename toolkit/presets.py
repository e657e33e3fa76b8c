"""GPT-2 model presets, overrides and validation.

The four OpenAI sizes plus three small presets that train usefully on a CPU in minutes. Every field
can be overridden (`--n_layer 48 --n_head 16 --n_embd 1600`, or run_clm.py's
`--config_overrides "n_embd=256,n_head=4"`).

Vocabulary padding: the embedding/head is padded up to a multiple of 64 by default
(`--pad_vocab_to_multiple_of`), so the head's matmul tiles line up on GPUs (nanoGPT's 50304 for 50257); the extra
rows are never targets, so training pushes their logits down and generation never picks them. Set it to 1 to get
the exact OpenAI shape (124,439,808 parameters).
"""

from __future__ import annotations

import math

from toolkit.errors import UserError

# n_positions is the context length the position table is built for; block_size <= n_positions.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2-nano": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),  # tests: seconds
    "gpt2-micro": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256),  # CPU default: minutes
    "gpt2-mini": dict(n_layer=6, n_head=6, n_embd=384, n_positions=256),  # nanoGPT's "baby GPT"
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, n_positions=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, n_positions=1024),  # 1.5B
}
GPT2_VOCAB_SIZE = 50257
# GPT-2's tanh-approximated GELU as one fused kernel (transformers' "gelu_new" is the same function in 8 ops);
# toolkit/plan/ uses this constant to plan activation memory for new models.
NEW_MODEL_ACTIVATION = "gelu_pytorch_tanh"


def pad_vocab(vocab_size: int, multiple: int) -> int:
    multiple = max(1, int(multiple))
    return int(math.ceil(vocab_size / multiple) * multiple)


def parse_config_overrides(text: str | None) -> dict[str, object]:
    """run_clm.py's `--config_overrides "n_embd=10,resid_pdrop=0.2"` -> {'n_embd': 10, 'resid_pdrop': 0.2}."""
    out: dict[str, object] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise UserError(f"--config_overrides item '{item}' is not key=value; write e.g. 'n_embd=256,n_head=4'")
        key, value = (s.strip() for s in item.split("=", 1))
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def preset_fields(name: str) -> dict[str, int]:
    if name not in PRESETS:
        raise UserError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)} "
                        "(or pass --model_name_or_path)")
    return dict(PRESETS[name])


def validate_config(config, block_size: int | None = None, tokenizer_size: int | None = None) -> None:
    """Checks that make a GPT-2 config trainable; each failure names the fix."""
    if config.n_embd % config.n_head != 0:
        raise UserError(
            f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}; pick n_head dividing n_embd "
            f"(e.g. --n_head {math.gcd(config.n_embd, 64) or 1})"
        )
    if block_size is not None and block_size > config.n_positions:
        raise UserError(
            f"block_size={block_size} is larger than the model's n_positions={config.n_positions}; "
            f"lower --block_size or raise --n_positions (only for a model trained from scratch)"
        )
    if tokenizer_size is not None and tokenizer_size > config.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer_size} tokens but the model's vocab_size is {config.vocab_size}; "
            f"use the tokenizer the model was trained with (--tokenizer_name) or a larger --vocab_size"
        )


# Peak learning rate by model width when the user gives none: one value for all widths would be too high for the
# large models or too low for the small ones. Up to 256 wide the best value at a fixed CPU budget (docs/benchmarks.md
# section 3), 1e-3 nanoGPT's for its 384-wide "baby GPT", GPT-2's sizes the GPT-3 paper's (table 2.1) for the same
# widths.
LEARNING_RATE_BY_WIDTH = ((256, 3e-3), (512, 1e-3), (768, 6e-4), (1024, 3e-4), (1280, 2.5e-4))
LARGEST_WIDTH_LEARNING_RATE = 2e-4


def default_learning_rate(n_embd: int) -> float:
    """Peak AdamW learning rate for a GPT-2 of this width (see LEARNING_RATE_BY_WIDTH)."""
    return next((lr for width, lr in LEARNING_RATE_BY_WIDTH if n_embd <= width), LARGEST_WIDTH_LEARNING_RATE)


# The optimizer by model width when the user gives none: Muon (toolkit/muon.py) up to 256 wide (gpt2-nano,
# gpt2-micro), where it beats AdamW at the same CPU time; wider, its Newton-Schulz iterations, a cost per matrix and
# not per token, outweigh its gain at CPU batch sizes (docs/benchmarks.md section 3), and GPT-2's sizes keep AdamW
# until Muon is measured there on a GPU (the GPU acceptance kit). recipes/onefile_train.py repeats this rule.
MUON_UP_TO_WIDTH = 256


def default_optimizer(n_embd: int) -> str:
    return "muon" if n_embd <= MUON_UP_TO_WIDTH else "adamw"


# LoRA's dropout on the adapted inputs when the user gives none: 0, peft's own default. Each adapted layer otherwise
# draws a mask and keeps a dropped copy of its input, a cost in time and memory (docs/benchmarks.md section 4,
# lora+dropout) for a regularizer short fine-tunes rarely need (--lora_dropout 0.05 or 0.1, the QLoRA paper's, for
# long runs on little data). `toolkit plan` assumes the same.
LORA_DROPOUT = 0.0


def build_gpt2_config(
    preset: str,
    vocab_size: int,
    overrides: dict[str, object] | None = None,
    pad_vocab_to_multiple_of: int = 64,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
):
    """A GPT2Config for training from scratch: preset, then overrides; dropout 0 unless overridden
    (no dropout is the better choice for single-pass pretraining, as in nanoGPT)."""
    from transformers import GPT2Config

    fields: dict[str, object] = preset_fields(preset)  # no vocab_size: it comes from the tokenizer
    fields.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    # GPT-2's tanh-approximated GELU, computed by one fused kernel instead of transformers' 8-op "gelu_new" (the same
    # function to 5e-7, fewer passes over the activations: docs/benchmarks.md section 2).
    fields["activation_function"] = NEW_MODEL_ACTIVATION
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in GPT2Config().to_dict() and key not in ("n_layer", "n_head", "n_embd", "n_positions"):
            raise UserError(f"unknown GPT-2 config field '{key}' in overrides; "
                            "valid fields are those of transformers.GPT2Config")
        fields[key] = value
    # an overridden vocab_size is a floor: the model needs at least the tokenizer's rows
    fields["vocab_size"] = pad_vocab(max(vocab_size, int(fields.get("vocab_size") or 0)), pad_vocab_to_multiple_of)
    if bos_token_id is not None:
        fields["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        fields["eos_token_id"] = eos_token_id
    config = GPT2Config(**fields)
    validate_config(config)
    return config


def pretrain_config(model_args, tokenizer, block_size: int):
    """recipes/pretrain.py's model config: a pretrained model's or --config_name's config.json, or a preset with the
    shape flags given, then --config_overrides over them (as toolkit/preflight.py plans it); checked for training
    on blocks of block_size with this tokenizer, and block_size saved in it (`toolkit eval` scores windows of it)."""
    from transformers import AutoConfig

    source = model_args.model_name_or_path or model_args.config_name
    if source:
        config = AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    else:
        overrides = {k: getattr(model_args, k) for k in ("n_layer", "n_head", "n_embd", "n_positions")
                     if getattr(model_args, k) is not None}
        overrides.update(parse_config_overrides(model_args.config_overrides))
        if model_args.dropout is not None:
            overrides.update(resid_pdrop=model_args.dropout, embd_pdrop=model_args.dropout,
                             attn_pdrop=model_args.dropout)
        config = build_gpt2_config(model_args.preset, len(tokenizer), overrides, model_args.pad_vocab_to_multiple_of,
                                   bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    validate_config(config, block_size, len(tokenizer))
    config.training_block_size = block_size
    return config


def fill_width_defaults(training_args, n_embd: int, fsdp: bool) -> None:
    """The peak learning rate and the optimizer by model width when the user gave none (--optim auto); Muon never
    under FSDP."""
    if training_args.learning_rate is None:
        training_args.learning_rate = default_learning_rate(n_embd)
    if training_args.optim_auto:
        training_args.muon = default_optimizer(n_embd) == "muon" and not fsdp


def count_parameters(n_layer: int, n_embd: int, vocab_size: int, n_positions: int, tied: bool = True) -> int:
    """Exact parameter count of GPT2LMHeadModel (tied head by default).

    wte V*d + wpe P*d + per block (2 LayerNorms, c_attn, attn c_proj, c_fc, mlp c_proj) 12d^2 + 13d + ln_f 2d.
    """
    d = n_embd
    total = vocab_size * d + n_positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d
    return total if tied else total + vocab_size * d
