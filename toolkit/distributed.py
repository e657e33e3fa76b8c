"""Distributed training glue for recipes on the HF Trainer: real FSDP2 on CPU, launch checks, reporting, export.

What this module is for, in the order a recipe uses it:

1. `enable_cpu_fsdp2()` - before `TrainingArguments`: makes an accelerate FSDP config give real FSDP2
   (`fully_shard`, DTensor parameters) on CPU/gloo ranks, where accelerate 1.x silently runs DDP instead.
2. `check_distributed_launch(training_args)` - right after `TrainingArguments`: refuses a launch of several
   processes that did not end up in one accelerate process group (N independent copies that all train as rank 0),
   and gives the process group the --ddp_timeout on every backend (toolkit/peer_failures.py, which also turns a
   dead or hung rank into one line on every other rank).
3. `DistributedSetupCallback` / `describe_distributed(trainer)` - report the distributed type, world size and
   whether the parameters are sharded across ranks, once the model is prepared; record the batch split in each
   checkpoint (`batch_geometry`) so a resume on another number of processes can be checked.
4. `export_full_model(trainer, output_dir, tokenizer)` - after training: one normal `save_pretrained` folder
   (full state dict gathered on rank 0) that `from_pretrained` loads without FSDP, whatever the launch.

Everything else (process groups, sharding, sharded checkpoints, resuming) is accelerate's and the Trainer's own code.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from dataclasses import asdict, dataclass, field

from toolkit.errors import UserError

_TRUE = ("1", "true", "yes", "on")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in _TRUE


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                return None
    return None


def fsdp_requested(training_args=None) -> bool:
    """True when the launcher asked for FSDP (`accelerate launch` with `distributed_type: FSDP` sets
    ACCELERATE_USE_FSDP) or the training arguments do (--fsdp)."""
    return _env_flag("ACCELERATE_USE_FSDP") or bool(getattr(training_args, "fsdp", None))


# --------------------------------------------------------------------------------------------------------------
# 1. Real FSDP2 on CPU
# --------------------------------------------------------------------------------------------------------------
#
# Why a patch is needed (accelerate 1.15, site-packages/accelerate/state.py):
#   * `PartialState._prepare_backend` (state.py:800-808) maps "CPU + several ranks" to DistributedType.MULTI_CPU
#     with the gloo backend.
#   * `AcceleratorState.__init__` switches a run to DistributedType.FSDP and stores `self.fsdp_plugin` only inside
#     `elif self.distributed_type in [MULTI_GPU, MULTI_MLU, MULTI_SDAA, MULTI_MUSA, MULTI_NPU, MULTI_XPU, MULTI_HPU,
#     MULTI_NEURON]` (state.py:986-1016). MULTI_CPU is not in that list, so on CPU the FSDP plugin the Accelerator
#     built from the config (accelerator.py:388-393) is dropped: `distributed_type` stays MULTI_CPU,
#     `state.fsdp_plugin` is never set, `Accelerator.prepare` wraps the model in DDP (accelerator.py:2058) and the
#     Trainer sees `is_fsdp_enabled = False` (transformers/trainer.py:875). No warning is printed.
#   * Nothing further down needs a GPU: `Accelerator._prepare_fsdp2` -> `fsdp2_prepare_model`
#     (accelerate/utils/fsdp_utils.py:751) calls torch's `fully_shard` with `mesh=None`, which builds a CPU
#     DeviceMesh when CUDA is absent (torch/distributed/fsdp/_fully_shard/_fsdp_init.py:198-211), and gloo
#     implements the all-gather / reduce-scatter FSDP2 needs.
# The patch: wrap `AcceleratorState.__init__`; after accelerate's own code ran, if the run is MULTI_CPU and the
# Accelerator was given an FSDP plugin, do exactly what state.py:1010-1016 does for GPUs (set FSDP, keep the plugin,
# give it the mixed-precision policy, publish the type to PartialState as state.py:1037 does). It changes nothing
# for GPU runs (they never are MULTI_CPU) nor for CPU runs without an FSDP plugin. Remove it once accelerate lists
# MULTI_CPU there.

_PATCHED = False


def _promote_cpu_run_to_fsdp(state, fsdp_plugin) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if state.distributed_type != DistributedType.MULTI_CPU or fsdp_plugin is None:
        return
    if fsdp_plugin.fsdp_version != 2:
        raise UserError(
            "FSDP on CPU ranks is supported with FSDP2 only, but the accelerate config asks for "
            f"fsdp_version {fsdp_plugin.fsdp_version}; set `fsdp_version: 2` in its fsdp_config "
            "(see accelerate_configs/fsdp_cpu.yaml)"
        )
    state.distributed_type = DistributedType.FSDP
    if state._mixed_precision != "no":
        fsdp_plugin.set_mixed_precision(state._mixed_precision)
    state.fsdp_plugin = fsdp_plugin
    PartialState._shared_state["distributed_type"] = state.distributed_type


def enable_cpu_fsdp2() -> None:
    """Make an FSDP2 request run real FSDP2 on CPU/gloo ranks instead of silently becoming DDP.

    Call it before the Trainer / Accelerator is created (the recipe calls it first thing). The installed hook acts
    only when both hold: the Accelerator was given an FSDP plugin (an accelerate config with `distributed_type:
    FSDP`, or TrainingArguments `--fsdp ...`) and the run's backend is CPU (DistributedType.MULTI_CPU, gloo).
    GPU runs and non-FSDP runs go through accelerate untouched. Idempotent.
    """
    global _PATCHED
    if _PATCHED:
        return
    from accelerate.state import AcceleratorState

    original_init = AcceleratorState.__init__
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def init_with_cpu_fsdp(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        _promote_cpu_run_to_fsdp(self, signature.bind(self, *args, **kwargs).arguments.get("fsdp_plugin"))

    AcceleratorState.__init__ = init_with_cpu_fsdp
    _PATCHED = True


# --------------------------------------------------------------------------------------------------------------
# 2. Refuse launches that are not really distributed
# --------------------------------------------------------------------------------------------------------------


def check_distributed_launch(training_args=None) -> None:
    """Raise UserError if several processes were launched but accelerate set up a single-process run.

    Call right after `TrainingArguments(...)` (which creates accelerate's PartialState and, on several ranks, the
    torch.distributed process group), before any data or model work. Cases refused:
      * torchrun / `accelerate launch` started N > 1 processes but accelerate chose DistributedType.NO - e.g.
        torchrun on a CPU-only machine without `use_cpu`: accelerate finds no GPU backend, still initialises the
        default process group (state.py:217-244, backend None -> torch picks gloo) but then reports world size 1
        (state.py:288-292), so every process trains its own full copy as "rank 0" and they overwrite each other's
        output folder.
      * (warning only) `accelerate launch` with a MULTI_CPU config and num_processes > 1 on one machine: its simple
        launcher starts ONE process (commands/launch.py:1403-1413; it expects mpirun for CPU multi-process).
      * FSDP was requested but the run did not become FSDP (e.g. `enable_cpu_fsdp2()` was not called on CPU).
    """
    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if training_args is not None:
        training_args.device  # noqa: B018 - makes TrainingArguments set up accelerate's PartialState if not done yet
        state = training_args.distributed_state
    elif PartialState._shared_state:
        state = PartialState()  # the process-wide singleton TrainingArguments created
    else:
        raise RuntimeError("check_distributed_launch() must run after TrainingArguments(...) is created")
    launched = _env_int("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE") or 1
    group_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    accel_size = state.num_processes
    rank = os.environ.get("RANK", "?")

    if max(launched, group_size) > 1 and (accel_size == 1 or state.distributed_type == DistributedType.NO):
        raise UserError(
            f"{max(launched, group_size)} processes were launched (this is rank {rank}) but accelerate set up a "
            f"single-process run (distributed type {state.distributed_type.value}), so every process would train its "
            "own copy as rank 0; on a machine without GPUs drop `--use_cpu false` (the recipes set it there, and "
            "the ranks then join one gloo process group), with GPUs check that torch.cuda.is_available() is True on "
            "every rank"
        )
    if launched == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE and "MASTER_ADDR" in os.environ:
        # accelerate's simple launcher sets MASTER_ADDR only when asked for num_processes > 1 (utils/launch.py:161-163)
        # yet starts one process with no RANK/WORLD_SIZE. A warning, not an error: a MASTER_ADDR exported in the
        # user's shell looks the same, and a single process still trains correctly.
        print(
            "warning: `accelerate launch` with a MULTI_CPU config or `--cpu --num_processes N` starts ONE process "
            "(it expects mpirun for more); for several CPU processes use accelerate_configs/ddp_cpu.yaml or "
            "fsdp_cpu.yaml, or torchrun",
            file=sys.stderr,
            flush=True,
        )
    from toolkit.peer_failures import apply_ddp_timeout

    apply_ddp_timeout(training_args)
    if fsdp_requested() and accel_size > 1:
        # The Accelerator (created by the Trainer) decides FSDP; its state is not built yet here, so check what will
        # decide it: on CPU ranks only the enable_cpu_fsdp2() hook turns the MULTI_CPU run into FSDP.
        if state.distributed_type == DistributedType.MULTI_CPU and not _PATCHED:
            raise RuntimeError(
                "the accelerate config asks for FSDP on CPU ranks but toolkit.distributed.enable_cpu_fsdp2() was not "
                "called before TrainingArguments: accelerate would silently run DDP"
            )


# --------------------------------------------------------------------------------------------------------------
# 3. What is actually running
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DistributedInfo:
    distributed_type: str
    world_size: int
    rank: int
    backend: str | None
    device: str
    fsdp_version: int | None = None
    reshard_after_forward: bool | None = None
    cpu_offload: bool = False
    mixed_precision: str = "no"
    params_are_dtensors: bool = False
    params_sharded: bool = False
    placements: list[str] = field(default_factory=list)
    local_param_fraction: float = 1.0
    local_params: int = 0
    total_params: int = 0

    def summary(self) -> str:
        kind = self.distributed_type + (f" (FSDP{self.fsdp_version})" if self.fsdp_version else "")
        if self.params_sharded:
            sharding = f"sharded {'/'.join(self.placements)}, this rank holds {self.local_param_fraction:.1%} of them"
        elif self.distributed_type == "FSDP" and not self.params_are_dtensors:
            sharding = "not sharded yet (the Trainer shards the model inside train(); use DistributedSetupCallback)"
        else:
            sharding = "replicated (every rank holds all of them)"
        extra = ", cpu_offload" if self.cpu_offload else ""
        return (
            f"{kind}, world size {self.world_size}, backend {self.backend or 'none'}, device {self.device}, "
            f"mixed precision {self.mixed_precision}{extra}; parameters {sharding}"
        )

    __str__ = summary


def _accelerator_state(obj):
    """AcceleratorState of a Trainer / Accelerator, or the process-wide one (a singleton) when obj is None."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if obj is None:
        return AcceleratorState()
    accelerator = obj if isinstance(obj, Accelerator) else getattr(obj, "accelerator", None)
    if accelerator is None:
        raise TypeError(f"describe_distributed needs a Trainer, an Accelerator or None, got {type(obj).__name__}")
    return accelerator.state


