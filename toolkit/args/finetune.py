"""The options of recipes/lora.py and recipes/qlora.py (qlora.py is lora.py with --load_in_4bit and its defaults).

Names follow trl (ModelConfig, ScriptArguments, SFTConfig) and transformers' BitsAndBytesConfig; --train_file is
run_clm.py's. Defaults that depend on the machine or on the recipe come from `toolkit.args.resolve_defaults`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from toolkit.args import guard as guard_options
from toolkit.presets import LORA_DROPOUT


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base GPT-2: Hub name (gpt2, gpt2-medium) or save_pretrained folder (pretrain.py output)."},
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the base."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the base model's)."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager / sdpa (default: transformers' choice)."}
    )
    base_model_hub_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base when --model_name_or_path is a local folder (for the model card)."},
    )


@dataclass
class DataArguments:
    """Where the fine-tuning data comes from (trl ScriptArguments names plus run_clm.py's --train_file)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset name or local dataset folder (datasets.load_dataset)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Dataset configuration name."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on, when the dataset has it."}
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "A .txt / .json / .jsonl / .csv / .parquet file. Default, with no "
                          "--dataset_name either: the embedded Python documentation corpus as plain text."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Held-out file; default: split off the training data."}
    )
    validation_split_percentage: float = field(
        default=5,
        metadata={"help": "Percent of the training examples held out for eval when there is no validation set."},
    )
    text_sample_by: str = field(
        default="paragraph",
        metadata={"help": "How a .txt file is cut into examples (each ends with EOS).",
                  "choices": ["paragraph", "line", "document"]},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on only the first N held-out examples."}
    )


@dataclass
class LoraArguments:
    """LoRA hyperparameters (names as in trl's ModelConfig)."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(
        default=LORA_DROPOUT,
        metadata={"help": "Dropout on the LoRA branch input (default 0, peft's: dropout's masks and copies cost "
                          "2-15%% of a CPU step; 0.05-0.1 regularizes long runs on little data)."},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={
            "help": "Modules to adapt: a preset (all = c_attn c_proj c_fc; attention = c_attn attn.c_proj; "
            "attention-qv = c_attn; mlp = c_fc mlp.c_proj) or module names, e.g. c_attn attn.c_proj."
        },
    )
    lora_train_embeddings: bool = field(
        default=False,
        metadata={"help": "Also train the token embedding and the (tied) LM head in full (peft modules_to_save)."},
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized LoRA: scale by alpha / sqrt(r)."})


@dataclass
class QuantizationArguments:
    """bitsandbytes settings for QLoRA (names as in trl's ModelConfig / transformers' BitsAndBytesConfig)."""

    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Quantize the frozen base to 4 bits while it loads (QLoRA; recipes/qlora.py turns it on)."},
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8-bit (LLM.int8) instead of 4-bit."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]})
    use_bnb_nested_quant: bool = field(
        default=True,
        metadata={"help": "Double quantization: quantize the per-block scales too (~0.37 bit/param saved)."},
    )
    bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the dequantized matmuls: auto = bfloat16 on GPUs that support it, else float32.",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    bnb_4bit_quant_storage: str | None = field(
        default=None,
        metadata={"help": "dtype the packed 4-bit weights are stored in (default uint8; under FSDP it must equal "
                  "the model dtype and is set automatically)."},
    )


@dataclass
class FinetuneConfig(SFTConfig):
    """trl's SFTConfig with the recipe's own output options. Defaults that depend on the machine or on the recipe
    (bf16, activation checkpointing, paged AdamW, output_dir) come from toolkit.args.resolve_defaults."""

    output_dir: str | None = field(
        default="out/lora", metadata={"help": "Where the adapter, tokenizer, card and metrics go."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a finished run in output_dir."})
    learning_rate: float = field(
        default=2e-4, metadata={"help": "AdamW learning rate (LoRA usually wants 1e-4..3e-4)."}
    )
    bf16: bool = field(
        default=False, metadata={"help": "bf16 mixed precision (default: on with a bf16 GPU, off on CPU)."}
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass. Default: on with CUDA and for qlora.py; "
                          "lora.py on CPU: off, for faster steps (docs/benchmarks.md section 4b)."},
    )
    activation_checkpointing_kwargs: dict | str | None = field(
        default_factory=lambda: {"use_reentrant": False},  # reentrant checkpointing breaks with frozen inputs (peft)
        metadata={"help": "Keyword arguments of torch.utils.checkpoint (JSON)."},
    )
    packing: bool | None = field(
        default=None, metadata={"help": "Pack examples into max_length blocks (default: on for plain text)."}
    )
    packing_strategy: str = field(
        default="wrapped", metadata={"help": "trl packing strategy.", "choices": ["wrapped", "bfd", "bfd_split"]}
    )
    optim: str = field(
        default="adamw_torch",
        metadata={"help": "Optimizer (default: paged_adamw_32bit for QLoRA on CUDA, else adamw_torch)."},
    )
    save_strategy: str = field(default="no", metadata={"help": "Checkpoints during training: no / steps / epoch."})
    report_to: str | None = field(default="none", metadata={"help": "Loggers: none, tensorboard, wandb, ..."})
    cpu_keep_freed_memory: bool = field(
        default=True,
        metadata={"help": "On CPU: tell glibc to keep freed memory for the next step instead of unmapping it and "
                          "faulting it in again (faster steps, more peak RSS; docs/benchmarks.md section 4). Default: "
                          "on for lora.py, off for qlora.py (memory first). Ignored on GPU, under FSDP and when "
                          "MALLOC_* or GLIBC_TUNABLES is set."},
    )
    token_metrics: bool = field(
        default=False,
        metadata={"help": "Also log per-token entropy and top-1 accuracy (trl's fused LM head, which computes the "
                          "head again in the backward pass: slower steps; off by default)."},
    )
    skip_memory_check: bool = field(
        default=False,
        metadata={"help": "Start even when `toolkit plan`'s formulas say the run does not fit the memory (GPU memory "
                          "or the CPU RAM available); by default the recipe stops before any work with what it needs, "
                          "what there is and the planner's fix (toolkit/preflight.py)."},
    )
    sample_prompt: str | None = field(
        default=None, metadata={"help": "Prompt for the generated sample (default: from the eval data)."}
    )
    sample_max_new_tokens: int = field(default=40, metadata={"help": "Length of the generated sample."})
    on_spike: str = guard_options.on_spike()
    spike_threshold: float = guard_options.spike_threshold()
    max_rollbacks: int = guard_options.max_rollbacks()
