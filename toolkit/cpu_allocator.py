"""glibc malloc settings on CPU: keep freed memory for the next training step (pretrain.py, lora.py), or hand it
back at once while a 4-bit model loads (the QLoRA loader, toolkit/model_loading.py).

Why by hand: on CPU, PyTorch allocates every tensor with plain malloc and frees it with free (there is no caching
allocator like CUDA's), and neither torch, accelerate nor transformers exposes glibc's knobs. By default glibc
serves each block of 32 MiB or more (the logits and their gradient, large activations) with a fresh mmap and
unmaps it when freed, and gives the top of its heap back to the OS once more than its trim threshold is free. A
training step frees and reallocates the same large blocks every time, so each step faults its biggest tensors in
again, 4 KiB page by page, and the kernel zeroes every page: millions of page faults and a large share of a small
model's step (docs/benchmarks.md, findings of 2026-11-25).

`keep_freed_memory()` turns off mmap for large blocks (M_MMAP_MAX = 0) and heap trimming (M_TRIM_THRESHOLD = -1;
both documented in `man mallopt`), so freed blocks stay in the heap and the next step reuses them. The price is
memory: the resident set stays at the heap's high-water mark, and large blocks can leave holes the heap grows
around (the peak RSS it adds: docs/benchmarks.md, same findings).

recipes/pretrain.py and recipes/lora.py (qlora.py only when asked: memory first) apply it on CPU unless the run
uses FSDP (`for_training`): there the per-step all-gather buffers leave holes that cost more than sharding
saves (docs/benchmarks.md, distributed on CPU).

A user who set the allocator through the environment (MALLOC_*_ variables, GLIBC_TUNABLES with malloc settings,
or another malloc through LD_PRELOAD) keeps their choice.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

# glibc malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# The same two settings in environment form, for a process that does not call keep_freed_memory() (onefile_train.py):
# GLIBC_TUNABLES=... python ...
KEEP_FREED_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1000000000000000000"

_ENV_CHOICES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_",
                "MALLOC_ARENA_MAX")


def user_allocator_setting() -> str | None:
    """The environment variable through which the user already chose allocator settings, if any."""
    for name in _ENV_CHOICES:
        if name in os.environ:
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD"
    return None


def keep_freed_memory() -> str:
    """Apply the settings to this process (call it before training starts). Returns what was done, for the log."""
    if not sys.platform.startswith("linux"):
        return "allocator left as is (not Linux/glibc)"
    chosen = user_allocator_setting()
    if chosen:
        return f"allocator left as set by {chosen}"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    except (OSError, AttributeError):  # musl or another libc without mallopt
        ok = False
    if not ok:
        return "allocator left as is (no glibc mallopt)"
    return "glibc keeps freed memory for reuse (--cpu_keep_freed_memory false to hand it back to the OS)"


def for_training(training_args, fsdp: bool) -> str | None:
    """The recipes' rule: keep freed memory when --cpu_keep_freed_memory is on and the run trains on CPU without
    FSDP. Returns the line to log, or None when the option is off or the run is on a GPU."""
    if not training_args.cpu_keep_freed_memory or training_args.device.type != "cpu":
        return None
    return keep_freed_memory() if not fsdp else "glibc defaults kept under FSDP (memory first)"


@contextlib.contextmanager
def large_blocks_from_mmap():
    """glibc only: serve allocations >= 128 KiB with mmap while loading (fixed threshold; by default glibc
    raises it after the first large free, so freed buffers stay in the heap), then settle at 32 MiB
    (the ceiling its own adjustment reaches) so training allocations are served as usual.
    A threshold the user chose (MALLOC_MMAP_THRESHOLD_ in the environment) is left as it is."""
    libc = None
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS now (glibc keeps it otherwise), e.g. after loading a model."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