def describe_distributed(trainer_or_accelerator=None, model=None) -> DistributedInfo:
    """Distributed type, world size and whether `model`'s parameters are DTensors sharded across ranks (this rank).

    Under FSDP the parameters are sharded only once the Trainer prepared the model inside `trainer.train()`, so
    describe the model from a callback (`DistributedSetupCallback`) or after training, not right after building the
    Trainer. Default model: `trainer.model_wrapped`.
    """
    from torch.distributed.tensor import DTensor, Shard

    state = _accelerator_state(trainer_or_accelerator)
    if model is None and trainer_or_accelerator is not None:
        model = getattr(trainer_or_accelerator, "model_wrapped", None)
    plugin = getattr(state, "fsdp_plugin", None) if state.distributed_type.value == "FSDP" else None
    offload = getattr(plugin, "cpu_offload", None)
    info = DistributedInfo(
        distributed_type=state.distributed_type.value,
        world_size=state.num_processes,
        rank=state.process_index,
        backend=state.backend,
        device=str(state.device),
        fsdp_version=getattr(plugin, "fsdp_version", None),
        reshard_after_forward=getattr(plugin, "reshard_after_forward", None),
        # FSDP2 keeps a CPUOffloadPolicy there when offloading, an OffloadPolicy() (no-op base class) otherwise
        cpu_offload=type(offload).__name__ == "CPUOffloadPolicy",
        mixed_precision=str(state.mixed_precision),
    )
    if model is None:
        return info
    placements, local, total, all_dtensors, sharded, seen = set(), 0, 0, True, False, set()
    for param in model.parameters():  # parameters() yields a tied weight (wte = lm_head) once
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if isinstance(param, DTensor):
            local += param.to_local().numel()
            placements.update(str(p) for p in param.placements)
            sharded |= param.device_mesh.size() > 1 and any(isinstance(p, Shard) for p in param.placements)
        else:
            all_dtensors = False
            local += param.numel()
    info.params_are_dtensors = all_dtensors and total > 0
    info.params_sharded = sharded
    info.placements = sorted(placements)
    info.local_params, info.total_params = local, total
    info.local_param_fraction = local / total if total else 1.0
    return info


