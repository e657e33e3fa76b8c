"""`toolkit eval`: loss, perplexity and bits per byte of a model on any text, and lm-eval benchmarks.

    toolkit eval out/pretrain --text_file valid.txt                   # non-overlapping windows of the context
    toolkit eval gpt2 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --stride 512
    toolkit eval gpt2 --tasks hellaswag                               # needs the [eval] extra (lm-eval)
    toolkit eval gpt2 --adapter out/lora-gpt2 --text_file chat.jsonl --json

Text is read as pretrain.py reads it (a .txt file is one document, a table row is one document, EOS after
each) and scored in windows of --block_size tokens. By default the windows do not overlap, as in
pretrain.py's evaluation, so each window's first token has no context and is not scored. With --stride S
(< block size) the windows advance by S tokens and only the tokens no earlier window scored are scored,
each seeing at least block_size - S tokens of context (transformers' perplexity guide): a lower, more
faithful estimate at block_size / S times the compute. Bits per byte divide the scored tokens' total
loss by ln 2 times the UTF-8 bytes those tokens encode (toolkit/lm_metrics.py).

Cost: time is linear in the tokens read (one batched forward per --batch_size windows, x block/stride with
--stride); memory does not grow with the text (read and tokenized in pieces on a background thread by
toolkit/data/corpus.py, windows streamed): batch_size x block_size x vocabulary logits at most.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from toolkit.errors import OneLineArgumentParser, UserError, exit_on_user_error


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults in --help, and the module docstring's examples kept as written."""



@dataclass
class TextScore:
    source: str
    tokens: int  # scored (target) tokens
    bytes: int  # UTF-8 bytes of the scored tokens
    loss: float  # mean nats per scored token
    perplexity: float
    bits_per_byte: float
    block_size: int
    stride: int
    windows: int


# --------------------------------------------------------------------------------------------------
# Windows and scoring
# --------------------------------------------------------------------------------------------------


def windows(chunks: Iterable[np.ndarray], block_size: int, stride: int) -> Iterator[tuple[np.ndarray, int]]:
    """(window ids, index of its first scored position) over a token stream given in chunks.

    Window k covers [k*stride, k*stride + block_size) (the last one ends with the stream) and scores the
    positions no earlier window scored; position 0 of the stream has no context and is never scored.
    """
    buf = np.zeros(0, np.int64)
    buf_start = begin = prev_end = 0  # absolute positions in the stream
    for chunk in chunks:
        buf = np.concatenate([buf, np.asarray(chunk, dtype=np.int64)])
        while buf_start + len(buf) >= begin + block_size:
            lo = begin - buf_start
            first = max(prev_end, begin + 1) - begin
            yield buf[lo:lo + block_size].copy(), first
            prev_end = begin + block_size
            begin += stride
            buf, buf_start = buf[begin - buf_start:], begin
    end = buf_start + len(buf)
    first = max(prev_end, begin + 1) - begin
    if end - begin > first:
        yield buf[begin - buf_start:].copy(), first


