"""What a distributed run is once the Trainer has prepared the model: the distributed type, the world size and whether
the parameters are sharded across ranks (`DistributedSetupCallback` prints it when training starts, from rank 0),
and the batch split each checkpoint records (`batch_geometry`), so a resume on another number of processes can be
checked (toolkit.run_dir.check_resume_batch). How the run was set up is toolkit/distributed.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


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
    # The callback subclasses transformers.TrainerCallback; build it on first use so that importing this module for
    # batch_geometry (toolkit/run_dir.py) does not import transformers.
    if name == "DistributedSetupCallback":
        cls = _build_setup_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