def gather_descriptions(trainer_or_accelerator=None, model=None) -> list[DistributedInfo]:
    """`describe_distributed` of every rank, in rank order (a collective: call it on all ranks)."""
    import torch.distributed as dist

    mine = describe_distributed(trainer_or_accelerator, model)
    if not (dist.is_available() and dist.is_initialized()) or mine.world_size == 1:
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, asdict(mine))
    return [DistributedInfo(**d) for d in everyone]


BATCH_RECORD = "DistributedSetupCallback"  # its entry in a checkpoint's trainer_state.json "stateful_callbacks"


def batch_geometry(training_args) -> dict:
    """How a run splits its global batch: per-device batch x processes x accumulation steps."""
    geometry = {"per_device_train_batch_size": training_args.per_device_train_batch_size,
                "world_size": training_args.world_size,
                "gradient_accumulation_steps": training_args.gradient_accumulation_steps}
    geometry["global_batch_size"] = (geometry["per_device_train_batch_size"] * geometry["world_size"]
                                     * geometry["gradient_accumulation_steps"])
    return geometry


def _build_setup_callback_class():
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class DistributedSetupCallback(TrainerCallback, ExportableState):
        """Once the Trainer has prepared (wrapped / sharded) the model, rank 0 prints how the run is distributed.

        Two lines: `distributed setup: <summary>` and `distributed setup: {json}` (the rank-0 description plus every
        rank's parameter fraction), so a log shows whether FSDP2 really sharded the parameters. Runs one small
        all_gather at train begin, reached by all ranks. The descriptions stay in `self.infos`.

        Every checkpoint records the batch split of the run that wrote it (`batch_geometry`, in trainer_state.json,
        through the Trainer's ExportableState mechanism), for toolkit.run_dir.check_resume_batch.
        """

        def __init__(self, **_restored):
            self.infos: list[DistributedInfo] = []
            self.batch: dict | None = None

        def state(self) -> dict:
            return {"args": {}, "attributes": {"batch": self.batch}}

        def on_init_end(self, args, state, control, **kwargs):
            self.batch = batch_geometry(args)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.batch = batch_geometry(args)  # this run's, also when the Trainer restored an older callback state
            self.infos = gather_descriptions(None, model)
            if state.is_world_process_zero:
                first = self.infos[0]
                record = {
                    **asdict(first),
                    "local_param_fraction_per_rank": [round(i.local_param_fraction, 6) for i in self.infos],
                    "params_sharded_per_rank": [i.params_sharded for i in self.infos],
                }
                print(f"distributed setup: {first.summary()}", flush=True)
                print(f"distributed setup: {json.dumps(record)}", flush=True)

    return DistributedSetupCallback


