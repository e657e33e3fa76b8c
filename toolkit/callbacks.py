"""Trainer callbacks shared by the recipes."""

from __future__ import annotations

import os
import sys

from transformers import TrainerCallback


def plot_loss_curve(log_history: list[dict], path: str, title: str = "GPT-2 training") -> str | None:
    """Train and eval loss against step, as a PNG. Returns the path, or None when nothing was logged.

    When the evaluations report eval_bits_per_byte, a right-hand axis reads the curves in bits per byte of the
    validation text (a fixed scale: bits per byte = loss / (ln 2 x validation bytes per token)) and the legend
    gives the last evaluation's value.
    """
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    bpb = [(h["step"], h["eval_loss"], h["eval_bits_per_byte"]) for h in log_history
           if "eval_loss" in h and h.get("eval_bits_per_byte") and "step" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        last_bpb = f" (last: {bpb[-1][2]:.4f} bits/byte)" if bpb else ""
        ax.plot(*zip(*evals), "o-", label=f"validation loss{last_bpb}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    if bpb and bpb[-1][1] > 0:
        scale = bpb[-1][2] / bpb[-1][1]  # bits per byte per nat per token, the same at every evaluation
        right = ax.secondary_yaxis("right", functions=(lambda x: x * scale, lambda y: y / scale))
        right.set_ylabel("bits per byte (validation text)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class LossCurveCallback(TrainerCallback):
    """Writes output_dir/loss_curve.png at the end of training (main process only)."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss_curve(state.log_history, os.path.join(args.output_dir, "loss_curve.png"))


class GracefulStopCallback(TrainerCallback):
    """SIGINT/SIGTERM -> finish the current step, save a checkpoint, stop; a second Ctrl-C kills at once.

    Schedulers (SLURM preemption, Kubernetes) send SIGTERM before killing a job; without this the
    Trainer dies mid-step and everything since the last checkpoint is lost. Under several processes
    the request is all-reduced every step so that all ranks stop at the same step (a rank that stopped
    alone would leave the others waiting in a collective).
    """

    def __init__(self, accelerator=None):
        import signal

        self.accelerator = accelerator
        self.signal_name: str | None = None
        self.stopped_at_step: int | None = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._request_stop)

    def _request_stop(self, signum, frame):
        import signal

        self.signal_name = signal.Signals(signum).name
        # A second Ctrl-C stops at once. Repeated SIGTERMs are kept: launchers (torchrun, SLURM) forward
        # their own SIGTERM to workers that already got one, and the save must still finish.
        signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

    def _stop_requested_anywhere(self) -> bool:
        local = self.signal_name is not None
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return local
        import torch

        flag = torch.tensor([1.0 if local else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop_requested_anywhere():
            self.signal_name = self.signal_name or "SIGTERM"  # another rank got it
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def release(self, args) -> None:
        """At the very end of a recipe, once its results are saved: give the handlers back. The handlers stay through
        the final evaluation, save and push, so a signal there lets the results be written, and then ends the run."""
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.signal_name and self.stopped_at_step is None:  # came after training
            if args.process_index == 0:
                print(f"\n{self.signal_name} received after training; the results were saved in {args.output_dir} "
                      "first", flush=True)
            sys.exit(self.exit_code)

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + int(getattr(signal, self.signal_name or "SIGTERM"))

    def exit_if_stopped(self, args) -> None:
        """After train(): if a signal stopped it, say how to resume and exit with 128 + the signal's number."""
        if self.stopped_at_step is None:  # no signal, or one after the last step: release() handles that
            return
        if args.process_index == 0:
            print(f"\nStopped by {self.signal_name} at step {self.stopped_at_step}; checkpoint saved in "
                  f"{args.output_dir}. Resume with the same command plus --resume_from_checkpoint auto", flush=True)
        sys.exit(self.exit_code)
