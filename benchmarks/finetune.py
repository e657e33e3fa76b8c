"""Fine-tuning: LoRA (recipes/lora.py) vs QLoRA (recipes/qlora.py) vs full fine-tuning (recipes/pretrain.py
--model_name_or_path) of the same base, pretrained here by recipes/pretrain.py, on the same data.

Data: Tiny Shakespeare cut into a training file (all but the last 10%) and a validation file (the last 10%); every
recipe packs the text as one document into blocks of --block tokens (lora/qlora: --text_sample_by document,
trl's wrapped packing) and evaluates on the validation file. Reported per method: trainable parameters, adapter
file size, model memory (get_memory_footprint of the base as the recipe loads it), peak process memory (RSS,
the kernel's high-water mark, and anonymous memory sampled every 0.1 s), s/step (train_runtime / steps) and eval loss
after N steps.

Every method runs with the same batch, sequence length, activation checkpointing (off, or on with
--gradient_checkpointing, which writes section 4b) and CPU allocator setting (freed memory kept for the next step,
--cpu_keep_freed_memory true): the recipes' own defaults differ (qlora.py checkpoints and hands freed memory back by
default), and a step-time comparison is only fair like for like. s/step is the median time between consecutive
training log lines (one per step) after the first two, so start-up and the first steps' warm-up are left out.
Two LoRA variants show what per-step extras cost: lora+metrics (--token_metrics: trl's entropy and top-1 accuracy
through its fused LM head) and lora+dropout (--lora_dropout 0.05: a mask and a dropped copy of every adapted input;
the recipes' default is 0).

    python benchmarks/finetune.py                         # 124M and 350M shapes, updates docs/benchmarks.md
    python benchmarks/finetune.py --shapes 124M --steps 10 --base_steps 20
    python benchmarks/finetune.py --quick --doc ''        # smoke version (tiny base)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import harness

SHAPES = {"124M": ["--preset", "gpt2"], "350M": ["--preset", "gpt2-medium"],
          "tiny": ["--preset", "gpt2-nano"]}
# method -> (recipe, extra flags)
METHODS = {"lora": ("lora", []), "qlora": ("qlora", []), "full": ("pretrain", []),
           "lora+metrics": ("lora", ["--token_metrics", "true"]), "lora+dropout": ("lora", ["--lora_dropout", "0.05"])}


def split_data(src: Path, workdir: Path, quick: bool) -> tuple[str, str]:
    text = src.read_text(encoding="utf-8")
    if quick:
        text = text[:120_000]
    cut = int(len(text) * 0.9)
    cut = text.rfind("\n\n", 0, cut) + 2  # at a speech boundary
    train, val = workdir / "train.txt", workdir / "val.txt"
    train.write_text(text[:cut], encoding="utf-8")
    # ~5k GPT-2 tokens: eval stays cheap
    val.write_text(text[cut:][: 20_000 if not quick else 4_000], encoding="utf-8")
    return str(train), str(val)


def pretrain_base(shape: str, tokenizer: str, train: str, val: str, out: Path, steps: int, block: int,
                  echo: bool) -> harness.Run:
    cmd = [sys.executable, str(harness.PRETRAIN), *SHAPES[shape], "--tokenizer_name", tokenizer, "--train_file", train,
           "--validation_file", val, "--block_size", str(block), "--per_device_train_batch_size", "8",
           "--max_steps", str(steps),
           "--learning_rate", "1e-3", "--warmup_steps", str(max(1, steps // 10)), "--logging_steps", "1",
           "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--sample_max_new_tokens", "1",
           "--output_dir", str(out)]
    return harness.run(cmd, echo=echo).check()


def random_base(out: Path) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(harness.GPT2_TOKENIZER)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=50304,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)


def finetune(method: str, base: Path, train: str, val: str, out: Path, steps: int, batch: int, block: int, lr: float,
             echo: bool, checkpointing: bool = False) -> dict:
    recipe, extra = METHODS[method]
    common = ["--model_name_or_path", str(base), "--train_file", train, "--validation_file", val,
              "--max_steps", str(steps), "--gradient_checkpointing", "true" if checkpointing else "false",
              "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", str(batch),
              "--logging_steps", "1", "--report_to", "none", "--output_dir", str(out), "--learning_rate", str(lr),
              "--cpu_keep_freed_memory", "true"]
    if method == "full":
        cmd = [sys.executable, str(harness.PRETRAIN), *common, "--block_size", str(block), "--warmup_steps", "0",
               "--lr_scheduler_type", "linear", "--eval_strategy", "no", "--save_strategy", "no",
               "--sample_max_new_tokens", "1"]
    else:
        cmd = [sys.executable, str(harness.REPO / "recipes" / f"{recipe}.py"), *common, "--text_sample_by", "document",
               "--max_length", str(block), "--sample_max_new_tokens", "1", *extra]
    r = harness.run(cmd, echo=echo).check()
    logs = harness.trainer_logs(r)
    step_times = [t for t, d in logs if "loss" in d]
    step_s = harness.median([b - a for a, b in zip(step_times[2:], step_times[3:])])
    if method == "full":
        eval_loss = json.loads((out / "eval_results.json").read_text())["eval_loss"]
        trainable = None  # all parameters: filled in by the caller
        adapter = os.path.getsize(out / "model.safetensors")
        recipe_peak = None
    else:
        results = json.loads((out / "all_results.json").read_text())
        eval_loss, recipe_peak = results["eval_loss_after"], results.get("peak_rss_mb")
        line = next(line for _, line in r.lines if line.startswith("trainable params:"))
        trainable = int(line.split()[2].replace(",", ""))
        adapter = os.path.getsize(out / "adapter_model.safetensors")
    script = Path(cmd[1]).name
    return {"method": method, "trainable": trainable, "saved_bytes": adapter, "eval_loss": eval_loss,
            "s_per_step": step_s, "peak_rss": max(r.rank_peaks(script) or [0]),
            "recipe_peak_rss_mb": recipe_peak,
            "peak_anon": max(r.rank_anon_peaks(script) or [0]),
            "command": harness.shown(cmd, out.parent)}  # the work folder as $TMP


def model_memory(base: Path) -> dict[str, int]:
    """get_memory_footprint() of the base loaded as lora.py (fp32) and qlora.py (NF4, fp32 compute) load it."""
    import torch

    from toolkit import lora, model_loading
    from toolkit.args.finetune import QuantizationArguments

    full = model_loading.load_model(str(base))
    out = {"fp32": full.get_memory_footprint(), "params": full.num_parameters()}
    del full
    q = QuantizationArguments()
    dtype = lora.compute_dtype(q.bnb_4bit_compute_dtype)
    model = model_loading.load_quantized_model(str(base), lora.bnb_config(q, dtype), dtype, device_map={"": "cpu"})
    out["4bit"] = model.get_memory_footprint()
    del model
    torch.set_num_threads(torch.get_num_threads())
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(p)
    p.add_argument("--shapes", nargs="+", default=["124M", "350M"], choices=list(SHAPES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=12, help="fine-tuning steps (N); s/step is timed over the last N-3")
    p.add_argument("--base_steps", type=int, default=10,
                   help="pretraining steps of the base (CPU budget: a short pretraining)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4, help="LoRA/QLoRA learning rate (the recipes' default)")
    p.add_argument("--full_lr", type=float, default=5e-5, help="full fine-tuning learning rate")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="every method with gradient checkpointing (as QLoRA is usually run); writes section 4b")
    args = p.parse_args(argv)
    if not harness.SHAKESPEARE.exists() or not harness.GPT2_TOKENIZER.exists():
        sys.exit(f"error: needs {harness.SHAKESPEARE} and {harness.GPT2_TOKENIZER} "
                 "(../shared/data beside the checkout)")
    if args.quick:
        args.shapes, args.steps, args.base_steps, args.batch, args.block = ["tiny"], 5, 2, 2, 32
    load = harness.load_average()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        workdir = Path(tmp)
        train, val = split_data(harness.SHAKESPEARE, workdir, args.quick)
        for shape in args.shapes:
            base = workdir / f"base-{shape}"
            if args.quick:  # smoke: a random tiny base made here saves one recipe start
                random_base(base)
            else:
                print(f"[{shape}] pretraining the base for {args.base_steps} steps ...", flush=True)
                pretrain_base(shape, str(harness.GPT2_TOKENIZER), train, val, base, args.base_steps, args.block,
                              args.echo)
            mem = model_memory(base)
            for method in args.methods:
                print(f"[{shape}] {method} ...", flush=True)
                lr = args.full_lr if method == "full" else args.lr
                r = finetune(method, base, train, val, workdir / f"{method}-{shape}", args.steps, args.batch,
                             args.block, lr, args.echo, args.gradient_checkpointing)
                if method == "full":
                    r["trainable"] = mem["params"]
                r.update(shape=shape, model_memory=mem["4bit"] if method == "qlora" else mem["fp32"])
                results.append(r)
                # survives an interrupted run
                harness.save_json(args.json, {"load": load, "partial": True, "results": results})
                print(f"    eval loss {r['eval_loss']:.4f}, {r['s_per_step']:.2f} s/step, "
                      f"peak RSS {r['peak_rss'] / 2**20:,.0f} MiB (anonymous {r['peak_anon'] / 2**20:,.0f} MiB)",
                      flush=True)

    rows = []
    for r in results:
        ref = next((x for x in results if x["shape"] == r["shape"] and x["method"] == "lora"), None)
        rows.append([r["shape"], r["method"], f"{r['trainable']:,}", f"{r['saved_bytes'] / 2**20:,.2f}",
                     f"{r['model_memory'] / 2**20:,.0f}",
                     f"{r['peak_rss'] / 2**20:,.0f}", f"{r['peak_rss'] / ref['peak_rss']:.2f}" if ref else "",
                     f"{r['peak_anon'] / 2**20:,.0f}",
                     f"{r['peak_anon'] / ref['peak_anon']:.2f}" if ref and ref["peak_anon"] else "",
                     f"{r['s_per_step']:.2f}", f"{r['s_per_step'] / ref['s_per_step']:.2f}" if ref else "",
                     f"{r['eval_loss']:.4f}",
                     f"{100 * (r['eval_loss'] / ref['eval_loss'] - 1):+.2f}%" if ref else ""])
    headers = ["shape", "method", "trainable params", "saved MiB (adapter / full model)", "model memory MiB",
               "peak RSS MiB", "peak RSS vs LoRA", "peak anonymous MiB", "anonymous vs LoRA", "s/step",
               "s/step vs LoRA",
               f"eval loss after {args.steps} steps", "eval loss vs LoRA"]
    out = harness.table(headers, rows)
    print(out)
    body = (f"{out}\n\n"
            + ("Every method with `--gradient_checkpointing true`. " if args.gradient_checkpointing else "")
            + f"Base: pretrained by `recipes/pretrain.py` for {args.base_steps} steps (batch 8 x {args.block}, "
            f"lr 1e-3, GPT-2 tokenizer) on the training file; fine-tuning: {args.steps} steps, batch {args.batch} x "
            f"{args.block} tokens, LoRA/QLoRA lr {args.lr} (recipe defaults otherwise: r 16, alpha 32, NF4 "
            "+ double quantization, fp32 compute), every method with the same checkpointing and freed memory kept "
            "(`--cpu_keep_freed_memory true`; qlora.py's own defaults checkpoint and hand freed memory back), full "
            f"fine-tuning lr {args.full_lr} linear decay. Peak RSS = highest resident memory of the recipe's process "
            "(the kernel's VmHWM, read every 0.1 s) (the LoRA/QLoRA recipes' own ru_maxrss figures are in the JSON); "
            "peak anonymous = the same without file-backed pages (Linux RssAnon): RSS also counts the pages of the "
            "memory-mapped checkpoint that loading touched, which the kernel drops under memory pressure (they are "
            "page cache, not the process's own memory). Model memory = `get_memory_footprint()` of the base as the "
            "recipe loads it.\n\nCommands (in `$TMP`):\n"
            + "\n".join(f"- `{r['command']}`" for r in results))
    if args.gradient_checkpointing:
        harness.write_section("finetune_checkpointing", "4b. Fine-tuning with gradient checkpointing", body, load=load,
                              doc=args.doc or None)
    else:
        harness.write_section("finetune", "4. Fine-tuning: LoRA vs QLoRA vs full", body, load=load,
                              doc=args.doc or None)
    harness.save_json(args.json, {"load": load, "results": results})
    return results


if __name__ == "__main__":
    main()