def _score_batch(model, batch: list[tuple[np.ndarray, int]], device):
    """Sum of target NLLs (nats, a 0-d float64 tensor left on the device) for windows of one length."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.stack([w for w, _ in batch])).to(device)
    lo = min(first for _, first in batch)
    keep = torch.arange(lo - 1, x.shape[1] - 1, device=device)  # logits only where a target is scored
    logits = model(input_ids=x, logits_to_keep=keep).logits
    targets = x[:, lo:].clone()
    for row, (_, first) in enumerate(batch):
        targets[row, : first - lo] = -100
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return nll.double()


def score_token_chunks(model, chunks: Iterable, byte_counter, block_size: int, stride: int | None = None,
                       batch_size: int = 8, progress: bool = True, source: str = "tokens") -> TextScore:
    """Score a token stream. `chunks` yields token id arrays, or (ids, fraction of the source read) pairs for
    the progress bar's estimate. This is the entry point for text already tokenized (e.g. a token store)."""
    import torch
    from tqdm.auto import tqdm

    stride = stride or block_size
    device = next(model.parameters()).device
    state = {"fraction": 0.0, "read": 0}

    def ids_only():
        for item in chunks:
            ids, fraction = item if isinstance(item, tuple) else (item, None)
            state["read"] += len(ids)
            state["fraction"] = fraction
            yield ids

    bar = tqdm(total=None, unit="tok", unit_scale=True, desc="scoring", disable=not progress, file=sys.stderr)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = n_bytes = n_windows = 0
    pending: list[tuple[np.ndarray, int]] = []

    def run(batch):
        nonlocal nll, n_tokens, n_bytes, n_windows
        nll += _score_batch(model, batch, device)
        scored = sum(len(w) - first for w, first in batch)
        n_tokens += scored
        n_bytes += sum(byte_counter.count(w[first:]) for w, first in batch)
        n_windows += len(batch)
        if state["fraction"]:
            bar.total = max(int(state["read"] / state["fraction"]), bar.n + scored)
        bar.update(scored)

    with torch.inference_mode():
        for window, first in windows(ids_only(), block_size, stride):
            if len(window) < block_size:  # the stream's last, shorter window: a batch of its own
                if pending:
                    run(pending)
                    pending = []
                run([(window, first)])
                continue
            pending.append((window, first))
            if len(pending) == batch_size:
                run(pending)
                pending = []
        if pending:
            run(pending)
    bar.close()
    if n_tokens == 0:
        raise UserError(f"{source} has fewer than 2 tokens: nothing to score; pass a longer text")
    from toolkit.lm_metrics import bits_per_byte, perplexity

    total = nll.item()
    mean = total / n_tokens
    return TextScore(source, n_tokens, n_bytes, mean, perplexity(mean), bits_per_byte(total, n_bytes), block_size,
                     stride, n_windows)


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="toolkit eval", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="model folder or Hub name; may be left out with --adapter")
    p.add_argument("--adapter", default=None, help="LoRA/QLoRA adapter folder or Hub repo to apply on the model")
    text = p.add_argument_group("language-model quality: loss, perplexity, bits per byte")
    text.add_argument("--text_file", nargs="+", default=None,
                      help=".txt/.md (one document per file), .json/.jsonl/.parquet/.csv (one per row) or folders "
                           "of them")
    text.add_argument("--dataset_name", default=None, help="a datasets name (Hub or local folder), e.g. wikitext")
    text.add_argument("--dataset_config_name", default=None, help="its configuration, e.g. wikitext-103-raw-v1")
    text.add_argument("--dataset_split", default=None,
                      help="split to score (default: validation, else valid, else test)")
    text.add_argument("--text_column", default="text", help="column holding the text in tables and datasets")
    text.add_argument("--block_size", type=int, default=None,
                      help="window length in tokens (default: the block size the model was trained on, when "
                           "recipes/pretrain.py recorded it in config.json, else the model's context)")
    text.add_argument("--stride", type=int, default=None,
                      help="advance windows by this many tokens and score only the new ones (default: block_size, "
                           "no overlap)")
    text.add_argument("--max_tokens", type=int, default=None, help="score only the first N tokens of the text")
    bench = p.add_argument_group("benchmarks (lm-evaluation-harness, the [eval] extra)")
    bench.add_argument("--tasks", default=None,
                       help="comma-separated lm-eval tasks or groups, e.g. hellaswag,lambada_openai")
    bench.add_argument("--num_fewshot", type=int, default=None,
                       help="few-shot examples (default: each task's own, usually 0)")
    bench.add_argument("--limit", type=float, default=None,
                       help="examples per task (a fraction if < 1); for quick checks only")
    bench.add_argument("--include_path", default=None, help="folder with your own lm-eval task YAML files")
    p.add_argument("--batch_size", type=int, default=8, help="windows (or lm-eval requests) per forward pass")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bf16 on a GPU that has it, else fp32 (always fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with every result on stdout (messages on stderr)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--token", default=None, help="Hub token for a private model, adapter or dataset (never printed)")
    return p


def check_options(args, context: int | None = None) -> None:
    """Ranges of the numeric options; block_size and stride against the model's context once it is known."""
    if not (args.text_file or args.dataset_name or args.tasks):
        raise UserError("nothing to evaluate: pass --text_file or --dataset_name (loss, perplexity, bits per byte) "
                        "and/or --tasks hellaswag,... (lm-eval benchmarks)")
    if args.text_file and args.dataset_name:
        raise UserError("pass either --text_file or --dataset_name, not both")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size} must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max_tokens {args.max_tokens} must be at least 2 (one token is context for the next)")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit} must be > 0 (a count, or a fraction of each task when < 1)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num_fewshot {args.num_fewshot} must be >= 0")
    if args.block_size is not None and args.block_size < 2:
        raise UserError(f"--block_size {args.block_size} must be at least 2")
    if context is not None:
        block = args.block_size or context
        if block > context:
            raise UserError(f"--block_size {block} is larger than the model's context of {context} tokens; "
                            f"lower it to {context} or less")
        if args.stride is not None and not 1 <= args.stride <= block:
            raise UserError(f"--stride {args.stride} must be between 1 and the block size ({block})")
    elif args.stride is not None and args.stride < 1:
        raise UserError(f"--stride {args.stride} must be between 1 and the block size")


def _limit_tokens(chunks, max_tokens: int | None):
    if max_tokens is None:
        yield from chunks
        return
    left = max_tokens
    for ids, _fraction in chunks:
        ids = ids[:left]
        left -= len(ids)
        yield ids, (max_tokens - left) / max_tokens
        if left <= 0:
            return


