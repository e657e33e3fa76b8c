"""gpt2-toolkit: the library shared by the recipes in `recipes/`.

Each module owns one concern:
  errors     - UserError and the one-line-error entry wrapper every recipe and command uses
  presets    - GPT-2 model presets, config overrides and validation
  tokenizer  - load a tokenizer, or train a byte-level BPE on the training text
  data       - raw text -> tokenized, EOS-separated, packed blocks (cached)
  flops      - FLOPs per token, peak FLOP rates, MFU
  config     - pretraining argument dataclasses and the YAML + CLI parser
  run_dir    - output-folder safety (never overwrite a run), resume resolution, safe model loading
  trainer    - PretrainTrainer (tokens/s + MFU logging), crash-safe checkpoints, GPT-2 loss counting fix
  callbacks  - Trainer callbacks: loss-curve plot, save-and-stop on SIGINT/SIGTERM
  distributed- real FSDP2 on CPU ranks, launch checks, setup report, full-model export
  finetune   - SFTConfig defaults and the steps shared by recipes/lora.py and qlora.py
  lora       - LoRA targets/config for GPT-2's Conv1D layers, 4-bit/8-bit loading
  sft_data   - fine-tuning data formats (text, prompt/completion, chat) and GPT-2's chat template
  model_card - the model cards (README.md) of adapters and of pretrained models
  merge      - `toolkit merge`: adapter + full-precision base -> model folder
  inference  - load a model (+ adapter) to generate from or evaluate, bf16 on GPU, fp32 on CPU
  generate   - `toolkit generate`: streamed sampling from a model or adapter
  bits_per_byte - bits per byte (tokenizer-independent loss) and the byte counts behind it
  evaluation - `toolkit eval`: loss, perplexity, bits per byte over any text, in streamed windows
  text_stream - text to evaluate as token id arrays: read in pieces, tokenized on a background thread
  lm_eval_tasks - lm-evaluation-harness benchmarks on a loaded model (toolkit eval --tasks, pretrain --eval_tasks)
  hub        - `toolkit push` and the pre-training push checks
  plan       - `toolkit plan`: memory per device, recipe and command
  cli        - the `toolkit` console command and its subcommands
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes tries to fetch an optional CPU 4-bit kernel from the Hub on import and warns when it
# can't (always, offline); the built-in kernel is used instead, so the warning is only noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
