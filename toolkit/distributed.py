"""How a recipe runs on several processes: DDP or FSDP2, as the accelerate config (or torchrun) says, and what keeps a
distributed run honest. Every recipe calls `setup(training_args)` right after parsing its arguments; the Trainer and
accelerate do the rest (process groups, wrapping or sharding the model, sharded checkpoints, resuming).

`setup` does three things:
1. `enable_cpu_fsdp2()`: an FSDP accelerate config gives real FSDP2 (`fully_shard`, DTensor parameters) on CPU/gloo
   ranks too, where accelerate alone would silently run DDP.
2. `check_distributed_launch(training_args)`: refuses a launch of several processes that did not end up in one
   accelerate process group (N independent copies that all train as rank 0).
3. `apply_ddp_timeout(training_args)`: the process group waits --ddp_timeout in a collective on every backend.

Around `trainer.train()`, `peer_failures_as_user_errors(trainer)` turns a dead or hung rank into one line on every
rank still alive. What the run looks like once the model is prepared is reported by toolkit/distributed_report.py;
the final model folder is written by toolkit.run_dir.export_full_model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from datetime import timedelta

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


def setup(training_args) -> None:
    """The one distributed setup of every recipe, right after its arguments are parsed (TrainingArguments created)
    and before the Trainer: real FSDP2 on CPU ranks, the launch checked, --ddp_timeout on the process group. A no-op
    for one process."""
    enable_cpu_fsdp2()
    check_distributed_launch(training_args)


# --------------------------------------------------------------------------------------------------------------
# Real FSDP2 on CPU
# --------------------------------------------------------------------------------------------------------------
#
# Why a patch is needed: accelerate's `AcceleratorState.__init__` turns a run into DistributedType.FSDP, and keeps
# the FSDP plugin the Accelerator built from the config, only for the GPU-like distributed types (MULTI_GPU,
# MULTI_XPU, ...). A CPU run of several ranks is MULTI_CPU (gloo), which is not among them, so its FSDP plugin is
# dropped without a warning: `Accelerator.prepare` wraps the model in DDP and the Trainer sees FSDP disabled.
# Nothing further down needs a GPU: accelerate's FSDP2 preparation calls torch's `fully_shard` with no mesh, which
# builds a CPU DeviceMesh when CUDA is absent, and gloo implements the all-gather / reduce-scatter FSDP2 needs.
# The patch wraps `AcceleratorState.__init__`: after accelerate's own code ran, if the run is MULTI_CPU and the
# Accelerator was given an FSDP plugin, it does what accelerate does for GPUs (set FSDP, keep the plugin, give it the
# mixed-precision policy, publish the type to PartialState). GPU runs (never MULTI_CPU) and CPU runs without an FSDP
# plugin are untouched. It can go once accelerate treats MULTI_CPU like the GPU types there.

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

    Call it before the Trainer / Accelerator is created (`setup` does). The installed hook acts
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
# Refuse launches that are not really distributed
# --------------------------------------------------------------------------------------------------------------


def check_distributed_launch(training_args=None) -> None:
    """Raise UserError if several processes were launched but accelerate set up a single-process run.

    Call right after `TrainingArguments(...)` (which creates accelerate's PartialState and, on several ranks, the
    torch.distributed process group), before any data or model work. Cases refused:
      * torchrun / `accelerate launch` started N > 1 processes but accelerate chose DistributedType.NO - e.g.
        torchrun on a CPU-only machine without `use_cpu`: accelerate finds no GPU backend, still initialises the
        default process group (torch picks gloo) but then reports world size 1, so every process trains its own
        full copy as "rank 0" and they overwrite each other's output folder.
      * (warning only) `accelerate launch` with a MULTI_CPU config and num_processes > 1 on one machine: its simple
        launcher starts ONE process (it expects mpirun for CPU multi-process).
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
        # accelerate's simple launcher sets MASTER_ADDR only when asked for num_processes > 1, yet starts one process
        # with no RANK/WORLD_SIZE. A warning, not an error: a MASTER_ADDR exported in the user's shell looks the same,
        # and a single process still trains correctly.
        print(
            "warning: `accelerate launch` with a MULTI_CPU config or `--cpu --num_processes N` starts ONE process "
            "(it expects mpirun for more); for several CPU processes use accelerate_configs/ddp_cpu.yaml or "
            "fsdp_cpu.yaml, or torchrun",
            file=sys.stderr,
            flush=True,
        )
    apply_ddp_timeout(training_args)
    if fsdp_requested() and accel_size > 1:
        # The Accelerator (created by the Trainer) decides FSDP; its state is not built yet here, so check what will
        # decide it: on CPU ranks only the enable_cpu_fsdp2() hook turns the MULTI_CPU run into FSDP.
        if state.distributed_type == DistributedType.MULTI_CPU and not _PATCHED:
            raise RuntimeError(
                "the accelerate config asks for FSDP on CPU ranks but toolkit.distributed.enable_cpu_fsdp2() was not "
                "called before the Trainer (toolkit.distributed.setup calls it): accelerate would silently run DDP"
            )


# --------------------------------------------------------------------------------------------------------------
# The process group's timeout, and a rank that died or hangs
# --------------------------------------------------------------------------------------------------------------


def apply_ddp_timeout(training_args) -> None:
    """Give the default process group --ddp_timeout, whatever its backend.

    transformers builds accelerate's PartialState with `timeout=ddp_timeout` only for GPU runs: with `use_cpu`
    (every CPU run of several ranks) it passes no timeout (transformers/training_args.py, `_setup_devices`), so the
    gloo group kept torch's 30-minute default and a rank that hung (not died: a dead one closes its sockets and
    the others fail at once) stalled every other rank for half an hour, whatever --ddp_timeout said. torch's
    `_set_pg_timeout` changes the timeout of a group that exists (gloo and NCCL); a no-op without one.
    """
    import torch.distributed as dist

    seconds = getattr(training_args, "ddp_timeout", None)
    if not seconds or not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=seconds))


@contextlib.contextmanager
def peer_failures_as_user_errors(trainer):
    """Around `trainer.train()`: when a collective fails because another rank died (its sockets closed: at once)
    or stopped answering (after --ddp_timeout), raise one UserError line on this rank instead of the collective's
    traceback. Every rank that is still alive reports it; the launcher ends the rest."""
    try:
        yield
    except Exception as err:
        if not (trainer.args.world_size > 1 and is_peer_failure(err)):
            raise
        import re

        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        text = re.sub(r"^\[[^\]]*\]\s*", "", text)[:160]  # gloo starts with its own source location
        hung = (f": no answer within --ddp_timeout ({trainer.args.ddp_timeout} s)" if "timed out" in text.lower()
                else "")
        raise UserError(f"lost contact with another rank at step {trainer.state.global_step}{hung} ({text}); "
                        "check the other ranks' logs, then rerun the same command with --resume_from_checkpoint "
                        "auto") from None


def is_peer_failure(err: BaseException) -> bool:
    """True when a collective failed because another rank died or stopped answering.

    gloo raises a RuntimeError ("Connection closed by peer" / "Connection reset by peer") as soon as a peer's
    socket closes; NCCL and timeouts raise torch.distributed.DistError subclasses. Either way the user's next step
    is the same: look at the other ranks' logs and resume.
    """
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    markers = ("Connection closed by peer", "Connection reset", "Broken pipe", "gloo", "NCCL", "timed out",
               "Timed out")
    return isinstance(err, RuntimeError) and any(marker in text for marker in markers)
