"""`toolkit plan`'s command line: how much memory a GPT-2 training run needs per device, and which recipe to run.

    toolkit plan --model gpt2 --task pretrain --num_devices 4 --device_memory 8GB --batch_size 8 --seq_len 1024
    toolkit plan --model gpt2-medium --task qlora --device cuda --device_memory 8GB --json
    toolkit plan --model path/to/checkpoint --task lora --plot plan.png
    python -m toolkit.plan --help

The planner itself is the toolkit/plan/ package.
"""

from __future__ import annotations

import argparse
import json

from toolkit.args.ranges import check_ranges
from toolkit.errors import OneLineArgumentParser, exit_on_user_error
from toolkit.plan.advice import make_plan
from toolkit.plan.hardware import GPU_MEMORY_GIB, setup_from_args
from toolkit.plan.memory import OPTIMIZERS, STRATEGIES, TASKS
from toolkit.plan.report import plot, render, to_json
from toolkit.plan.speed import INTERCONNECTS
from toolkit.presets import LORA_DROPOUT, PRESETS


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="toolkit plan",
        description="Memory per device (parameters, gradients, optimizer, activations, quantization, overhead) for "
                    "GPT-2 training, the recipe and accelerate config that fit, and the command to run.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default="gpt2",
                   help=f"preset ({', '.join(PRESETS)}), a folder/config.json, or a Hub name")
    m.add_argument("--config_overrides", default=None, help="e.g. 'n_layer=24,n_embd=1024'")
    for key in ("n_layer", "n_head", "n_embd", "n_positions"):
        m.add_argument(f"--{key}", type=int, default=None)
    m.add_argument("--vocab_size", type=int, default=None,
                   help="tokenizer size (default: GPT-2's 50257; pretraining pads it to 64)")
    m.add_argument("--pad_vocab_to_multiple_of", type=int, default=64)
    t = p.add_argument_group("training")
    t.add_argument("--task", default="pretrain", choices=TASKS,
                   help="pretrain (from scratch), full (fine-tune all weights), lora, qlora")
    t.add_argument("--batch_size", type=int, default=None, help="micro-batch per device (default 8 on GPU, 4 on CPU)")
    t.add_argument("--seq_len", type=int, default=None,
                   help="tokens per sequence (default: n_positions on GPU, 256 on CPU)")
    t.add_argument("--grad_accum", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto: bf16 on GPU, fp32 on CPU")
    t.add_argument("--gradient_checkpointing", action="store_true",
                   help="force checkpointing (auto-considered when needed)")
    t.add_argument("--optimizer", default="adamw", choices=tuple(OPTIMIZERS))
    t.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    t.add_argument("--lora_r", type=int, default=16)
    t.add_argument("--lora_targets", default="all",
                   help="recipes/lora.py preset (all, attention, attention-qv, mlp) or "
                        "module names, comma-separated (c_attn,c_proj,c_fc; default all)")
    t.add_argument("--lora_dropout", type=float, default=LORA_DROPOUT)
    t.add_argument("--no_double_quant", action="store_true", help="QLoRA without double quantisation of the absmax")
    t.add_argument("--token_metrics", action="store_true",
                   help="LoRA/QLoRA with --token_metrics: trl's fused LM head (in tiles) instead of the model's loss")
    h = p.add_argument_group("hardware (default: detect)")
    h.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    h.add_argument("--num_devices", type=int, default=None, help="GPUs (or CPU processes)")
    h.add_argument("--device_memory", default=None,
                   help="memory per GPU (e.g. 8GB) or, on CPU, the RAM all processes share")
    h.add_argument("--gpu", default=None, help=f"card name for memory and peak FLOP/s: {', '.join(GPU_MEMORY_GIB)}")
    h.add_argument("--interconnect", default="nvlink", choices=INTERCONNECTS,
                   help="what GPUs' collectives run over, for the speed estimate (CPU ranks: gloo, fitted)")
    h.add_argument("--bandwidth", type=float, default=None,
                   help="GB/s per device the collectives get, instead of the interconnect's default")
    o = p.add_argument_group("output")
    o.add_argument("--strategy", default="auto", choices=("auto", *STRATEGIES),
                   help="force one strategy instead of choosing")
    o.add_argument("--json", action="store_true", help="print the plan as JSON")
    o.add_argument("--plot", default=None, help="write a stacked bar chart of the memory per strategy to this PNG")
    o.add_argument("--no_flops_benchmark", action="store_true",
                   help="CPU: skip the 0.5 s matmul benchmark (no tokens/s estimate)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_ranges(args, command="toolkit plan")
    shape, setup, peak = setup_from_args(args)
    plan = make_plan(shape, setup, args.strategy, peak)
    if args.plot:
        plot(plan, args.plot)
    if args.json:
        print(json.dumps(to_json(plan), indent=2))
    else:
        print(render(plan))
        if args.plot:
            print(f"Plot written to {args.plot}")
    return 0
