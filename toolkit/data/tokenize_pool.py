"""Batch tokenization in worker processes, results in source order, memory bounded by the batches in flight.

Each worker holds the Rust tokenizer (tokenizers.Tokenizer from the fast tokenizer's JSON) and encodes a whole
batch of documents per call (`encode_batch_fast`: no character offsets, which a token store never needs). Why
processes and not tokenizers' own threads: one process's threads share its allocator and the Python work of
turning encodings into arrays; N processes scale with cores (build-nanogpt's fineweb.py does the same). The
workers start with `spawn`, so a parent that already holds torch or a model is not copied into them.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from toolkit.data.corpus import pack_documents
from toolkit.errors import UserError

_WORKER = None


def _init_worker(backend_json: str, eos_id: int, dtype: str, single_thread: bool) -> None:
    from tokenizers import Tokenizer

    global _WORKER
    if single_thread:  # the pool is the parallelism: one core per worker, so one Rayon thread each
        # Not TOKENIZERS_PARALLELISM=false: the same encode is faster on one Rayon thread than serially on the
        # calling thread (docs/benchmarks.md, findings).
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        os.environ["RAYON_NUM_THREADS"] = "1"
    tokenizer = Tokenizer.from_str(backend_json)
    tokenizer.no_truncation()  # a tokenizer.json may carry a max_length: whole documents here
    tokenizer.no_padding()
    _WORKER = (tokenizer, eos_id, np.dtype(dtype))


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(ids of every document followed by EOS, tokens per document incl. EOS, UTF-8 bytes per document, the process's
    peak RSS in KiB)."""
    tokenizer, eos_id, dtype = _WORKER
    ids = [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    out, lengths = pack_documents(ids, eos_id, dtype)
    nbytes = np.fromiter((len(t.encode("utf-8", "surrogatepass")) for t in texts), dtype=np.int64, count=len(texts))
    return out, lengths, nbytes, peak_rss_kib()


def peak_rss_kib() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: a spawned worker's ru_maxrss starts at its parent's
    size (fork, then exec), which would count the parent again."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def encoded_batches(batches, backend_json: str, eos_id: int, dtype: str, num_proc: int):
    """(encoded batch, batch) in source order; at most 2 x num_proc batches in flight."""
    if num_proc == 1:
        _init_worker(backend_json, eos_id, dtype, single_thread=False)
        for batch in batches:
            yield _encode(batch.texts), batch
        return
    context = multiprocessing.get_context("spawn")  # no copy of a parent that may hold torch and a model
    # concurrent.futures, not multiprocessing.Pool: a worker that dies (the OOM killer) breaks the executor and the
    # waiting result raises, where Pool would wait for the lost batch forever.
    pool = ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init_worker,
                               initargs=(backend_json, eos_id, dtype, True))
    try:
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append((pool.submit(_encode, batch.texts), batch))
            if len(in_flight) >= 2 * num_proc:
                future, done = in_flight.popleft()
                yield future.result(), done
        while in_flight:
            future, done = in_flight.popleft()
            yield future.result(), done
    except BrokenProcessPool:
        raise UserError("a tokenizer worker process died (killed, or out of memory); rerun the same command: it "
                        "resumes from the last complete shard (lower --num_proc if memory is short)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
