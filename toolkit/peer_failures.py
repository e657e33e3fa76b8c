"""A rank that died or hangs: every rank that is still alive stops with one line instead of a collective's traceback,
within --ddp_timeout whatever the backend. Used around `trainer.train()` by recipes/pretrain.py and recipes/lora.py.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from toolkit.errors import UserError


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
