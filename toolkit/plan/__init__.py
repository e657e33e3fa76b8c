"""`toolkit plan`: how much memory a GPT-2 training run needs per device, and which recipe to run.

    toolkit plan --model gpt2 --task pretrain --num_devices 4 --device_memory 8GB --batch_size 8 --seq_len 1024
    toolkit plan --model gpt2-medium --task qlora --device cuda --device_memory 8GB --json
    python -m toolkit.plan --help

Why hand-written: accelerate's `estimate-memory` counts weights only (batch 1, no activations, accelerate#2512)
and no framework models the HF GPT-2 implementation's activations, DDP buckets or FSDP2's working set.

One concern per module:
  shapes       the model's shape from a preset, a config.json (local or Hub) and overrides
  memory       the memory formulas per device and strategy (Setup -> Estimate)
  calibration  the fitted constants, read from calibration.json (date, machine and command of each)
  speed        the throughput estimate: compute, collectives, QLoRA's dequantization
  advice       the decision between strategies, the reasons, the exact command
  hardware     the hardware planned for (detected or named), memory sizes, the Setup from the command's options
  report       the plan as text, JSON or a PNG chart
The command's options and main are toolkit/commands/plan.py.
"""

from toolkit.plan.advice import Plan, candidates, command_for, make_plan
from toolkit.plan.calibration import (
    ASSUMED_MFU,
    CPU_CUDA_BUILD_EXTRA,
    CPU_DEFAULT_MALLOC_MARGIN,
    CPU_DISTRIBUTED_OVERHEAD,
    CPU_OVERHEAD,
    GPU_ALLOCATOR_SLACK,
    GPU_CONTEXT,
    GiB,
    MiB,
)
from toolkit.plan.hardware import GPU_MEMORY_GIB, detect_hardware, parse_memory, setup_from_args, torch_is_cuda_build
from toolkit.plan.memory import (
    LORA_MODULES,
    LORA_TARGET_PRESETS,
    OPTIMIZERS,
    STRATEGIES,
    TASKS,
    Estimate,
    Setup,
    activation_terms,
    estimate,
    lora_trainable,
    resolve_lora_targets,
)
from toolkit.plan.report import plot, render, to_json
from toolkit.plan.shapes import Shape, load_shape, shape_from_config
from toolkit.plan.speed import GUIDE_SPEEDUPS, INTERCONNECTS, speedups, step_costs, throughput

__all__ = [
    "ASSUMED_MFU",
    "CPU_DEFAULT_MALLOC_MARGIN",
    "CPU_CUDA_BUILD_EXTRA",
    "CPU_DISTRIBUTED_OVERHEAD",
    "CPU_OVERHEAD",
    "GPU_ALLOCATOR_SLACK",
    "GPU_CONTEXT",
    "GPU_MEMORY_GIB",
    "LORA_MODULES",
    "LORA_TARGET_PRESETS",
    "OPTIMIZERS",
    "STRATEGIES",
    "TASKS",
    "Estimate",
    "GiB",
    "MiB",
    "Plan",
    "Setup",
    "Shape",
    "activation_terms",
    "candidates",
    "command_for",
    "detect_hardware",
    "estimate",
    "load_shape",
    "lora_trainable",
    "make_plan",
    "parse_memory",
    "plot",
    "render",
    "resolve_lora_targets",
    "setup_from_args",
    "shape_from_config",
    "throughput",
    "speedups",
    "step_costs",
    "GUIDE_SPEEDUPS",
    "INTERCONNECTS",
    "to_json",
    "torch_is_cuda_build",
]
