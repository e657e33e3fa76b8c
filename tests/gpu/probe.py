"""Run a recipe exactly as `python recipes/X.py ARGS` would, and record what only its own process can see.

    python tests/gpu/probe.py --probe_dir DIR [--step_stats] recipes/pretrain.py ARGS...
    python -m accelerate.commands.launch --config_file accelerate_configs/fsdp.yaml --num_processes 1 \\
        tests/gpu/probe.py --probe_dir DIR recipes/pretrain.py ARGS...

The recipe runs unchanged (runpy, as __main__); every Trainer it builds gets one more TrainerCallback, which writes
DIR/probe.json on rank 0:
  setup  at train begin: parameter dtypes, devices (of the local shard) and DTensor-ness, the optimizer class,
         bitsandbytes 4-bit layers, accelerate's
         distributed type, precision and FSDP offload policy, the wrapped model's class (OptimizedModule: compiled)
  first_step  at the first step's start: the global step and the step the optimizer state is at (a resumed run:
         the checkpoint's)
  steps  with --step_stats: seconds and torch.cuda.max_memory_allocated per optimizer step (a device synchronisation
         per step, so not for runs whose speed is reported)
  end    at train end, before the recipe exports anything: (sum, sum of squares) of every trained weight, and the
         in-memory model's logits on fixed tokens (DIR/logits.safetensors). Where accelerate wrapped the forward in
         autocast, the logits come from the unwrapped forward (fp32 weights compute in fp32); under FSDP2 from the
         sharded module as it trains (its mixed-precision policy computes in bf16).
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

from kit import checksums, fixed_ids  # tests/gpu is sys.path[0] when this file runs as a script


def _trainable_weights(model):
    """(name, full tensor) of every parameter once (the tied head is the embedding); DTensors gathered."""
    from torch.distributed.tensor import DTensor

    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if isinstance(p, DTensor):
            # One rank (the one-GPU launch): the local shard is the whole tensor; no collective needed (with CPU
            # offload the shard lives in CPU memory, where a CUDA all-gather would fail).
            p = p.to_local() if p.device_mesh.size() == 1 else p.full_tensor()
        yield name, p


def optimizer_state_steps(optimizer) -> list[float]:
    """The distinct `step` counts in the optimizer's state: [] before any update, [5.0] when resumed at step 5."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    return sorted({float(s["step"]) for s in getattr(inner, "state", {}).values() if "step" in s})


