"""Pretraining data at scale: `toolkit prepare` at three corpus sizes against raw `tokenizers` batch encoding and
nanoGPT's prepare.py approach, and the token store's training loader against the 124M model's training rate.

Corpus: jsonl of 2,000-character documents cut from Tiny Shakespeare, repeated up to each size (so every method
reads the same text). Per size, prepare and raw alternate --repeats times (medians: the machine's slow
spells hit both), each in its own process (peak RSS of the whole process tree, from the kernel's
VmHWM, sampled every 0.1 s; time from process start to exit unless said):
  prepare   `python -m toolkit prepare CORPUS --output_dir STORE --tokenizer_name TOK --num_proc N`
  raw       the same documents through tokenizers' `encode_batch_fast` (its Rayon threads on all cores), timing
            only the encode calls: the ceiling any prepare can reach with this tokenizer on these cores
  nanogpt   nanoGPT's data/openwebtext/prepare.py with this tokenizer: datasets.load_dataset("json") +
            .map(one document per call, num_proc=N) + a np.memmap written in 1024 batches (its datasets cache
            is a temporary folder, reported as "intermediate files")
Loader: toolkit.data.blocks.BlockDataset at the smallest and largest store, random block indices like the Trainer's
sampler, blocks of 1024 tokens, batches of 8 through default_data_collator; beside it, the 124M model's (gpt2
preset) forward + backward rate on this CPU in blocks/s. Projection: FineWeb-Edu sample-10BT (~10B GPT-2 tokens)
on 16 and 64 cores from prepare's per-core rate, and whether the one main process keeps up with that many workers.

    python benchmarks/data_scale.py                                  # 30M, 100M, 300M tokens -> docs/benchmarks.md
    python benchmarks/data_scale.py --sizes 3e6 10e6 30e6 --doc ''   # smaller
    python benchmarks/data_scale.py --quick --doc ''                 # smoke version (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import harness

CHARS_PER_DOC = 2000
FINEWEB_EDU_10B_TOKENS = 9.67e9  # sample-10BT with the GPT-2 tokenizer (build-nanogpt's fineweb.py count)


# ---------------------------------------------------------------------------------------------------------
# The baselines, each run as `python benchmarks/data_scale.py --_baseline NAME ...` in its own process
def baseline_raw(corpus: str, tokenizer: str) -> dict:
    """Every document through encode_batch_fast in batches of ~1 MB; only the encode calls are timed."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = Tokenizer.from_str(AutoTokenizer.from_pretrained(tokenizer).backend_tokenizer.to_str())
    tok.no_truncation()
    tokens, encode_s, batch = 0, 0.0, []

    def encode(texts):
        start = time.perf_counter()
        n = sum(len(e) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
        return n + len(texts), time.perf_counter() - start  # + EOS per document, as a store holds

    with open(corpus) as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 500:
                n, s = encode(batch)
                tokens, encode_s, batch = tokens + n, encode_s + s, []
    if batch:
        n, s = encode(batch)
        tokens, encode_s = tokens + n, encode_s + s
    return {"tokens": tokens, "seconds": encode_s}


def baseline_nanogpt(corpus: str, tokenizer: str, num_proc: int, out: str) -> dict:
    """nanoGPT's prepare.py (data/openwebtext) with this tokenizer: map one document per call, then a memmap."""
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    start = time.perf_counter()
    enc = AutoTokenizer.from_pretrained(tokenizer).backend_tokenizer
    eot = AutoTokenizer.from_pretrained(tokenizer).eos_token_id
    # a cache of its own (the dataset's arrow files and map's), whose size the report gives
    dataset = datasets.load_dataset("json", data_files=corpus, split="train",
                                    cache_dir=os.path.join(out, "datasets-cache"))

    def process(example):
        ids = enc.encode(example["text"], add_special_tokens=False).ids
        ids.append(eot)
        return {"ids": ids, "len": len(ids)}

    tokenized = dataset.map(process, remove_columns=["text"], num_proc=num_proc, desc="tokenizing")
    arr_len = int(np.sum(tokenized["len"], dtype=np.uint64))
    arr = np.memmap(os.path.join(out, "train.bin"), dtype=np.uint16, mode="w+", shape=(arr_len,))
    idx = 0
    total_batches = min(1024, len(tokenized))
    for batch_idx in range(total_batches):
        batch = tokenized.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
        arr_batch = np.concatenate(batch["ids"])
        arr[idx : idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    return {"tokens": arr_len, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------------
def make_corpus(path: Path, target_tokens: float, tokens_per_char: float) -> int:
    """jsonl of 2,000-character documents of Tiny Shakespeare, repeated until ~target_tokens; returns its bytes."""
    text = harness.SHAKESPEARE.read_text(encoding="utf-8")
    chars = int(target_tokens / tokens_per_char)
    docs = [text[i : i + CHARS_PER_DOC] for i in range(0, len(text) - CHARS_PER_DOC, CHARS_PER_DOC)]
    with open(path, "w", encoding="utf-8") as f:
        written = i = 0
        while written < chars:
            doc = docs[i % len(docs)]
            f.write(json.dumps({"text": doc, "id": i}) + "\n")
            written += len(doc)
            i += 1
    return path.stat().st_size


def tokens_per_char(tokenizer: str) -> float:
    from transformers import AutoTokenizer

    text = harness.SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    return len(AutoTokenizer.from_pretrained(tokenizer)(text)["input_ids"]) / len(text)


def folder_bytes(path: Path) -> tuple[int, int]:
    """(total bytes, largest shard's bytes) under path. prepare writes nothing else but the manifest and the
    tokenizer: its temporary files are the shard being written and the validation snapshot, each at most a shard."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    shards = [p.stat().st_size for p in files if p.suffix == ".bin"]
    return sum(p.stat().st_size for p in files), max(shards, default=0)


def tree_peak(r: harness.Run) -> tuple[int, int]:
    """(sum over processes of each one's peak RSS, the largest single process's peak), bytes."""
    peaks = [rss for _, rss in r.peak_rss.values()]
    return sum(peaks), max(peaks, default=0)


def run_baseline(name: str, *args: str, env=None) -> tuple[dict, harness.Run]:
    r = harness.run([sys.executable, __file__, "--_baseline", name, *args], env=env).check()
    line = next(line for _, line in reversed(r.lines) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), r


def loader_rate(store: str, block: int, batch: int, seconds: float) -> float:
    """Blocks/s of BlockDataset + default_data_collator at random indices (the Trainer's sampler order)."""
    import numpy as np
    from transformers import default_data_collator

    from toolkit.data.blocks import BlockDataset
    from toolkit.data.store import TokenStore

    dataset = BlockDataset(TokenStore(store).train, block)
    order = np.random.default_rng(0).permutation(len(dataset))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        default_data_collator([dataset[int(i)] for i in order[n % len(order) : n % len(order) + batch]])
        n += batch
    return n / (time.perf_counter() - start)


def training_rate(preset: str, block: int, vocab: int, steps: int) -> float:
    """Blocks/s of one forward + backward + AdamW step of the preset model on this CPU (batch 1, fp32); blocks of
    `block` tokens, or of the model's context when that is shorter (small presets)."""
    import torch
    from transformers import AutoModelForCausalLM

    from toolkit import presets

    config = presets.build_gpt2_config(preset, vocab, {}, 64)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (1, min(block, config.n_positions)))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return 1 / harness.median(times[1:])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(p)
    p.add_argument("--repeats", type=int, default=2, help="alternating prepare / raw runs per size (medians)")
    p.add_argument("--sizes", nargs=3, type=float, default=[30e6, 100e6, 300e6], help="corpus sizes in tokens (3)")
    p.add_argument("--tokenizer_name", default=str(harness.GPT2_TOKENIZER))
    p.add_argument("--num_proc", type=int, default=len(os.sched_getaffinity(0)), help="processes (default: all cores)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--model", default="gpt2", help="preset whose training rate the loader is compared with")
    p.add_argument("--workdir", help="where corpora and stores go (default: a temporary folder, removed at the end)")
    p.add_argument("--_baseline", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._baseline == "raw":
        print("RESULT " + json.dumps(baseline_raw(args.corpus, args.tokenizer_name)), flush=True)
        return []
    if args._baseline == "nanogpt":
        print(
            "RESULT " + json.dumps(baseline_nanogpt(args.corpus, args.tokenizer_name, args.num_proc, args.out)),
            flush=True,
        )
        return []
    if args.quick:
        args.sizes, args.shard_tokens, args.model, args.block_size = [20e3, 60e3, 200e3], 50_000, "gpt2-nano", 64
        args.repeats = 1
    load = harness.load_average()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    per_char = tokens_per_char(args.tokenizer_name)
    results: list[dict] = []
    stores = []
    try:
        for size in args.sizes:
            corpus = workdir / f"corpus-{size:.0e}.jsonl"
            corpus_bytes = make_corpus(corpus, size, per_char)
            row = {"target_tokens": size, "corpus_bytes": corpus_bytes}
            store = workdir / f"store-{size:.0e}"
            command = [sys.executable, "-m", "toolkit", "prepare", str(corpus), "--output_dir", str(store),
                       "--tokenizer_name", args.tokenizer_name, "--num_proc", str(args.num_proc),
                       "--shard_tokens", str(args.shard_tokens), "--no_progress"]
            pairs = []  # (prepare, raw) tokens/s, alternating, so a slow spell of the machine hits both
            for repeat in range(args.repeats):
                shutil.rmtree(store, ignore_errors=True)
                os.sync()  # the corpus (or the last store) written back first: the kernel's flush is no one's cost
                print(f"[{size:.0e} tokens] toolkit prepare ({repeat + 1}/{args.repeats}) ...", flush=True)
                r = harness.run(command, echo=args.echo).check()
                summary = next(line for _, line in r.lines if "tokens tokenized" in line)
                done = re.search(r"([\d,]+) tokens tokenized in ([\d.]+) s", summary)
                prepare_rate = int(done.group(1).replace(",", "")) / float(done.group(2))
                os.sync()
                print(f"[{size:.0e} tokens] raw tokenizers ({repeat + 1}/{args.repeats}) ...", flush=True)
                raw, rr = run_baseline("raw", "--corpus", str(corpus), "--tokenizer_name", args.tokenizer_name)
                pairs.append((prepare_rate, raw["tokens"] / raw["seconds"]))
            manifest = json.loads((store / "manifest.json").read_text())
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            busy = re.search(r"main process (\d+)% busy", summary)
            store_bytes, largest = folder_bytes(store)
            row.update(
                tokens=tokens,
                prepare_wall_s=r.wall_s,
                prepare_tokens_per_s=harness.median([p for p, _ in pairs]),
                raw_tokens_per_s=harness.median([w for _, w in pairs]),
                prepare_over_raw=harness.median([p / w for p, w in pairs]),
                pairs_tokens_per_s=pairs,
                prepare_peak_rss=tree_peak(r)[0],
                raw_peak_rss=tree_peak(rr)[0],
                main_busy=int(busy.group(1)) / 100 if busy else None,
                store_bytes=store_bytes,
                largest_file=largest,
                shards=len(manifest["splits"]["train"]["shards"]),
                summary=summary,
            )
            stores.append(store)
            print(f"[{size:.0e} tokens] nanoGPT prepare.py approach ...", flush=True)
            nano_dir = workdir / f"nanogpt-{size:.0e}"
            shutil.rmtree(nano_dir, ignore_errors=True)
            nano_dir.mkdir()
            os.sync()
            nano, nr = run_baseline("nanogpt", "--corpus", str(corpus), "--tokenizer_name", args.tokenizer_name,
                                    "--num_proc", str(args.num_proc), "--out", str(nano_dir))
            row.update(
                nanogpt_tokens_per_s=nano["tokens"] / nano["seconds"],
                nanogpt_peak_rss=tree_peak(nr)[0],
                nanogpt_cache_bytes=folder_bytes(nano_dir / "datasets-cache")[0],
            )
            shutil.rmtree(nano_dir, ignore_errors=True)
            results.append(row)
            ratio = row["prepare_over_raw"]
            print(
                f"    prepare {row['prepare_tokens_per_s']:,.0f} tok/s ({ratio:.2f}x raw), peak "
                f"{row['prepare_peak_rss'] / 2**20:,.0f} MiB; nanoGPT {row['nanogpt_tokens_per_s']:,.0f} tok/s, peak "
                f"{row['nanogpt_peak_rss'] / 2**20:,.0f} MiB, {row['nanogpt_cache_bytes'] / 2**20:,.0f} MiB cache",
                flush=True,
            )
        vocab = json.loads((stores[0] / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        seconds = 1.0 if args.quick else 10.0
        loader = {str(s.name): loader_rate(str(s), args.block_size, 8, seconds) for s in (stores[0], stores[-1])}
        train = training_rate(args.model, args.block_size, vocab, 1 if args.quick else 2)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    body = report(results, loader, train, args)
    print(body)
    harness.write_section(
        "data_scale",
        "7. Data at scale: toolkit prepare and the token store's loader",
        body,
        load=load,
        doc=Path(args.doc) if args.doc else None,
    )
    harness.save_json(args.json, {"sizes": results, "loader_blocks_per_s": loader, "train_blocks_per_s": train})
    return results


def report(results: list[dict], loader: dict, train: float, args) -> str:
    mib = 2**20
    rows = [
        [
            f"{r['tokens'] / 1e6:,.1f}M",
            f"{r['corpus_bytes'] / mib:,.0f}",
            f"{r['prepare_tokens_per_s']:,.0f}",
            f"{r['raw_tokens_per_s']:,.0f}",
            f"{r['prepare_over_raw']:.2f}",
            f"{r['nanogpt_tokens_per_s']:,.0f}",
            f"{r['prepare_tokens_per_s'] / r['nanogpt_tokens_per_s']:.2f}",
            f"{r['prepare_peak_rss'] / mib:,.0f}",
            f"{r['nanogpt_peak_rss'] / mib:,.0f}",
            f"{r['store_bytes'] / mib:,.0f}",
            f"{r['largest_file'] / mib:,.0f}",
            f"{r['nanogpt_cache_bytes'] / mib:,.0f}",
        ]
        for r in results
    ]
    table = harness.table(
        [
            "tokens",
            "corpus MiB",
            "prepare tok/s",
            "raw tok/s",
            "prepare / raw",
            "nanoGPT tok/s",
            "prepare / nanoGPT",
            "prepare peak RSS MiB",
            "nanoGPT peak RSS MiB",
            "store MiB",
            "largest shard MiB",
            "nanoGPT intermediate MiB",
        ],
        rows,
    )
    flat = results[-1]["prepare_peak_rss"] / results[0]["prepare_peak_rss"]
    per_core = results[-1]["prepare_tokens_per_s"] / args.num_proc
    busy = results[-1]["main_busy"]
    feeds = f"about {args.num_proc / busy:,.0f} workers" if busy else "(one process: not measured)"
    lines = [table, ""]
    lines.append(
        f"Peak RSS of prepare (main process + workers), largest corpus / smallest: {flat:.2f} "
        f"({results[-1]['tokens'] / results[0]['tokens']:.0f}x the tokens). Rates: prepare from starting its workers "
        "to its last shard (its summary line; the wall time with Python start and tokenizer loading is in the JSON), "
        f"raw the encode calls only, nanoGPT from load_dataset to the written memmap. prepare and raw ran "
        f"{args.repeats} time(s) each, alternating; the table gives the medians (prepare / raw: the median of each "
        "pair's ratio; every pair is in the JSON).\n"
    )
    pairs = "; ".join(
        f"{r['tokens'] / 1e6:,.1f}M: " + ", ".join(f"{p / w:.2f}" for p, w in r["pairs_tokens_per_s"]) for r in results
    )
    lines.append(f"prepare / raw of each pair, in run order: {pairs}.\n")
    rates = ", ".join(f"{k}: {v:,.0f} blocks/s" for k, v in loader.items())
    lines.append(
        f"Loader (blocks of {args.block_size} tokens, batches of 8, random order): {rates}; the {args.model} model "
        f"trains {train:,.2f} blocks/s on this CPU (forward + backward + AdamW, batch 1): the loader is "
        f"{min(loader.values()) / train:,.0f}x faster.\n"
    )
    times = ", ".join(f"{c} cores {FINEWEB_EDU_10B_TOKENS / (per_core * c) / 60:,.0f} min" for c in (16, 64))
    lines.append(
        f"Projection for FineWeb-Edu sample-10BT ({FINEWEB_EDU_10B_TOKENS / 1e9:.2f}B tokens, 2 bytes each: "
        f"{FINEWEB_EDU_10B_TOKENS * 2 / 1e9:.0f} GB of shards) at the measured {per_core:,.0f} tokens/s per core, "
        f"assuming linear scaling: {times}. The main process (reading, routing, writing) was {busy or 0:.0%} busy "
        f"with {args.num_proc} workers, so it can feed {feeds}; past that it sets the pace."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
