"""What the libraries under the toolkit may fetch or print on a run: the toolkit's decisions, in one place.

`quiet()` runs when `toolkit` is imported, before transformers, peft or bitsandbytes are:

1. Optional Hub kernels. bitsandbytes, on CPUs with AVX512-BF16, asks the `kernels` package at import time for
`kernels-community/quantization-bitsandbytes` (a faster 4-bit matmul for single-token bf16 inputs, i.e. 4-bit
generation). Every recipe imports bitsandbytes through transformers/peft, so without a gate every run, quantized or
not, would contact the Hub on import, or print two lines a user cannot act on when offline. The toolkit decides:

- the kernel is taken from the local cache only, never fetched on import (no network, no publisher-trust lookup);
- when it is not cached, bitsandbytes uses its built-in kernel (same results) and the toolkit says so in one line of
  its own, once per run, only in a run that quantizes to 4-bit on such a CPU (`note_4bit_on_cpu`), with how to get it.

Training never uses that kernel (bitsandbytes dequantizes for batched inputs): the line names generation as its cost.
Every other repository goes to `kernels.get_kernel` unchanged.

2. Deprecation warnings a user cannot act on: peft calls transformers' pre-5.x names for activation checkpointing
   (`gradient_checkpointing_enable`, `is_gradient_checkpointing`), which print a FutureWarning on every LoRA run. The
   toolkit's own code uses the new names, so only those two messages are filtered, and only from transformers.

Anything else a library prints still shows: a test runs every recipe's main job and fails on a line that is not ours
(tests/test_own_output.py).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings

BNB_CPU_KERNEL = "kernels-community/quantization-bitsandbytes"
FETCH_COMMAND = f"python -c \"from kernels import get_kernel; get_kernel('{BNB_CPU_KERNEL}', version=1)\""

_state = {"bnb_cpu_kernel": None, "said": False}  # "cached" | "missing" | None (never asked)


@contextlib.contextmanager
def _cache_only():
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # kernels reads it at call time: resolve from the local cache, no request
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline


def _wrap(kernels) -> None:
    fetch = kernels.get_kernel
    if getattr(fetch, "toolkit_gate", False):
        return

    def get_kernel(repo_id, *args, **kwargs):
        if repo_id != BNB_CPU_KERNEL:
            return fetch(repo_id, *args, **kwargs)
        # A cached copy was fetched by the user, online, from Hugging Face's kernels-community organization: its
        # publisher was checked then, and offline it cannot be checked again (kernels would warn on every import).
        kwargs["trust_remote_code"] = [repo_id]
        try:
            with _cache_only():
                kernel = fetch(repo_id, *args, **kwargs)
        except Exception:
            _state["bnb_cpu_kernel"] = "missing"
            raise  # bitsandbytes catches it and keeps its built-in kernel
        _state["bnb_cpu_kernel"] = "cached"
        return kernel

    get_kernel.toolkit_gate = True
    kernels.get_kernel = get_kernel


class _GateOnImport(importlib.abc.MetaPathFinder):
    """Wraps `kernels.get_kernel` as soon as `kernels` is imported, by whoever imports it: importing it here would
    cost every command about a second."""

    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                _wrap(module)

        spec.loader = _Loader()
        return spec


def quiet() -> None:
    """Install the decisions above; idempotent."""
    if "kernels" in sys.modules:
        _wrap(sys.modules["kernels"])
    elif not any(isinstance(finder, _GateOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _GateOnImport())
    # bitsandbytes' own warning when the kernel is missing says nothing that note_4bit_on_cpu does not
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is "
                            r"deprecated", category=FutureWarning, module=r"transformers\.")


def note_4bit_on_cpu() -> str | None:
    """The one line for a run that quantizes to 4-bit on a CPU where bitsandbytes wanted the Hub kernel and it was not
    cached (printed once per run, on stderr); None when there is nothing to say."""
    import bitsandbytes  # noqa: F401  (its import is what asks for the kernel)

    if _state["bnb_cpu_kernel"] != "missing" or _state["said"] or int(os.environ.get("RANK", "0")) != 0:
        return None
    _state["said"] = True
    line = (f"4-bit on this CPU: bitsandbytes' optional Hub kernel {BNB_CPU_KERNEL} is not in the local cache, so "
            f"4-bit generation uses its slower built-in kernel (training is unaffected); to fetch it once, online: "
            f"{FETCH_COMMAND}")
    print(line, file=sys.stderr)
    return line
