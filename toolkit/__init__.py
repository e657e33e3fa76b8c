"""gpt2-toolkit: the library shared by the recipes in `recipes/`.

Each module owns one concern:
  errors     - UserError and the one-line-error entry wrapper every recipe and command uses
  presets    - GPT-2 model presets, config overrides and validation
  tokenizer  - load a tokenizer, or train a byte-level BPE on the training text
  data       - raw text -> tokenized, EOS-separated, packed blocks (cached)
  flops      - FLOPs per token, peak FLOP rates, MFU
  callbacks  - Trainer callbacks: throughput/MFU logging, loss-curve plot
  cli        - the `toolkit` console command and its subcommands
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes tries to fetch an optional CPU 4-bit kernel from the Hub on import and warns when it
# can't (always, offline); the built-in kernel is used instead, so the warning is only noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
