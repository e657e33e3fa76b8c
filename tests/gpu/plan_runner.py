"""Run several recipe configurations one after another in ONE process and measure each one's training-step GPU memory
and step time: what tests/gpu/test_plan_gpu.py compares with `toolkit plan`, and the LoRA vs QLoRA benchmark.

    python tests/gpu/plan_runner.py --specs specs.json --out measured.json [--base DIR PRESET ...]

specs.json: [{"name": ..., "recipe": "recipes/pretrain.py", "args": [...]}, ...]. Each recipe runs as `python
recipe args` would (runpy, as __main__), with a TrainerCallback that, from the second optimizer step on, resets
torch.cuda's peak counter at each step's start and reads torch.cuda.max_memory_allocated at its end (the steady
state with the optimizer state allocated: what the planner predicts), times each step (device synchronised), and
stops the recipe once training ends (evaluation, export and sample are not what the planner predicts). One process
saves ~5 s of imports per configuration; between configurations every tensor of the previous one is freed, and the
memory still allocated when the next one starts is recorded (leftover_bytes) so a leak would show.

--base DIR PRESET: first save a randomly initialised GPT-2 of that preset as a Hub GPT-2 checkpoint looks (GPT2Config
defaults: dropout 0.1, gelu_new, vocabulary 50257) with the GPT-2 tokenizer, for the LoRA / QLoRA configurations.
"""

from __future__ import annotations

import argparse
import gc
import json
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path


class StopRecipe(BaseException):
    """Raised at train end; a BaseException so the recipes' `except Exception` handlers let it through."""


CURRENT: dict = {}


def measuring_callback():
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()  # False only in the CPU smoke run of this file (tests/test_gpu_kit.py)

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            config = getattr(getattr(model, "base_model", model), "config", None) or getattr(model, "config", None)
            CURRENT["config"] = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
            CURRENT["gradient_checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
            CURRENT["train_begin_allocated"] = torch.cuda.memory_allocated() if cuda else 0

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                if state.global_step >= 1:
                    torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            CURRENT["steps"].append(
                {
                    "step": state.global_step,
                    "seconds": time.perf_counter() - self.t0,
                    "max_allocated": torch.cuda.max_memory_allocated() if cuda else 0,
                    "max_reserved": torch.cuda.max_memory_reserved() if cuda else 0,
                }
            )

        def on_train_end(self, args, state, control, **kwargs):
            if cuda:
                free, total = torch.cuda.mem_get_info()
                CURRENT["device_used_bytes"] = total - free
                CURRENT["reserved_bytes"] = torch.cuda.memory_reserved()
            raise StopRecipe

    return Measure


def device_used_before_cuda() -> tuple[int | None, str]:
    """Device memory in use before this process creates its CUDA context (NVML), so the context can be measured;
    None and why where NVML cannot say (no pynvml, no driver): recorded, and the GPU test fails on it."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used), "measured"
    except Exception as err:  # noqa: BLE001 - recorded with the reason, never silently
        return None, f"NVML unavailable: {type(err).__name__}: {err}"[:300]


def make_base(folder: Path, preset: str, tokenizer: str) -> None:
    if (folder / "config.json").exists():
        return
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from toolkit.presets import PRESETS

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    config = GPT2Config(
        **PRESETS[preset], vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--base", nargs=2, action="append", default=[], metavar=("DIR", "PRESET"))
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --base")
    args = p.parse_args()
    used_before, nvml = device_used_before_cuda()
    from probe import rehearse_on_cpu  # tests/gpu is sys.path[0] when this file runs as a script

    rehearse_on_cpu()
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.init()
    for folder, preset in args.base:
        make_base(Path(folder), preset, args.tokenizer)
    measure = measuring_callback()
    original_init = transformers.Trainer.__init__

    def init(self, *a, **kw):
        original_init(self, *a, **kw)
        self.add_callback(measure())

    transformers.Trainer.__init__ = init
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    results = {"device_used_before_cuda_bytes": used_before, "nvml": nvml, "gpu": gpu, "runs": {}}
    for spec in json.loads(Path(args.specs).read_text()):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        CURRENT.clear()
        CURRENT.update(steps=[], leftover_bytes=torch.cuda.memory_allocated() if cuda else 0)
        start = time.perf_counter()
        sys.argv = [spec["recipe"], *spec["args"]]
        print(f"plan_runner: {spec['name']}: {' '.join(sys.argv)}", flush=True)
        try:
            runpy.run_path(spec["recipe"], run_name="__main__")
            CURRENT["error"] = "the recipe returned without finishing training"
        except StopRecipe:
            pass
        except SystemExit as err:
            CURRENT["error"] = f"the recipe exited with status {err.code}"
        except Exception:  # noqa: BLE001 - recorded; the next configuration still runs
            CURRENT["error"] = traceback.format_exc()[-3000:]
        finally:
            # The recipes' SIGINT/SIGTERM handlers hold their Trainer (and so the model): give the signals back.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        CURRENT["wall_s"] = time.perf_counter() - start
        results["runs"][spec["name"]] = dict(CURRENT)
        Path(args.out).write_text(json.dumps(results, indent=1))  # after each run: a later failure keeps these
        print(
            f"plan_runner: {spec['name']} done in {CURRENT['wall_s']:.1f} s"
            + (f" - ERROR {CURRENT['error'].splitlines()[-1]}" if CURRENT.get("error") else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
