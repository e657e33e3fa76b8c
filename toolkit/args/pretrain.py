"""The options of recipes/pretrain.py (and of recipes/onefile_train.py, which mirrors them).

Flag names follow transformers' run_clm.py where one exists. Defaults that depend on the machine (bf16 on GPUs)
come from `toolkit.args.resolve_defaults`, settings derived from other options from `derive_settings` and the
model's shape and vocabulary left unset from `resolve_model_shape`: the recipe calls them where a reader sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from toolkit.args import guard as guard_options

DEFAULT_OUTPUT_DIR = "out/pretrain"  # the main job's output; lora.py / qlora.py fine-tune it when given no base
DEFAULT_PRESET = "gpt2-micro"  # minutes on a CPU
GPT2_SHAPE_PRESET = "gpt2"  # what shape flags without --preset start from
DEFAULT_BPE_VOCAB = 4096  # the trained BPE's size for the CPU presets (docs/benchmarks.md section 3)
MUON = "muon"


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Continue training a pretrained GPT-2 (Hub name or local save_pretrained folder). "
                          "Leave empty to train from scratch from --preset."},
    )
    preset: Optional[str] = field(
        default=None,
        metadata={"help": "Model size when training from scratch: gpt2-nano, gpt2-micro, gpt2-mini (CPU-sized), "
                          "gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl. `toolkit presets` lists them. Default: "
                          "gpt2-micro; with --n_layer/--n_head/--n_embd, gpt2 (GPT-2's 1,024 positions and "
                          "50,257-token vocabulary under the given shape)."},
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "A config.json folder or Hub name to train from scratch instead of --preset."}
    )
    config_overrides: Optional[str] = field(
        default=None, metadata={"help": "run_clm.py style overrides of the model config: 'n_embd=256,n_head=4'."}
    )
    n_layer: Optional[int] = field(default=None, metadata={"help": "Override the number of transformer blocks."})
    n_head: Optional[int] = field(default=None, metadata={"help": "Override the number of attention heads."})
    n_embd: Optional[int] = field(default=None, metadata={"help": "Override the hidden size (divisible by n_head)."})
    n_positions: Optional[int] = field(
        default=None, metadata={"help": "Override the context length of the position table."}
    )
    dropout: Optional[float] = field(
        default=None,
        metadata={"help": "Dropout for residual, embedding and attention (default 0: best for pretraining)."},
    )
    tokenizer_name: Optional[str] = field(
        default=None,
        metadata={"help": "Tokenizer (Hub name or folder, e.g. ../shared/data/gpt2-tokenizer). Default: the model's "
                          "own with --model_name_or_path; GPT-2's (gpt2) for a GPT-2 shape (shape flags without "
                          "--preset) when the local Hub cache has it, else a byte-level BPE of --vocab_size trained "
                          "on the training text."},
    )
    vocab_size: Optional[int] = field(
        default=None,
        metadata={"help": "Vocabulary size of the BPE trained when no tokenizer is given. Default: 4096; 50257 "
                          "(GPT-2's) for a GPT-2 shape, whose model then keeps GPT-2's 50,257 rows even when the BPE "
                          "ends up with fewer tokens."},
    )
    pad_vocab_to_multiple_of: int = field(
        default=64,
        metadata={"help": "Pad the embedding/head rows to a multiple of this (faster GPU matmuls); 1 = no padding."},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention kernel: sdpa (fused) or eager."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the Hub to run (off by default)."}
    )
    gpt2_shape: bool = field(default=False, init=False,
                             metadata={"help": "Set when shape flags chose GPT-2 (toolkit.args.resolve_model_shape)."})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A Hub dataset name (datasets.load_dataset)."})
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "The Hub dataset's configuration name."}
    )
    train_file: Optional[str] = field(
        default=None,
        metadata={"help": "Local training data: a .txt (the whole file is one document), .json/.jsonl/.parquet/.csv "
                          "(one document per row, column --text_column), or a folder of such files. "
                          "Default (no dataset given): the embedded Python documentation corpus (~465k characters)."},
    )
    validation_file: Optional[str] = field(default=None, metadata={"help": "Local validation data, same formats."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text in tabular data."})
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "Percent held out when no validation data is given: every round(100/P)-th document (up to "
                          "--validation_max_tokens), or the last P%% of tokens of a single document."},
    )
    block_size: int = field(
        default=128, metadata={"help": "Tokens per training sequence (packed, EOS between documents)."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the Hub dataset instead of downloading it (needs --max_steps and "
                          "--tokenizer_name)."},
    )
    streaming_eval_blocks: int = field(
        default=64, metadata={"help": "With --streaming: blocks taken from the start of the stream for evaluation."}
    )
    data_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where packed token blocks are cached (default ~/.cache/gpt2-toolkit/packed)."}
    )
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for tokenization."})
    token_store: str | None = field(
        default=None,
        metadata={"help": "Train from a token store made by `toolkit prepare` (a folder with manifest.json; its "
                          "shards are memory-mapped, nothing is tokenized). A --train_file that is such a folder "
                          "works too. Default tokenizer: the store's own. Layout and costs: "
                          "docs/pretraining_at_scale.md."},
    )
    validation_max_tokens: int = field(
        default=5_000_000,
        metadata={"help": "When validation documents are held out of the training data (no --validation_file): stop "
                          "holding them out once validation has this many tokens."},
    )


@dataclass
class PretrainArguments(TrainingArguments):
    """transformers.TrainingArguments with defaults for GPT-2 pretraining and a few additions."""

    output_dir: Optional[str] = field(
        default=DEFAULT_OUTPUT_DIR, metadata={"help": "Where the model, checkpoints and logs go."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into an output_dir that already holds a run (otherwise refused)."},
    )
    max_steps: int = field(
        default=400, metadata={"help": "Optimizer steps to train (overrides num_train_epochs when > 0)."}
    )
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Sequences per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Sequences per device per eval batch."})
    learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": "Peak learning rate (after warmup). Default by model width: 3e-3 up to 256 wide (best for "
                          "the default gpt2-micro on CPU, docs/benchmarks.md section 3), 1e-3 up to 512, then GPT-3's "
                          "values: 6e-4 for gpt2 (768), 3e-4 for 1024, 2.5e-4 for 1280, 2e-4 for 1600."},
    )
    warmup_steps: float = field(default=50, metadata={"help": "Linear warmup steps (or a ratio in [0, 1))."})
    lr_scheduler_type: str = field(
        default="cosine_with_min_lr", metadata={"help": "Decay after warmup (cosine down to 10%% by default)."}
    )
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (not applied to biases and LayerNorms)."}
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (0.95 as in GPT-3/nanoGPT)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    optim: str = field(
        default="auto",
        metadata={"help": "Optimizer: muon (Muon for the hidden matrices + AdamW for the rest, toolkit/muon.py; 1 "
                          "process or DDP) or any of transformers' OptimizerNames (adamw_torch_fused: fused AdamW). "
                          "Default (auto): muon up to 256 wide (gpt2-nano, gpt2-micro; docs/benchmarks.md section "
                          "3), fused AdamW from gpt2-mini up and under FSDP."},
    )
    muon: bool = field(default=False, init=False, metadata={"help": "Set from --optim muon."})
    on_spike: str = guard_options.on_spike()
    spike_threshold: float = guard_options.spike_threshold()
    max_rollbacks: int = guard_options.max_rollbacks()
    optim_auto: bool = field(default=False, init=False, metadata={"help": "Set when --optim was left to auto."})
    muon_learning_rate: float = field(
        default=0.05,
        metadata={"help": "Peak learning rate of Muon's hidden matrices with --optim muon (the rest keeps "
                          "--learning_rate; one schedule scales both)."},
    )
    logging_steps: float = field(default=10, metadata={"help": "Log loss, lr, tokens/s and MFU every N steps."})
    eval_strategy: str = field(
        default="steps", metadata={"help": "When to evaluate.", "choices": ["no", "steps", "epoch"]}
    )
    eval_steps: Optional[float] = field(default=200, metadata={"help": "Evaluate every N steps."})
    save_strategy: str = field(
        default="steps", metadata={"help": "When to checkpoint.", "choices": ["no", "steps", "epoch", "best"]}
    )
    save_steps: float = field(default=200, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    dataloader_drop_last: bool = field(
        default=True, metadata={"help": "Drop the last partial batch of an epoch (fixed shapes)."}
    )
    report_to: Optional[str] = field(
        default="tensorboard", metadata={"help": "Loggers: tensorboard, none, wandb, ..."}
    )
    bf16: bool = field(
        default=False,
        metadata={"help": "bf16 mixed precision. Default: on for GPUs that support it, off (fp32) on CPU "
                          "(toolkit.args.resolve_defaults)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for initialisation and data order."})
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "A checkpoint folder to continue from, or 'auto' for the newest one in output_dir."},
    )
    ddp_timeout: int = field(
        default=600,
        metadata={"help": "Seconds a rank waits in a collective before giving up (a dead peer's closed socket fails "
                          "at once)."},
    )
    ddp_find_unused_parameters: Optional[bool] = field(
        default=False,
        metadata={"help": "GPT-2 uses every parameter each step, so DDP need not search for unused ones."},
    )
    global_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Sequences per optimizer step over all processes; sets gradient_accumulation_steps so the "
                          "run is the same on 1 or N processes. Must be divisible by per_device_train_batch_size x "
                          "world size."},
    )
    cpu_keep_freed_memory: bool = field(
        default=True,
        metadata={"help": "On CPU: tell glibc to keep freed memory for the next step instead of unmapping it and "
                          "faulting it in again (20-30%% faster steps for small models, up to ~20%% more peak RSS; "
                          "docs/benchmarks.md section 1). Ignored on GPU, under FSDP and when MALLOC_* or "
                          "GLIBC_TUNABLES is set."},
    )
    skip_memory_check: bool = field(
        default=False,
        metadata={"help": "Start even when `toolkit plan`'s formulas say the run does not fit the memory (GPU memory "
                          "or the CPU RAM available); by default the recipe stops before any work with what it needs, "
                          "what there is and the planner's fix (toolkit/preflight.py)."},
    )
    sample_prompt: str = field(
        default="", metadata={"help": "Prompt for the sample generated at the end (empty: start of a document)."}
    )
    sample_max_new_tokens: int = field(
        default=64, metadata={"help": "Length of the generated sample printed at the end."}
    )
    eval_tasks: str | None = field(
        default=None,
        metadata={"help": "lm-evaluation-harness tasks run at every evaluation on the main process, e.g. hellaswag "
                          "(comma-separated); scores are logged as eval_<task>_<metric>. Needs the [eval] extra; not "
                          "under FSDP. Other ranks wait meanwhile: keep it short with --eval_tasks_limit."},
    )
    eval_tasks_limit: float | None = field(
        default=None, metadata={"help": "Examples per --eval_tasks task (a fraction if < 1); default: the whole task."}
    )
    eval_tasks_include_path: str | None = field(
        default=None, metadata={"help": "Folder with your own lm-eval task YAML files for --eval_tasks."}
    )

    def __post_init__(self):
        # "muon" is built by PretrainTrainer (toolkit/muon.py), not by transformers, whose check of `optim` knows only
        # its own names: it checks the AdamW that Muon pairs with, and `muon` keeps the choice. "auto" is resolved by
        # the recipe once the model's width is known (presets.default_optimizer).
        self.muon, self.optim_auto = self.optim == MUON, self.optim == "auto"
        if self.muon or self.optim_auto:
            self.optim = "adamw_torch_fused"
        super().__post_init__()
