"""Quality at a fixed budget: pretrain on Tiny Shakespeare with the GPT-2 tokenizer and with a BPE trained by
pretrain.py, and compare validation loss per token and in bits per byte (comparable across tokenizers) after a
fixed wall-clock budget and after a fixed token budget.

Every run is the real recipes/pretrain.py. Wall-clock budget: the Trainer needs max_steps up front (the cosine
schedule decays to it), so each model shape's fp32 step time is probed in this process first (median of 4 steps of the
same GPT2LMHeadModel after 2 warm-up steps, /0.95 for the Trainer's overhead) and max_steps = budget / step time; the
table reports the training time each run really took. Token budget: max_steps = tokens / (batch x block).

Bits per byte: what pretrain.py logs (eval_bits_per_byte: the validation tokens' nats over ln 2 x their UTF-8
bytes, toolkit/lm_metrics.py); the same tokens-per-byte ratio turns the training-loss curve into bits per byte.

    python benchmarks/quality_budget.py                                  # default grid, 60 s budget, updates docs
    python benchmarks/quality_budget.py --budget_s 150 --configs "micro-bpe:preset=gpt2-micro,tok=bpe"
    python benchmarks/quality_budget.py --quick --doc ''                 # smoke version

A config is NAME:key=value,... with keys preset, tok (gpt2|bpe), vocab (BPE size), lr, batch, block, warmup,
opt (adamw|muon), muon_lr, and any n_layer/n_head/n_embd override.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import harness

DEFAULT_CONFIGS = [
    "micro-adamw:preset=gpt2-micro,tok=bpe,lr=3e-3,batch=16,block=128",
    "micro-muon:preset=gpt2-micro,tok=bpe,lr=3e-3,batch=16,block=128,opt=muon,muon_lr=0.05",
    "micro-muon-lr0.02:preset=gpt2-micro,tok=bpe,lr=3e-3,batch=16,block=128,opt=muon,muon_lr=0.02",
    "nano-adamw:preset=gpt2-nano,tok=bpe,lr=3e-3,batch=16,block=128",
    "nano-muon:preset=gpt2-nano,tok=bpe,lr=3e-3,batch=16,block=128,opt=muon,muon_lr=0.05",
    "mini-adamw:preset=gpt2-mini,tok=bpe,lr=1e-3,batch=8,block=128",
    "mini-muon:preset=gpt2-mini,tok=bpe,lr=1e-3,batch=8,block=128,opt=muon,muon_lr=0.05",
]
TOKEN_BUDGET_CONFIGS = ["micro-adamw", "micro-muon"]
QUICK_CONFIGS = ["q-gpt2:preset=gpt2-nano,tok=gpt2,lr=3e-3,batch=8,block=64",
                 "q-bpe:preset=gpt2-nano,tok=bpe,vocab=512,lr=3e-3,batch=8,block=64,opt=muon"]


def parse_config(spec: str) -> dict:
    name, _, body = spec.partition(":")
    cfg = {"name": name, "preset": "gpt2-micro", "tok": "bpe", "vocab": 4096, "lr": 1e-3, "batch": 16, "block": 128,
           "warmup": None, "opt": "adamw", "muon_lr": 0.05}
    for item in filter(None, body.split(",")):
        k, v = item.split("=", 1)
        cfg[k] = v if k in ("preset", "tok", "opt") else float(v) if k in ("lr", "muon_lr") else int(v)
    return cfg


def model_shape(cfg: dict) -> dict:
    from toolkit.presets import preset_fields

    shape = preset_fields(cfg["preset"])
    shape.update({k: cfg[k] for k in ("n_layer", "n_head", "n_embd") if k in cfg})
    return shape


def probe_step_seconds(cfg: dict, vocab: int) -> float:
    """Median time of one fp32 training step of this shape (GPT2LMHeadModel + fused AdamW), in this process."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from toolkit.presets import NEW_MODEL_ACTIVATION, pad_vocab

    # ids inside the vocabulary (only timing matters)
    model = GPT2LMHeadModel(GPT2Config(**model_shape(cfg), vocab_size=pad_vocab(vocab, 64), resid_pdrop=0,
                                       embd_pdrop=0, attn_pdrop=0, activation_function=NEW_MODEL_ACTIVATION,
                                       bos_token_id=0, eos_token_id=0))
    if cfg["opt"] == "muon":  # the optimizer's cost is part of the step: Muon's iterations cost more than AdamW
        from toolkit.muon import MuonWithAdamW, hidden_matrices

        hidden = set(hidden_matrices(model))
        named = list(model.named_parameters())
        rest = [{"params": [p for n, p in named if n not in hidden]}]
        opt = MuonWithAdamW([p for n, p in named if n in hidden], rest, lr=1e-4, muon_lr=1e-3, weight_decay=0.1,
                            fused=True, fan_out_dim=1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, vocab, (cfg["batch"], cfg["block"]))
    times = []
    for _ in range(6):
        t = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return harness.median(times[2:]) / 0.95  # the Trainer's own per-step cost: a few percent (section 1)


