"""LoRA for GPT-2: target modules, the peft LoraConfig, and loading the base (full precision or 4/8-bit).

GPT-2's projections are `transformers.pytorch_utils.Conv1D` (a Linear whose weight is stored
transposed, [in, out]): c_attn (q,k,v fused), attn.c_proj, mlp.c_fc, mlp.c_proj. peft handles
Conv1D with `fan_in_fan_out=True`. bitsandbytes turns them into ordinary `Linear4bit`/`Linear8bitLt`
layers ([out, in]) when it quantizes, so a QLoRA adapter uses `fan_in_fan_out=False`; the adapter
matrices A [r, in] and B [out, r] are the same either way, so an adapter moves freely between a
quantized and a full-precision base (peft flips the flag with a warning when it must).

The embedding and the head are tied in GPT-2 (one matrix, 38.6M of the 124M parameters). Training
them (`--lora_train_embeddings`) puts both in peft's `modules_to_save` with `ensure_weight_tying`, so
they stay one matrix; the adapter file then holds a full copy of it.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import TYPE_CHECKING

from toolkit import third_party
from toolkit.cpu_allocator import large_blocks_from_mmap, release_freed_memory
from toolkit.distributed import fsdp_requested
from toolkit.errors import UserError
from toolkit.hub import is_local_path

if TYPE_CHECKING:
    from toolkit.args.finetune import LoraArguments, QuantizationArguments

# Named target sets for GPT-2 (module name suffixes, as peft matches them).
TARGET_PRESETS: dict[str, list[str]] = {
    "all": ["c_attn", "c_proj", "c_fc"],  # every projection: attention q/k/v + output, MLP in + out
    "attention": ["c_attn", "attn.c_proj"],  # attention only (the original LoRA paper's choice: q,k,v,o)
    "attention-qv": ["c_attn"],  # just the fused q/k/v projection
    "mlp": ["c_fc", "mlp.c_proj"],
}
GPT2_PROJECTIONS = ("c_attn", "c_proj", "c_fc")


def resolve_target_modules(names: list[str] | str) -> list[str]:
    """Expand presets; keep explicit module names."""
    names = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for name in names:
        for item in name.split(","):
            item = item.strip()
            if item:
                out.extend(TARGET_PRESETS.get(item, [item]))
    return list(dict.fromkeys(out))


def check_target_modules(model, targets: list[str]) -> None:
    """Every target must match at least one module (peft's own error lists none of the valid names)."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and not list(m.children())})
        raise UserError(
            f"--lora_target_modules {' '.join(missing)} matches no module of this model; use a preset "
            f"({', '.join(TARGET_PRESETS)}) or module names such as {', '.join(GPT2_PROJECTIONS)} "
            f"(this model's layers: {', '.join(leaves)})"
        )


def build_lora_config(args: LoraArguments, model, quantized: bool):
    """The peft LoraConfig for GPT-2: Conv1D fan_in_fan_out unless bitsandbytes replaced the layers."""
    from peft import LoraConfig

    if args.lora_r < 1:
        raise UserError(f"--lora_r {args.lora_r} must be at least 1; typical values are 8-64")
    targets = resolve_target_modules(args.lora_target_modules)
    check_target_modules(model, targets)
    modules_to_save = None
    if args.lora_train_embeddings:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        names = {m: n.split(".")[-1] for n, m in model.named_modules()}
        modules_to_save = [names[inp]] + ([names[out]] if out is not None else [])
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=not quantized,
        bias="none",
        use_rslora=args.use_rslora,
        modules_to_save=modules_to_save,
        # GPT-2 ties head and embedding: train them as one matrix, as the base has them.
        ensure_weight_tying=bool(modules_to_save) and getattr(model.config, "tie_word_embeddings", True),
    )


def load_adapter(model, adapter: str, token: str | None = None):
    """peft's PeftModel.from_pretrained with `fan_in_fan_out` set for the layers this base has: a QLoRA adapter
    (trained on bitsandbytes' Linear layers) on a full-precision GPT-2 (Conv1D layers) needs True, a LoRA adapter on
    a 4-bit base False. peft flips it itself too, but with a warning on every load."""
    from peft import PeftConfig, PeftModel
    from transformers.pytorch_utils import Conv1D

    config = PeftConfig.from_pretrained(adapter, token=token)
    if hasattr(config, "fan_in_fan_out"):
        config.fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())
    return PeftModel.from_pretrained(model, adapter, config=config, token=token)


def trainable_parameters_line(model) -> str:
    """'trainable params: 589,824 (0.47% of the base's 124.4M)'; 4-bit weights counted at their real size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = 0
    for name, p in model.named_parameters():
        if "lora_" in name or "modules_to_save." in name:
            continue  # adapter weights and peft's trainable copies are not part of the base
        # a packed 4-bit Params4bit holds 2 weights per byte, and bnb reports the packed numel
        base += p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()
    return f"trainable params: {trainable:,} ({100 * trainable / max(base, 1):.2f}% of the base's {_human(base)})"


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


# ---------------------------------------------------------------------------------------------------
# Loading the base model
# ---------------------------------------------------------------------------------------------------


def default_base_model() -> str:
    """The base when none is given: the main job's output (`python recipes/pretrain.py` writes out/pretrain) if it
    exists, else the Hub's gpt2; offline without either, a one-line error with the commands to run."""
    from toolkit.args.pretrain import DEFAULT_OUTPUT_DIR

    if os.path.isfile(os.path.join(DEFAULT_OUTPUT_DIR, "config.json")):
        print(f"base: no --model_name_or_path given: fine-tuning {DEFAULT_OUTPUT_DIR} "
              "(written by recipes/pretrain.py)")
        return DEFAULT_OUTPUT_DIR
    from transformers.utils import cached_file

    try:
        cached_file("gpt2", "config.json")
    except OSError:
        raise UserError(f"no base model: pass --model_name_or_path, or run `python recipes/pretrain.py` (it writes "
                        f"{DEFAULT_OUTPUT_DIR}) and then `python {os.path.relpath(sys.argv[0])}` again; the other "
                        "default, the Hub's gpt2, cannot be reached from here") from None
    print(f"base: no --model_name_or_path given and no {DEFAULT_OUTPUT_DIR}: fine-tuning the Hub's gpt2")
    return "gpt2"


