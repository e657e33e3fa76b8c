"""Trainer callbacks shared by the recipes."""

from __future__ import annotations

import os

from transformers import TrainerCallback


def plot_loss_curve(log_history: list[dict], path: str, title: str = "GPT-2 training") -> str | None:
    """Train and eval loss against step, as a PNG. Returns the path, or None when nothing was logged."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
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