def pretrain(cfg: dict, steps: int, train_file: str, workdir: Path, echo: bool) -> dict:
    """One pretrain.py run; evaluation only at the end (pretrain.py always evaluates the final model), so the whole
    budget goes to training; the curve is the training loss, which on a first pass over the data is held-out loss."""
    out = workdir / f"{cfg['name']}-{steps}"
    warmup = cfg["warmup"] if cfg["warmup"] is not None else max(1, min(50, steps // 10))
    cmd = [sys.executable, str(harness.PRETRAIN), "--train_file", train_file, "--preset", cfg["preset"],
           *[a for k in ("n_layer", "n_head", "n_embd") if k in cfg for a in (f"--{k}", str(cfg[k]))],
           "--block_size", str(cfg["block"]), "--per_device_train_batch_size", str(cfg["batch"]),
           "--learning_rate", str(cfg["lr"]), "--warmup_steps", str(warmup), "--max_steps", str(steps),
           "--logging_steps", str(max(1, steps // 20)), "--eval_strategy", "no",
           "--save_strategy", "no", "--report_to", "none", "--sample_max_new_tokens", "1", "--output_dir", str(out)]
    cmd += (["--optim", "muon", "--muon_learning_rate", str(cfg["muon_lr"])] if cfg["opt"] == "muon"
            else ["--optim", "adamw_torch_fused"])  # explicit: the default for small presets is Muon
    if cfg["tok"] == "gpt2":
        cmd += ["--tokenizer_name", str(harness.GPT2_TOKENIZER)]
    else:
        cmd += ["--vocab_size", str(cfg["vocab"])]
    r = harness.run(cmd, echo=echo, sample_memory=False).check()
    logs = harness.trainer_logs(r)
    runtime = next(d["train_runtime"] for _, d in logs if "train_runtime" in d)
    results = json.loads((out / "eval_results.json").read_text())
    eval_loss, bpb = results["eval_loss"], results["eval_bits_per_byte"]
    to_bpb = bpb / eval_loss  # tokens per byte / ln 2
    t0 = next(t for t, d in logs if "loss" in d or "eval_loss" in d)
    curve = [(t - t0, d["loss"] * to_bpb) for t, d in logs if "loss" in d]
    return {"config": cfg["name"], "steps": steps, "tokens": steps * cfg["batch"] * cfg["block"],
            "train_runtime_s": runtime,
            "eval_loss": eval_loss, "bpb": bpb, "tokens_per_byte": to_bpb * math.log(2),
            "command": harness.shown(cmd, workdir), "train_curve": curve}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(p)
    p.add_argument("--train_file", default=str(harness.SHAKESPEARE))
    p.add_argument("--budget_s", type=float, default=60, help="wall-clock training budget per run (seconds)")
    p.add_argument("--token_budget", type=int, default=400_000,
                   help="tokens per run for the fixed-token comparison (0: skip)")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="NAME:key=value,... (see the module docstring)")
    p.add_argument("--token_configs", nargs="+", default=TOKEN_BUDGET_CONFIGS,
                   help="names (from --configs) run at --token_budget")
    p.add_argument("--time_configs", nargs="*", default=None, help="names run at --budget_s (default: all)")
    p.add_argument("--plot", default=str(harness.REPO / "docs" / "img" / "quality_budget.png"),
                   help="loss-curve PNG ('' = none)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --json (same budget and config) and run only the missing ones")
    args = p.parse_args(argv)
    if not Path(args.train_file).exists() or not harness.GPT2_TOKENIZER.exists():
        sys.exit(f"error: needs {args.train_file} and {harness.GPT2_TOKENIZER}; put ../shared/data beside the "
                 "checkout or pass --train_file")
    if args.quick:
        # one run per budget kind and tokenizer kind: the GPT-2 tokenizer on time, the BPE on tokens
        args.configs, args.budget_s, args.token_budget, args.token_configs = QUICK_CONFIGS, 4, 4096, ["q-bpe"]
        args.time_configs = ["q-gpt2"]
    load = harness.load_average()
    configs = [parse_config(c) for c in args.configs]
    done = {}
    if args.resume:
        if not args.json or not Path(args.json).exists():
            sys.exit("error: --resume reads the runs already done from --json FILE; give the file of the earlier run")
        saved = json.loads(Path(args.json).read_text())
        load = saved["load"]  # the machine's state when the measurements began
        done = {(r["budget"], r["config"]): r for r in saved["results"]}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        workdir = Path(tmp)
        for cfg in configs:
            if args.time_configs and cfg["name"] not in args.time_configs:
                continue
            if (budget := f"{args.budget_s:.0f} s", cfg["name"]) in done:
                results.append(done[budget, cfg["name"]])
                continue
            vocab = 50257 if cfg["tok"] == "gpt2" else cfg["vocab"]
            step_s = probe_step_seconds(cfg, vocab)
            steps = max(4, int(args.budget_s / step_s))
            print(f"[time budget {args.budget_s:.0f} s] {cfg['name']}: probe {step_s:.3f} s/step -> {steps} steps",
                  flush=True)
            r = pretrain(cfg, steps, args.train_file, workdir, args.echo)
            results.append({"budget": f"{args.budget_s:.0f} s", **r})
            # survives an interrupted run
            harness.save_json(args.json, {"load": load, "partial": True, "results": results})
            print(f"    eval loss {r['eval_loss']:.4f} nats/token, {r['bpb']:.4f} bits/byte, "
                  f"trained {r['train_runtime_s']:.0f} s", flush=True)
        for name in args.token_configs if args.token_budget else []:
            cfg = next(c for c in configs if c["name"] == name)
            if (budget := f"{args.token_budget:,} tokens", name) in done:
                results.append(done[budget, name])
                continue
            steps = max(2, args.token_budget // (cfg["batch"] * cfg["block"]))
            print(f"[token budget {args.token_budget:,}] {name}: {steps} steps", flush=True)
            r = pretrain(cfg, steps, args.train_file, workdir, args.echo)
            results.append({"budget": f"{args.token_budget:,} tokens", **r})
            harness.save_json(args.json, {"load": load, "partial": True, "results": results})
            print(f"    eval loss {r['eval_loss']:.4f} nats/token, {r['bpb']:.4f} bits/byte", flush=True)

    rows = [[r["budget"], r["config"], r["steps"], f"{r['tokens']:,}", f"{r['train_runtime_s']:.0f}",
             f"{r['tokens_per_byte']:.3f}", f"{r['eval_loss']:.4f}", f"{r['bpb']:.4f}"] for r in results]
    out = harness.table(["budget", "config", "steps", "tokens", "train s", "tokens/byte", "val loss (nats/token)",
                         "val bits/byte"], rows)
    print(out)
    timed = [r for r in results if r["budget"].endswith(" s")]
    best = min(timed, key=lambda r: r["bpb"]) if timed else None
    plot_note = ""
    if args.plot and timed:
        series = {r["config"]: tuple(zip(*r["train_curve"])) for r in timed if r["train_curve"]}
        harness.plot(Path(args.plot), series, "seconds since the first log line", "training loss, bits per byte",
                     f"Tiny Shakespeare, {args.budget_s:.0f} s budget per run")
        docs = harness.REPO / "docs"
        link = Path(args.plot).relative_to(docs) if Path(args.plot).is_relative_to(docs) else args.plot
        plot_note = f"\n\n![training loss in bits/byte against time]({link})"
    configs_text = "\n".join(f"- `{c}`" for c in args.configs)
    body = (f"{out}\n\nData `{Path(args.train_file).name}` (one document; its last 5% of tokens validate), fp32, "
            f"1 process. Configs:\n{configs_text}\n\nThe BPE (`tok=bpe`) is trained by pretrain.py on the training "
            "file, which is the whole file: the validation text is in its training data (the GPT-2 tokenizer never "
            "saw it).\n\n"
            + (f"Best at the wall-clock budget: **{best['config']}** ({best['bpb']:.4f} bits/byte): "
               f"`{best['command']}`" if best else "")
            + "\n\nExact command of every run: see the JSON (`--json`)." + plot_note)
    harness.write_section("quality_budget", "3. Quality at a fixed budget (Tiny Shakespeare)", body, load=load,
                          doc=args.doc or None)
    harness.save_json(args.json, {"load": load, "results": results})
    return results


if __name__ == "__main__":
    main()