def __getattr__(name):
    # The callback subclasses transformers.TrainerCallback; build it on first use so that importing this module
    # (needed before argument parsing, for enable_cpu_fsdp2) does not import transformers (~10 s).
    if name == "DistributedSetupCallback":
        cls = _build_setup_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------------------
# 4. Export one normal save_pretrained folder
# --------------------------------------------------------------------------------------------------------------


def export_full_model(trainer, output_dir: str, tokenizer=None) -> None:
    """Write a plain `save_pretrained` folder (safetensors, config, tokenizer) that loads without FSDP.

    Call on every rank: under FSDP2 gathering the shards is a collective. Works the same for 1 process, DDP and
    FSDP1/2, whatever `fsdp_state_dict_type` says. Why not `trainer.save_model`: with SHARDED_STATE_DICT (what we
    use for fast sharded checkpoints) it writes nothing (transformers/trainer.py:4105-4108 saves only for
    FULL_STATE_DICT).
      * `accelerator.get_state_dict` gathers: for FSDP2 it is torch.distributed.checkpoint's
        `get_model_state_dict(full_state_dict=True, cpu_offload=True)` (accelerate/accelerator.py:4096-4100): full
        CPU tensors on rank 0, an empty dict elsewhere; for DDP / one process it is the plain state dict.
      * The gathered `lm_head.weight` and `transformer.wte.weight` are two separate tensors, so `save_pretrained`
        (which drops tied duplicates by storage pointer, transformers/modeling_utils.py:436) would store the matrix
        twice. We check they are equal - a tied weight that diverged under sharding (accelerate#3870) fails loudly
        here - and point the tied name at its source, so the file holds one copy like any GPT-2 checkpoint.
    """
    import torch

    accelerator = trainer.accelerator
    state_dict = accelerator.get_state_dict(trainer.model)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        for tied, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
            if tied in state_dict and source in state_dict:
                if not torch.equal(state_dict[tied], state_dict[source]):
                    raise RuntimeError(
                        f"tied weights {tied} and {source} differ after training (max abs diff "
                        f"{(state_dict[tied] - state_dict[source]).abs().max().item():.3g}): the sharded update broke "
                        "the tie; not exporting a model that would reload differently"
                    )
                state_dict[tied] = state_dict[source]
        # save_pretrained names the architecture without FSDP2's "FSDP" class prefix (modeling_utils.py:3447)
        model.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer = tokenizer if tokenizer is not None else trainer.processing_class
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
