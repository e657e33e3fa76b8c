"""The GPT-2 shape the planner's formulas need: from a preset, a config.json (local folder or Hub) and overrides."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from toolkit.errors import UserError
from toolkit.presets import GPT2_VOCAB_SIZE, NEW_MODEL_ACTIVATION, PRESETS, count_parameters, pad_vocab


@dataclass
class Shape:
    """The GPT-2 numbers that memory depends on."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    # Dropout keeps masks for backward. recipes/pretrain.py trains with 0; OpenAI's GPT-2 checkpoints (and
    # GPT2Config's defaults) have 0.1, which fine-tuning keeps.
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    source: str = ""

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def block_params(self) -> int:
        d, f = self.n_embd, self.inner
        # c_attn, attn.c_proj, c_fc, mlp.c_proj, two LayerNorms
        return (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d

    @property
    def block_linear_weights(self) -> int:
        d, f = self.n_embd, self.inner
        return 4 * d * d + 2 * d * f

    @property
    def n_params(self) -> int:
        if self.n_inner in (None, 4 * self.n_embd):
            return count_parameters(self.n_layer, self.n_embd, self.vocab_size, self.n_positions,
                                    self.tie_word_embeddings)
        embed = self.vocab_size * self.n_embd + self.n_positions * self.n_embd
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.n_embd
        return embed + self.n_layer * self.block_params + 2 * self.n_embd + head



def load_shape(model: str, task: str, overrides: dict | None = None, vocab_size: int | None = None,
               pad_vocab_to_multiple_of: int = 64) -> Shape:
    """A preset name, a local folder/config.json, or a Hub name whose config.json can be fetched."""
    overrides = dict(overrides or {})
    if model in PRESETS:
        fields = dict(PRESETS[model])
        # Pretraining pads the vocabulary like recipes/pretrain.py; a pretrained Hub GPT-2 has exactly 50257 rows.
        vocab = vocab_size or GPT2_VOCAB_SIZE
        vocab = pad_vocab(vocab, pad_vocab_to_multiple_of) if task == "pretrain" else vocab
        # A new model (presets.build_gpt2_config): dropout 0 and the fused tanh-GELU; the Hub checkpoints of the
        # same names: dropout 0.1 and transformers' 8-op "gelu_new".
        new = task == "pretrain"
        drop = 0.0 if new else 0.1
        shape = Shape(vocab_size=vocab, source=f"preset {model}", resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop,
                      activation_function=NEW_MODEL_ACTIVATION if new else "gelu_new", **fields)
    else:
        shape = shape_from_config(_read_config(model), model)
        if vocab_size:
            shape.vocab_size = vocab_size
    known = {"n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_inner", "activation_function",
             "tie_word_embeddings", "resid_pdrop", "embd_pdrop", "attn_pdrop"}
    for key, value in overrides.items():
        if key in known and value is not None:
            setattr(shape, key, value)
    if shape.n_embd % shape.n_head:
        raise UserError(f"n_embd={shape.n_embd} is not divisible by n_head={shape.n_head}; "
                        f"pick n_head dividing n_embd")
    return shape


def _read_config(model: str) -> dict:
    path = model
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read '{path}' as a config.json ({err}); pass a save_pretrained folder "
                            f"or a preset") from None
    if os.path.sep in model or model.startswith("."):
        raise UserError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}) nor an existing "
                        f"folder/config.json; check the path")
    from huggingface_hub import hf_hub_download

    for local_only in (True, False):  # the local Hub cache first: works offline and costs no request
        try:
            with open(hf_hub_download(model, "config.json", local_files_only=local_only), encoding="utf-8") as f:
                return json.load(f)
        except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated: all mean "cannot get the config here"
            error = err
    raise UserError(f"cannot fetch config.json of '{model}' from the Hub ({type(error).__name__}); pass a preset "
                    f"({', '.join(PRESETS)}) or a local folder with config.json") from None


def shape_from_config(cfg: dict, source: str) -> Shape:
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"'{source}' is a {cfg.get('model_type')} model; the planner's formulas are for GPT-2 "
                        f"(model_type gpt2)")
    try:
        return Shape(n_layer=int(cfg["n_layer"]), n_embd=int(cfg["n_embd"]), n_head=int(cfg["n_head"]),
                     vocab_size=int(cfg["vocab_size"]), n_positions=int(cfg.get("n_positions", 1024)),
                     n_inner=cfg.get("n_inner"), activation_function=cfg.get("activation_function", "gelu_new"),
                     tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), source=source,
                     **{k: float(cfg.get(k, 0.1)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")})
    except KeyError as err:
        raise UserError(f"config.json of '{source}' has no {err}; it is not a GPT-2 config") from None
