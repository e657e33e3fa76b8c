"""QLoRA fine-tuning of GPT-2: recipes/lora.py with the frozen base quantized by bitsandbytes.

The same recipe as lora.py, with these defaults: --load_in_4bit (NF4 with double quantization, done while the base
loads, one tensor at a time, never the whole model in full precision), activation checkpointing on (memory is
QLoRA's point), paged AdamW on CUDA, --output_dir out/qlora. The matmuls run in the compute dtype (bf16 on GPUs
that have it, fp32 on CPU) and the LoRA adapters train on top in that dtype. --load_in_8bit uses LLM.int8 instead.
Under DDP each rank loads the whole quantized model on its own device (device_map={"": local_rank}); under FSDP the
4-bit storage dtype is set to the model dtype. The saved adapter is an ordinary LoRA adapter: merge it into the
full-precision base with `toolkit merge` (never into the 4-bit one). Why and how: docs/qlora_explained.md.

    # 1 process (CPU or one GPU)
    python recipes/qlora.py                                  # out/pretrain (or gpt2) on the embedded corpus
    python recipes/qlora.py --config recipes/configs/qlora_gpt2.yaml
    python recipes/qlora.py --config recipes/configs/qlora_gpt2-medium.yaml
    python recipes/qlora.py --model_name_or_path out/pretrain --train_file ../shared/data/tinyshakespeare/input.txt \\
        --output_dir out/qlora-shakespeare --max_steps 200 --load_in_8bit
    # DDP on 2 GPUs (each rank: whole 4-bit model on its GPU)
    accelerate launch --multi_gpu --num_processes 2 recipes/qlora.py --config recipes/configs/qlora_gpt2.yaml
    # push the adapter (token from HF_TOKEN or `hf auth login`)
    python recipes/qlora.py --config recipes/configs/qlora_gpt2.yaml --push_to_hub --hub_model_id you/gpt2-qlora
    # afterwards: toolkit merge --adapter out/qlora-gpt2 --output_dir out/gpt2-merged
"""

from __future__ import annotations

import os
import sys

# lora.py, the recipe beside this file, whatever the cwd: Python puts this folder first on sys.path when the file runs
# as a script (python, accelerate launch, torchrun); this line does the same when it is run in-process (runpy, tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora import main as lora_main  # noqa: E402

from toolkit.errors import exit_now  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    return lora_main(argv, recipe="qlora")


if __name__ == "__main__":
    main()
    exit_now()  # skip the interpreter's slow teardown (toolkit/errors.py)