def describe(trainer, model, optimizer) -> dict:
    import torch
    from accelerate.state import AcceleratorState
    from torch.distributed.tensor import DTensor

    def count(values: list) -> dict:
        return {v: values.count(v) for v in sorted(set(values))}

    params = {id(p): p for p in model.parameters()}.values()
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    trainable = [p for p in params if p.requires_grad]
    inner = getattr(optimizer, "optimizer", optimizer)
    state = AcceleratorState()
    plugin = getattr(state, "fsdp_plugin", None)
    # bitsandbytes' own layers (peft's LoRA wrapper around each is also called Linear4bit)
    four_bit = [
        m
        for m in model.modules()
        if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
    ]
    quant = {}
    if four_bit:
        qs = four_bit[0].weight.quant_state
        quant = {
            "layers": len(four_bit),
            "quant_type": qs.quant_type,
            "double_quant": bool(qs.nested),
            "compute_dtype": str(four_bit[0].compute_dtype),
            "storage_dtype": str(four_bit[0].weight.dtype),
            "weight_devices": count([m.weight.device.type for m in four_bit]),
        }
    config = getattr(getattr(model, "base_model", model), "config", None) or getattr(model, "config", None)
    return {
        "param_dtypes": count([str(p.dtype) for p in params]),
        # per name, so a reload can reproduce the layout (trl casts some modules of a 4-bit model to bf16)
        "dtype_by_name": {name: str(p.dtype) for name, p in model.named_parameters()},
        "param_devices": count([t.device.type for t in local]),
        "trainable_dtypes": count([str(p.dtype) for p in trainable]),
        "n_params": len(list(params)),
        "n_dtensor": sum(isinstance(p, DTensor) for p in params),
        "n_trainable": sum(p.numel() for p in trainable),
        "optimizer": f"{type(inner).__module__}.{type(inner).__name__}" if inner is not None else None,
        # bitsandbytes' paged AdamW is its AdamW class with is_paged=True (transformers' optim="paged_adamw_32bit")
        "optimizer_is_paged": bool(getattr(inner, "is_paged", False)),
        "optimizer_bits": getattr(getattr(inner, "args", None), "optim_bits", None),  # bitsandbytes' state bits
        "optimizer_state_steps": optimizer_state_steps(optimizer),
        "four_bit": quant,
        "distributed_type": str(state.distributed_type.value),
        "mixed_precision": str(state.mixed_precision),
        "num_processes": state.num_processes,
        "fsdp_version": getattr(plugin, "fsdp_version", None),
        "fsdp_offload_policy": type(getattr(plugin, "cpu_offload", None)).__name__ if plugin else None,
        "wrapped_model_class": type(trainer.model_wrapped).__name__,
        "model_class": type(model).__name__,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "cuda_allocated_bytes": torch.cuda.memory_allocated() if torch.cuda.is_available() else None,
        "config": {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
        if config
        else {},
    }


def finish(model, folder: Path, main_process: bool) -> dict:
    import torch
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    sums = checksums(_trainable_weights(model))
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    forward = None if sharded else getattr(model, "_original_forward", None)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ids = fixed_ids(model.config.vocab_size, device)
        out = forward(input_ids=ids) if forward is not None else model(input_ids=ids)
    model.train(was_training)
    logits = out["logits"].float().cpu().contiguous()
    if main_process:
        save_file({"logits": logits}, str(folder / "logits.safetensors"))
    return {
        "checksums": sums,
        "logits_forward": "unwrapped (no autocast)" if forward is not None else "as trained",
        "logits_dtype_before_cast": str(out["logits"].dtype),
    }


def build_callback(folder: Path, step_stats: bool):
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer
            self.record = {"setup": None, "first_step": None, "steps": [], "end": None}
            self.t0 = 0.0

        def write(self, args):
            if args.process_index == 0:
                (folder / "probe.json").write_text(json.dumps(self.record, indent=1))

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.record["setup"] = describe(self.trainer, model, optimizer)
            self.write(args)

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            if self.record["first_step"] is None:  # a resumed run has loaded its checkpoint by now, in any version
                self.record["first_step"] = {
                    "global_step": state.global_step,
                    "optimizer_state_steps": optimizer_state_steps(optimizer),
                }
            if step_stats:
                import torch

                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if step_stats:
                import torch

                torch.cuda.synchronize()
                self.record["steps"].append(
                    {
                        "step": state.global_step,
                        "seconds": time.perf_counter() - self.t0,
                        "max_allocated": torch.cuda.max_memory_allocated(),
                    }
                )

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.record["end"] = finish(model, folder, args.process_index == 0)
            self.write(args)

    return Probe


def rehearse_on_cpu() -> None:
    """In the CPU rehearsal (tests/gpu/kit.py sets GPU_KIT_REHEARSAL for its runs), let `--bf16 true` through the
    recipes' check that refuses bf16 on CPUs where it is slower than fp32: the rehearsal runs the bf16 autocast
    path for what it does, not for speed."""
    import os

    if os.environ.get("GPU_KIT_REHEARSAL"):
        from toolkit import flops

        flops.cpu_bf16_speedup = lambda size=256: 1.0


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) < 3 or argv[0] != "--probe_dir":
        sys.exit("usage: probe.py --probe_dir DIR [--step_stats] RECIPE [RECIPE ARGS...]")
    folder, argv = Path(argv[1]), argv[2:]
    step_stats = argv[0] == "--step_stats"
    argv = argv[1:] if step_stats else argv
    folder.mkdir(parents=True, exist_ok=True)

    rehearse_on_cpu()
    import transformers

    probe_class = build_callback(folder, step_stats)
    original_init = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(probe_class(self))

    transformers.Trainer.__init__ = init
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
