"""gpt2-toolkit: the library shared by the recipes in `recipes/`.

Each module owns one concern:
  args       - every recipe's options: dataclasses, the one parser (YAML + overrides), the valid range of every
               numeric option of every recipe and command (args/ranges.py), defaults
  errors     - how a recipe or command ends: UserError as one line (entry wrapper, argparse), exit_now when done
  presets    - GPT-2 model presets, config overrides and validation, default learning rate and optimizer by width
  tokenizer  - load a tokenizer, or train a byte-level BPE on the training text
  data/      - text files and datasets -> token stores and training blocks; pretrain.py's data entry point,
               fine-tuning data (toolkit/data/__init__.py lists its modules)
  commands/  - the `toolkit` subcommands, one module each: options and main(argv) over the library
  flops      - FLOPs per token, peak FLOP rates, MFU
  muon       - `--optim muon`: Muon for the hidden matrices + AdamW for the rest, one optimizer
  guard      - the training guard: a non-finite step never reaches the weights; loss spikes warned, skipped or
               rolled back
  fsdp_resume - a one-process or DDP checkpoint resumed under FSDP2 (weights, optimizer, schedule sharded)
  preflight  - the checks before a recipe loads anything: which tokenizer, does the plan fit the memory
  run_dir    - output-folder safety (never overwrite a run), resume resolution, the final save_pretrained folder
  trainer    - PretrainTrainer (tokens/s, MFU, bits per byte), crash-safe checkpoints, the causal-LM loss
  callbacks  - Trainer callbacks: loss-curve plot, save-and-stop on SIGINT/SIGTERM
  distributed - how a recipe runs DDP or FSDP2 (setup(): real FSDP2 on CPU ranks, launch checks, --ddp_timeout),
               a dead or hung rank as one line on the others
  distributed_report - what a prepared run is (type, world size, sharding) and the batch split checkpoints record
  cpu_allocator - glibc malloc settings for CPU training steps
  finetune   - the steps of recipes/lora.py (and qlora.py): checks, trainer, eval, sample, save, push
  lora       - LoRA targets/config for GPT-2's Conv1D layers, the default base, 4-bit/8-bit settings
  model_loading - loading a model (full precision, or 4/8-bit while it loads) with one-line errors; local path
               or Hub name
  model_card - the model cards (README.md) of adapters and of pretrained models
  merge      - adapter + full-precision base -> model folder, checked against base + adapter
  inference  - load a model (+ adapter) to generate from or evaluate, bf16 on GPU, fp32 on CPU
  generate   - sampling from a loaded model: the recipes' closing sample, streamed samples
  lm_metrics - perplexity and bits per byte (tokenizer-independent loss) and the byte counts behind it
  evaluation - loss, perplexity, bits per byte over any text, in streamed windows
  lm_eval_tasks - lm-evaluation-harness benchmarks on a loaded model (toolkit eval --tasks, pretrain --eval_tasks)
  third_party - what the libraries underneath may fetch or print: Hub kernels from the cache, no foreign noise
  hub        - pushing a folder to the Hub, its checks, and the pre-training push checks
  plan       - the planner: memory per device, recipe and command
  cli        - the `toolkit` console command: which module runs each subcommand
"""

__version__ = "0.1.0"

from toolkit import third_party as _third_party

# Before transformers, peft or bitsandbytes are imported: what they may fetch or print (toolkit/third_party.py).
_third_party.quiet()