def check_base_model(name_or_path: str | None) -> str:
    """A base is a Hub name or a save_pretrained folder (pretrain.py / onefile_train.py outputs are)."""
    if not name_or_path:
        raise UserError("no base model; pass --model_name_or_path "
                        "(a Hub name such as gpt2, or a save_pretrained folder)")
    if is_local_path(name_or_path):
        if not os.path.isdir(name_or_path):
            raise UserError(
                f"base model folder '{name_or_path}' does not exist; pass a save_pretrained folder "
                f"(e.g. the --output_dir of recipes/pretrain.py) or a Hub name such as gpt2"
            )
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise UserError(
                f"'{name_or_path}' has no config.json, so it is not a model folder; pass the folder that "
                f"save_pretrained wrote (config.json + model.safetensors)"
            )
    return name_or_path


def _from_pretrained_error(name_or_path: str, err: Exception) -> UserError:
    return UserError(
        f"could not load base model '{name_or_path}' ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
        f"pass a local save_pretrained folder or a Hub name reachable from this machine"
    )


def load_base_model(name_or_path: str, dtype=None, revision: str = "main", trust_remote_code: bool = False,
                    attn_implementation: str | None = None, device_map=None):
    """The base in full precision (fp32 unless `dtype`), for LoRA and for merging."""
    import torch
    from transformers import AutoModelForCausalLM

    check_base_model(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype or torch.float32, revision=revision, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, device_map=device_map,
        )
    except (OSError, ValueError) as err:
        raise _from_pretrained_error(name_or_path, err) from None


def compute_dtype(name: str = "auto"):
    """bf16 where the GPU has it; fp32 on CPU (bf16 matmuls are ~20x slower on a CPU without AMX)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def bnb_config(args: QuantizationArguments, dtype, fsdp: bool = False):
    """transformers' BitsAndBytesConfig: NF4 + double quantization by default, or 8-bit."""
    import torch
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        if fsdp:
            raise UserError(
                "8-bit (LLM.int8) weights cannot be sharded by FSDP; drop --load_in_8bit to use 4-bit with "
                "FSDP, or launch with DDP (each rank holds the whole 8-bit model)"
            )
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = args.bnb_4bit_quant_storage
    if fsdp:
        # FSDP shards only floating tensors, and its mixed-precision cast must be a no-op on the packed
        # bytes: storage dtype == model dtype, or training silently gives loss 0 / NaN (accelerate#3983).
        wanted = str(dtype).replace("torch.", "")
        if storage not in (None, wanted):
            raise UserError(
                f"under FSDP --bnb_4bit_quant_storage must equal the model dtype ({wanted}), got {storage}; "
                f"drop the flag (it is set automatically) or pass --bnb_4bit_quant_storage {wanted}"
            )
        storage = wanted
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=getattr(torch, storage) if storage else torch.uint8,
    )


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


def load_quantized_base_model(name_or_path: str, quantization_config, dtype, device_map, revision: str = "main",
                              trust_remote_code: bool = False, attn_implementation: str | None = None):
    """The base quantized by bitsandbytes while it loads, one tensor at a time.

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

    check_base_model(name_or_path)
    if getattr(quantization_config, "load_in_4bit", False) and device_map in (None, "cpu", {"": "cpu"}):
        third_party.note_4bit_on_cpu()
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        files = _checkpoint_files(name_or_path, revision)
    except (OSError, ValueError) as err:
        raise _from_pretrained_error(name_or_path, err) from None
    common = dict(quantization_config=quantization_config, dtype=dtype, device_map=device_map,
                  trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if files is None:  # a .bin checkpoint: transformers' own path (torch.load with weights_only=True)
        try:
            return AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, **common)
        except (OSError, ValueError) as err:
            raise _from_pretrained_error(name_or_path, err) from None
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


def device_map_for_this_rank():
    """The whole model on this process's own device: {'': local_rank} under DDP, never 'auto' (trl#921)."""
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def prepare_quantized_model(model, training_args):
    """peft's prepare_model_for_kbit_training: freeze the base, upcast the non-quantized layers (LayerNorms,
    embeddings) to fp32 for stable training, and turn on non-reentrant activation checkpointing if asked.
    Skipped under FSDP, which needs every parameter in the one dtype the 4-bit storage uses."""
    from peft import prepare_model_for_kbit_training

    if fsdp_requested(training_args):
        return model
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=bool(training_args.activation_checkpointing),
        gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs or {"use_reentrant": False},
    )


def quantization_summary(args: QuantizationArguments, dtype) -> dict:
    """For the model card."""
    if args.load_in_8bit:
        return {"quantization": "bitsandbytes 8-bit (LLM.int8)"}
    return {"quantization": f"bitsandbytes 4-bit {args.bnb_4bit_quant_type}",
            "double_quantization": args.use_bnb_nested_quant,
            "compute_dtype": str(dtype).replace("torch.", "")}