def text_corpora(args) -> list:
    """The --text_file paths as corpora (toolkit/data/corpus.py, as recipes/pretrain.py reads its data); a missing,
    empty or unsupported file fails here, before the model loads."""
    from toolkit.data.corpus import Corpus

    return [Corpus.from_files(path, args.text_column) for path in args.text_file]


def dataset_corpus(args):
    """--dataset_name's split to score (default: validation, else valid, else test)."""
    from toolkit.data.corpus import VALIDATION_SPLITS, Corpus, dataset_split_names

    name, split = args.dataset_name, args.dataset_split
    names = dataset_split_names(name, args.dataset_config_name, args.token)
    if names is None:
        raise UserError(f"could not load dataset '{name}'; check the name and --dataset_config_name, or use "
                        "--text_file")
    if split is None:
        split = next((s for s in VALIDATION_SPLITS if s in names), None)
        if split is None:
            raise UserError(f"dataset '{name}' has no validation or test split (it has {names}); pass --dataset_split")
    if split not in names:
        raise UserError(f"dataset '{name}' has no '{split}' split (it has {names}); pass --dataset_split")
    corpus = Corpus.from_dataset(name, args.dataset_config_name, split, args.text_column, streaming=False,
                                 token=args.token)
    print(f"evaluating split '{split}' of {name} ({int(corpus.progress_total()[0]):,} rows)", file=sys.stderr)
    return corpus


def text_pieces(corpora_of):
    """(texts, which text ends a document, fraction read) over the corpora in order; `corpora_of()` runs on the
    reading thread, so a dataset loads while the model does."""
    corpora = corpora_of()
    for k, corpus in enumerate(corpora):
        for texts, ends, fraction in corpus.pieces():
            yield texts, ends, (k + fraction) / len(corpora)


def tokenize_pieces(pieces, tokenizer) -> Iterator[tuple[np.ndarray, float]]:
    """Token ids of each group of pieces, packed as every corpus is (toolkit/data/corpus.pack_documents)."""
    from toolkit.data.corpus import pack_documents

    for texts, ends, fraction in pieces:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        yield pack_documents(ids, tokenizer.eos_token_id, ends=ends)[0], fraction


def prefetch(iterable: Iterable, depth: int = 4) -> Iterator:
    """Run `iterable` on a background thread (the tokenizer releases the GIL) while the model scores. The thread
    ends when the consumer stops early (--max_tokens) too."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(item):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread, raised there
            put(err)
        put(done)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def evaluate_text(loaded, args) -> TextScore:
    from toolkit.lm_metrics import ByteCounter

    if args.text_file:
        pieces, source = text_pieces(lambda: text_corpora(args)), ", ".join(args.text_file)
    else:
        pieces, source = text_pieces(lambda: [dataset_corpus(args)]), args.dataset_name
    chunks = _limit_tokens(prefetch(tokenize_pieces(pieces, loaded.tokenizer)), args.max_tokens)
    return score_token_chunks(loaded.model, chunks, ByteCounter(loaded.tokenizer), args.block_size, args.stride,
                              args.batch_size, progress=not args.no_progress, source=f"'{source}'")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_options(args)

    from toolkit.inference import load_for_inference, model_context, resolve_model
    from toolkit.lm_eval_tasks import parse_tasks, run_tasks, scores, table, task_manager

    model_name, adapter_cfg = resolve_model(args.model, args.adapter, args.token)
    context, trained_block = model_context(model_name, args.token)
    check_options(args, context)
    args.block_size = args.block_size or trained_block
    if args.text_file:
        text_corpora(args)  # missing or empty files fail before the model loads
    tasks = parse_tasks(args.tasks) if args.tasks else []
    manager = task_manager(tasks, args.include_path) if tasks else None
    loaded = load_for_inference(model_name, args.adapter, adapter_cfg, args.dtype, args.device, args.token)
    print(f"evaluating {loaded.name} ({loaded.dtype}, {loaded.device})", file=sys.stderr, flush=True)

    report: dict = {"model": model_name, "adapter": args.adapter, "dtype": loaded.dtype}
    if args.text_file or args.dataset_name:
        result = evaluate_text(loaded, args)
        report["text"] = asdict(result)
        if not args.json:
            print(f"{result.source}: {result.tokens:,} tokens scored ({result.bytes:,} bytes) in "
                  f"{result.windows:,} windows of {result.block_size}, stride {result.stride}")
            print(f"loss {result.loss:.4f} nats/token | perplexity {result.perplexity:.3f} | "
                  f"bits per byte {result.bits_per_byte:.4f}")
    if tasks:
        results = run_tasks(loaded.model, loaded.tokenizer, tasks, manager, limit=args.limit,
                            num_fewshot=args.num_fewshot, batch_size=args.batch_size)
        report["tasks"] = scores(results)
        report["lm_eval"] = {"version": results.get("config", {}).get("lm_eval_version") or _lm_eval_version(),
                             "n-shot": results.get("n-shot"), "limit": args.limit}
        if not args.json:
            print(table(results))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None
