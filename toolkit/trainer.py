"""PretrainTrainer: the HF Trainer plus tokens/s and MFU in every training log line.

The Trainer reports samples/s for the whole run only; people training LMs compare tokens/s and MFU
(model FLOPs utilisation) per logging window, so `log` adds both. Time spent in evaluation is
excluded, so the figure is training throughput.
"""

from __future__ import annotations

import time

from transformers import Trainer


class PretrainTrainer(Trainer):
    def __init__(self, *args, flops_per_token: float, peak_flops: float | None, tokens_per_step: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # for all devices of the run together
        self.tokens_per_step = tokens_per_step  # global: micro-batch x accumulation x world x block
        self._window_start = None
        self._window_step = 0
        self._eval_seconds = 0.0

    def _start_window(self) -> None:
        self._window_start, self._window_step, self._eval_seconds = time.perf_counter(), self.state.global_step, 0.0

    def evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._eval_seconds += time.perf_counter() - start

    def training_step(self, *args, **kwargs):
        if self._window_start is None:
            self._start_window()
        return super().training_step(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window_start is not None:
            steps = self.state.global_step - self._window_step
            seconds = time.perf_counter() - self._window_start - self._eval_seconds
            if steps > 0 and seconds > 0:
                tokens_per_s = steps * self.tokens_per_step / seconds
                logs["tokens_per_s"] = round(tokens_per_s, 1)
                if self.peak_flops:
                    logs["mfu"] = round(tokens_per_s * self.flops_per_token / self.peak_flops, 4)
            self._start_window()
        super().log(logs, start_time)
