"""gpt2-toolkit: the library shared by the recipes in `recipes/`.

Each module owns one concern:
  args       - every recipe's options: dataclasses, the one parser (YAML + overrides + range checks), defaults
  errors     - UserError, the one-line-error entry wrapper and argparse for every recipe and command
  presets    - GPT-2 model presets, config overrides and validation
  tokenizer  - load a tokenizer, or train a byte-level BPE on the training text
  data/      - text files and datasets -> token stores and training blocks; pretrain.py's data entry point,
               fine-tuning data (toolkit/data/__init__.py lists its modules)
  commands/  - the `toolkit` subcommands' option parsing (prepare, ...)
  flops      - FLOPs per token, peak FLOP rates, MFU
  muon       - `--optim muon`: Muon for the hidden matrices + AdamW for the rest, one optimizer
  run_dir    - output-folder safety (never overwrite a run), resume resolution, safe model loading
  trainer    - PretrainTrainer (tokens/s, MFU, bits per byte), crash-safe checkpoints, the causal-LM loss
  callbacks  - Trainer callbacks: loss-curve plot, save-and-stop on SIGINT/SIGTERM
  distributed- real FSDP2 on CPU ranks, launch checks, setup report, full-model export
  peer_failures - --ddp_timeout on every backend; a dead or hung rank is one line on the others
  cpu_allocator - glibc malloc settings for CPU training steps
  finetune   - the steps of recipes/lora.py (and qlora.py): checks, trainer, eval, sample, save, push
  lora       - LoRA targets/config for GPT-2's Conv1D layers, 4-bit/8-bit loading
  model_card - the model cards (README.md) of adapters and of pretrained models
  merge      - `toolkit merge`: adapter + full-precision base -> model folder
  inference  - load a model (+ adapter) to generate from or evaluate, bf16 on GPU, fp32 on CPU
  generate   - `toolkit generate`: streamed sampling from a model or adapter
  lm_metrics - perplexity and bits per byte (tokenizer-independent loss) and the byte counts behind it
  evaluation - `toolkit eval`: loss, perplexity, bits per byte over any text, in streamed windows
  lm_eval_tasks - lm-evaluation-harness benchmarks on a loaded model (toolkit eval --tasks, pretrain --eval_tasks)
  third_party - what the libraries underneath may fetch or print: Hub kernels from the cache, no foreign noise
  hub        - `toolkit push`, the pre-training push checks, local path or Hub name
  plan       - `toolkit plan`: memory per device, recipe and command
  cli        - the `toolkit` console command and its subcommands
"""

__version__ = "0.1.0"

from toolkit import third_party as _third_party

# Before transformers, peft or bitsandbytes are imported: what they may fetch or print (toolkit/third_party.py).
_third_party.quiet()
