"""`toolkit eval` speed and memory against the training step's forward pass, on the same model in the same process.

The baseline is the forward half of pretrain.py's training step (train mode, bf16 autocast on a GPU that has it,
fp32 on CPU; logits for the first T-1 positions and the shifted-label loss, as PretrainTrainer.compute_loss does),
on random token blocks, tokens/s. The measured figure is `toolkit eval`'s own code path (toolkit.evaluation:
read a text file in pieces, tokenize on a background thread, stream windows, batched forward, bits per byte) end
to end, at three text lengths: tokens scored per second of wall time, and the peak memory of the scoring (GPU:
max allocated; CPU: the process's RSS high-water mark, reset before each length) to show it does not grow with
the text. Baseline and eval alternate (A B A B), so machine noise hits both; the ratio is eval / baseline.

    python benchmarks/eval_speed.py                                   # gpt2 (124M) shape, 250k/500k/1M tokens
    python benchmarks/eval_speed.py --model out/pretrain --tokens 100000,200000,400000
    python benchmarks/eval_speed.py --quick --doc ''                  # smoke version (seconds)

The weights are random unless --model is given (speed does not depend on them). Text: --text_file, else the
embedded corpus (Python's documentation topics) repeated to the largest length.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import harness

sys.path.insert(0, str(harness.REPO))


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the process's RSS high-water mark (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (harness.proc_status(os.getpid(), "VmHWM") or 0) / 2**20


def train_forward_rate(model, batch: int, block: int, vocab: int, bf16: bool, seconds: float) -> float:
    """Tokens/s of the forward half of a training step (no backward), as PretrainTrainer runs it."""
    import torch

    device = next(model.parameters()).device
    model.train()
    x = torch.randint(0, vocab, (batch, block), device=device)
    inputs = {"input_ids": x, "labels": x, "shift_labels": x[:, 1:].contiguous(),
              "logits_to_keep": torch.arange(block - 1, device=device)}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        return loss

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        loss = step()
        steps += 1
        del loss
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch * block / (time.perf_counter() - start)


def text_file_with(tokens: int, tokenizer, source: str | None, folder: str) -> str:
    """A .txt file holding at least `tokens` tokens: --text_file, or the embedded corpus, repeated."""
    from toolkit.data.corpus import embedded_documents

    text = Path(source).read_text(encoding="utf-8") if source else "\n\n".join(embedded_documents())
    per_copy = len(tokenizer(text, add_special_tokens=False).input_ids)
    path = os.path.join(folder, "eval.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(text + "\n\n" for _ in range(tokens // max(per_copy, 1) + 2))
    return path


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model folder (default: a random --preset model)")
    parser.add_argument("--preset", default="gpt2", help="shape of the random model when no --model is given")
    parser.add_argument("--tokenizer_name", default=None,
                        help="tokenizer for a random model (default: ../shared/data/gpt2-tokenizer if present, "
                             "else a BPE trained on the embedded corpus)")
    parser.add_argument("--text_file", default=None, help="text to evaluate (repeated up to the largest length)")
    parser.add_argument("--tokens", default="250000,500000,1000000", help="comma-separated text lengths in tokens")
    parser.add_argument("--block_size", type=int, default=None,
                        help="window / training block (default: the model's context)")
    parser.add_argument("--train_batch_size", type=int, default=16,
                        help="sequences per training forward (pretrain.py's default)")
    parser.add_argument("--eval_batch_size", type=int, default=8,
                        help="windows per eval forward (toolkit eval's default)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time each baseline measurement runs at least")
    harness.add_common_args(parser)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from toolkit import evaluation, presets
    from toolkit.commands import eval as eval_command
    from toolkit.inference import load_for_inference
    from toolkit.tokenizer import load_tokenizer, train_bpe_tokenizer

    if args.quick:
        args.preset, args.tokens, args.block_size, args.seconds = "gpt2-nano", "2000,4000,8000", 64, 0.5
        args.train_batch_size, args.eval_batch_size = 4, 4
    sizes = [int(t) for t in args.tokens.split(",")]
    load = harness.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            if args.tokenizer_name or (harness.GPT2_TOKENIZER.exists() and not args.quick):
                tokenizer = load_tokenizer(args.tokenizer_name or str(harness.GPT2_TOKENIZER))
            else:
                from toolkit.data.corpus import embedded_documents

                tokenizer = train_bpe_tokenizer(embedded_documents(), 512 if args.quick else 4096)
            config = presets.build_gpt2_config(args.preset, len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
            torch.manual_seed(0)
            model_dir = os.path.join(tmp, "model")
            AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
        loaded = load_for_inference(model_dir)  # toolkit eval's loader: bf16 on a GPU that has it, fp32 on CPU
        device = next(loaded.model.parameters()).device
        bf16 = loaded.dtype == "bfloat16"
        # pretrain.py's fp32 weights
        train_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        block = args.block_size or train_model.config.n_positions
        vocab = len(loaded.tokenizer)
        text = text_file_with(max(sizes), loaded.tokenizer, args.text_file, tmp)
        print(f"model {model_dir if args.model else args.preset} ({train_model.num_parameters():,} parameters) "
              f"on {device}, eval in {loaded.dtype}, training forward {'bf16 autocast' if bf16 else 'fp32'}; "
              f"block {block}", flush=True)

        rows, raw = [], []
        for size in sizes:
            base = train_forward_rate(train_model, args.train_batch_size, block, vocab, bf16, args.seconds)
            ns = eval_command.build_parser().parse_args([model_dir, "--text_file", text, "--block_size", str(block),
                                                       "--batch_size", str(args.eval_batch_size),
                                                       "--max_tokens", str(size), "--no_progress"])
            _peak_reset(device)
            start = time.perf_counter()
            result = evaluation.evaluate_text(loaded, ns)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            rate = result.tokens / wall
            rows.append([f"{size:,}", f"{rate:,.0f}", f"{base:,.0f}", round(rate / base, 3),
                         round(_peak_mb(device), 1), round(result.bits_per_byte, 4)])
            raw.append({"tokens": size, "scored": result.tokens, "eval_tokens_per_s": rate,
                        "train_forward_tokens_per_s": base, "ratio": rate / base, "peak_mb": _peak_mb(device),
                        "wall_s": wall})
            print(f"  {size:,} tokens: eval {rate:,.0f} tok/s, training forward {base:,.0f} tok/s, "
                  f"ratio {rate / base:.2f}", flush=True)

    headers = ["text tokens", "toolkit eval tok/s", "training forward tok/s", "ratio (eval / forward)",
               "eval peak memory (MiB)", "bits per byte"]
    body = harness.table(headers, rows)
    print(body)
    memory = "GPU max allocated" if raw and device.type == "cuda" else "process RSS high-water mark"
    note = (f"\n\nToolkit eval end to end (reading, tokenizing, windows of {block}, batch {args.eval_batch_size}) "
            f"against the forward half of a training step (batch {args.train_batch_size} x {block}); peak memory "
            f"is the {memory} during the scoring of each length. Target: ratio >= 1, memory flat in the text length.")
    harness.write_section("eval_speed", "8. toolkit eval: speed and memory against the training forward pass",
                          body + note, load=load, doc=Path(args.doc) if args.doc else None)
    harness.save_json(args.json, raw)
    return raw


if __name__ == "__main__":
    main()
