"""Recipe overhead: end-to-end training-loop tokens/s of recipes/pretrain.py (HF Trainer) against
recipes/onefile_train.py (a plain PyTorch loop) on the same model shape, batch, tokenizer and data.

Both recipes run as real subprocesses with their real command lines, interleaved (onefile, pretrain, onefile,
pretrain, ...) so machine noise hits both alike. The figure is the wall clock between the first and the last
training log line of each run: steps, data loading, logging, evaluation (one inside the window) all count;
process start-up, data preparation and the first (warm-up) logging window do not.

    python benchmarks/recipe_overhead.py                      # tiny, small and 124M shapes, updates docs/benchmarks.md
    python benchmarks/recipe_overhead.py --shapes tiny --repeats 3
    python benchmarks/recipe_overhead.py --variant "no_tb=--report_to none" --variant "no_clip=--max_grad_norm 0"
    python benchmarks/recipe_overhead.py --quick --doc ''     # smoke version (the test suite runs this)
    python benchmarks/recipe_overhead.py --model_step         # the model code alone, in one process (section 1b)
    python benchmarks/recipe_overhead.py --allocator          # also both recipes under the other glibc setting
                                                              # (section 1)

A --variant adds a pretrain.py run with extra flags to every round (to find which default costs time);
flags listed in --both go to both recipes (e.g. --both "--max_grad_norm 0" compares loops without clipping).

--allocator adds two runs per round, so that each recipe is also compared under the same glibc malloc setting:
onefile_train.py with glibc told to keep freed memory (what pretrain.py does on CPU, toolkit/cpu_allocator.py; set
here through GLIBC_TUNABLES) and pretrain.py with --cpu_keep_freed_memory false (glibc's defaults, as onefile).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import harness

# name -> (model flags shared by both recipes, batch, block, steps, logging_steps, eval_steps)
SHAPES = {
    "tiny": (["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--n_positions", "256"], 16, 128, 60, 10, 30),
    "small": (["--n_layer", "6", "--n_head", "6", "--n_embd", "384", "--n_positions", "256"], 8, 256, 24, 4, 12),
    "124M": (["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--n_positions", "1024"], 4, 256, 8, 2, 4),
}
QUICK = {"tiny": (["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--n_positions", "128"], 8, 64, 6, 2, 4)}


def commands(shape, tokenizer: str, workdir: Path, tag: str, both: list[str], extra: list[str], val_pct: int):
    model, batch, block, steps, log_every, eval_every = shape
    common = [*model, "--tokenizer_name", tokenizer, "--block_size", str(block),
              "--per_device_train_batch_size", str(batch),
              "--per_device_eval_batch_size", str(batch), "--max_steps", str(steps), "--logging_steps", str(log_every),
              "--eval_strategy", "steps", "--eval_steps", str(eval_every), "--save_strategy", "no",
              "--validation_split_percentage", str(val_pct), "--warmup_steps", "2", *both]
    onefile = [sys.executable, str(harness.ONEFILE), *common, "--sample_max_new_tokens", "0",
               "--output_dir", str(workdir / f"onefile-{tag}")]
    pretrain = [sys.executable, str(harness.PRETRAIN), *common, "--sample_max_new_tokens", "1",
                "--output_dir", str(workdir / f"pretrain-{tag}"), *extra]
    return onefile, pretrain




def measure(kind: str, cmd: list[str], shape, echo: bool, env: dict | None = None) -> dict:
    model, batch, block, steps, log_every, eval_every = shape
    r = harness.run(cmd, env={**harness.env_for_runs(), **(env or {})}, echo=echo).check()
    if kind == "onefile":
        logs = harness.onefile_logs(r)
    else:
        logs = [(t, d) for t, d in harness.trainer_logs(r) if "loss" in d]
    loop = harness.loop_throughput(logs, log_every, batch * block)
    # The recipe's own figure (training steps only, evaluation excluded), for comparison.
    own = harness.median([d["tokens_per_s"] for _, d in logs[1:] if isinstance(d.get("tokens_per_s"), float)])
    peak = max((rss for _, rss in r.peak_rss.values()), default=0) / 2**20
    return {"loop_tokens_per_s": loop, "recipe_tokens_per_s": own, "process_wall_s": r.wall_s,
            "final_loss": logs[-1][1]["loss"], "peak_rss_mib": peak}


PROFILE_GROUPS = {  # cumulative time of these functions = one cost of the Trainer's loop (groups may nest)
    "model forward (HF GPT2LMHeadModel)": "modeling_gpt2.py:.*\\(forward\\)$",
    "loss (ForCausalLMLoss)": "loss_utils.py:.*\\(ForCausalLMLoss\\)$",
    "backward": "_tensor.py:.*\\(backward\\)$",
    "gradient clipping": "clip_grad.py:.*\\(clip_grad_norm_\\)$",
    "optimizer step": "optimizer.py:.*\\(wrapper\\)$",
    "data: DataLoader __next__ (collation)": "data_loader.py:.*\\(__iter__\\)$|dataloader.py:.*\\(__next__\\)$",
    "default_data_collator": "data_collator.py:.*\\(default_data_collator\\)$",
    "get_batch_samples (token counting)": "trainer.py:.*\\(get_batch_samples\\)$",
    "logging (Trainer.log + callbacks)": "trainer.py:.*\\(_maybe_log_save_evaluate\\)$",
    "evaluation": "trainer.py:.*\\(evaluate\\)$",
    "callbacks (all events)": "trainer_callback.py:.*\\(call_event\\)$",
    "training_step": "trainer.py:.*\\(training_step\\)$",
    "whole training loop": "trainer.py:.*\\(_inner_training_loop\\)$",
}


def profile(shape, args) -> list[dict]:
    """pretrain.py under cProfile (`python -m cProfile`): cumulative seconds of the loop's parts."""
    import pstats
    import re

    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        workdir = Path(tmp)
        tokenizer = args.tokenizer_name or default_tokenizer(workdir)
        _, pretrain = commands(shape, tokenizer, workdir, "profile", shlex.split(args.both), [], 5)
        prof = workdir / "pretrain.prof"
        cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), *pretrain[1:]]
        harness.run(cmd, echo=args.echo, sample_memory=False).check()
        stats = pstats.Stats(str(prof))
    rows = []
    for label, pattern in PROFILE_GROUPS.items():
        rx = re.compile(pattern)
        # max, not sum: several matches nest (every GPT-2 module's forward); the outermost holds the others
        total = max([v[3] for k, v in stats.stats.items() if rx.search(f"{k[0]}:{k[1]}({k[2]})")] or [0.0])
        rows.append({"part": label, "cumulative_s": total})
    loop = next(r["cumulative_s"] for r in rows if r["part"] == "whole training loop") or float("nan")
    print(harness.table(["part", "cumulative s", "% of loop"],
                        [[r["part"], r["cumulative_s"], f"{100 * r['cumulative_s'] / loop:.1f}%"] for r in rows]))
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:25]
    print("\nTop functions by own time:")
    for (f, line, fn), v in top:
        print(f"  {v[2]:8.3f} s  {v[1]:8d} calls  {Path(f).name}:{line}({fn})")
    harness.save_json(args.json, {"profile": rows, "command": shlex.join(cmd)})
    return rows


def model_step(args) -> list[dict]:
    """The two recipes' model code alone, in one process: transformers' GPT2LMHeadModel (what pretrain.py trains) vs
    onefile_train.py's GPT, forward + loss + backward at the tiny shape, interleaved step by step, at several blocks.

    Why several blocks: glibc serves every allocation of 32 MiB or more with a fresh mmap, faulted in page by page
    and unmapped when freed, on every step; smaller blocks are reused from the heap. At batch 16 x block 128 with a
    4096 vocabulary the logits (and their gradient) are exactly 32 MiB in transformers (all 128 positions) and
    31.75 MiB in onefile (which skips the last position, which has no target), so only one of the two pays."""
    import importlib.util

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from toolkit.presets import NEW_MODEL_ACTIVATION
    from toolkit.trainer import mark_causal_lm_loss

    spec = importlib.util.spec_from_file_location("onefile_train", harness.ONEFILE)
    onefile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(onefile)
    n_layer, n_head, n_embd, vocab, batch = (2, 2, 32, 512, 4) if args.quick else (2, 2, 64, 4096, 16)
    rounds = 3 if args.quick else args.rounds
    rows = []
    for block in ([16] if args.quick else args.blocks):
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=max(block, 256),
                                        vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        activation_function=NEW_MODEL_ACTIVATION, bos_token_id=0, eos_token_id=0))
        mark_causal_lm_loss(hf)
        mine = onefile.GPT(dict(vocab_size=vocab, n_positions=max(block, 256), n_embd=n_embd, n_layer=n_layer,
                                n_head=n_head, layer_norm_epsilon=1e-5, dropout=0.0))
        x = torch.randint(0, vocab, (batch, block))

        def step_hf(hf=hf, x=x):
            hf(input_ids=x, labels=x).loss.backward()
            hf.zero_grad(set_to_none=True)

        def step_onefile(mine=mine, x=x):
            mine(x, x)[1].backward()
            mine.zero_grad(set_to_none=True)

        times = {"transformers": [], "onefile": []}
        for _ in range(2):  # warm-up
            step_hf()
            step_onefile()
        for _ in range(rounds):
            for name, fn in (("transformers", step_hf), ("onefile", step_onefile)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {k: harness.median(v) for k, v in times.items()}
        row = {"block": block, "transformers_ms": 1e3 * med["transformers"], "onefile_ms": 1e3 * med["onefile"],
               "ratio": med["onefile"] / med["transformers"],
               "logits_mib_transformers": batch * block * vocab * 4 / 2**20,
               "logits_mib_onefile": batch * (block - 1) * vocab * 4 / 2**20}
        rows.append(row)
        print(f"block {block}: transformers {row['transformers_ms']:.1f} ms, onefile {row['onefile_ms']:.1f} ms, "
              f"ratio {row['ratio']:.3f}", flush=True)
    headers = ["block", "logits MiB (transformers / onefile)", "transformers step ms", "onefile step ms",
               "speed of transformers vs onefile"]
    out = harness.table(headers, [[r["block"], f"{r['logits_mib_transformers']:.2f} / {r['logits_mib_onefile']:.2f}",
                                   f"{r['transformers_ms']:.1f}", f"{r['onefile_ms']:.1f}", f"{r['ratio']:.3f}"]
                                  for r in rows])
    print(out)
    body = (f"{out}\n\nForward + loss + backward of the model code alone (no optimizer, no data, no Trainer), fp32, "
            f"{n_layer} layers x {n_embd} wide, vocab {vocab}, batch {batch}; {rounds} interleaved steps per model, "
            "medians. "
            "glibc maps every block of 32 MiB or more afresh on every step; a row whose logits are >= 32 MiB in one "
            "model and < 32 MiB in the other measures that, not the model code.")
    harness.write_section("model_step", "1b. Model code alone: transformers' GPT2LMHeadModel vs onefile's GPT", body,
                          doc=args.doc or None)
    harness.save_json(args.json, {"model_step": rows})
    return rows


def default_tokenizer(workdir: Path) -> str:
    """The recipes' own default: a 4096-token BPE trained on the embedded corpus (trained once here, so both recipes
    get the identical tokenizer). With GPT-2's 50k vocabulary the LM head and the loss dominate a small model's
    step and hide the loop's overhead."""
    from toolkit.data.corpus import embedded_documents
    from toolkit.tokenizer import train_bpe_tokenizer

    path = workdir / "bpe4096"
    train_bpe_tokenizer(embedded_documents(), 4096).save_pretrained(path)
    return str(path)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(p)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, nargs="+", default=[3, 2, 1],
                   help="rounds per shape (one number per shape, or one for all)")
    p.add_argument("--tokenizer_name", help="default: a 4096 BPE trained on the embedded corpus (pretrain.py's "
                                             "default); e.g. ../shared/data/gpt2-tokenizer for the real GPT-2 "
                                             "vocabulary")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="extra pretrain.py run with these flags")
    p.add_argument("--both", default="", help="flags passed to both recipes")
    p.add_argument("--allocator", action="store_true", help="also run onefile with glibc keeping freed memory and "
                                                            "pretrain.py without (--cpu_keep_freed_memory false): "
                                                            "same-allocator ratios")
    p.add_argument("--steps", type=int,
                   help="override the shapes' step counts (log every steps/6, evaluate at steps/2)")
    p.add_argument("--profile", action="store_true", help="instead: run pretrain.py once under cProfile at the "
                                                          "first shape and print where its time goes")
    p.add_argument("--model_step", action="store_true", help="instead: time the two recipes' model code alone "
                                                             "(tiny shape, one process, interleaved) at each --blocks")
    p.add_argument("--blocks", type=int, nargs="+", default=[120, 128, 129], help="block sizes for --model_step")
    p.add_argument("--rounds", type=int, default=30, help="interleaved steps per model for --model_step")
    args = p.parse_args(argv)
    if args.model_step:
        return model_step(args)
    if args.profile:
        return profile(SHAPES[args.shapes[0]] if not args.quick else QUICK["tiny"], args)
    load = harness.load_average()
    shapes = QUICK if args.quick else {k: SHAPES[k] for k in args.shapes}
    if args.steps:
        shapes = {k: (*s[:3], args.steps, max(1, args.steps // 6), max(1, args.steps // 2)) for k, s in shapes.items()}
    repeats = args.repeats if len(args.repeats) > 1 else args.repeats * len(shapes)
    # name -> (recipe, extra pretrain.py flags, extra environment, the onefile run it is compared with like for like)
    variants = {"pretrain": ("pretrain", [], {}, "onefile")}
    for v in args.variant:
        variants[v.split("=", 1)[0]] = ("pretrain", shlex.split(v.split("=", 1)[1]), {}, "onefile")
    if args.allocator:
        from toolkit.cpu_allocator import KEEP_FREED_TUNABLES

        variants["onefile_keep_freed"] = ("onefile", [], {"GLIBC_TUNABLES": KEEP_FREED_TUNABLES}, "onefile_keep_freed")
        variants["pretrain"] = ("pretrain", [], {}, "onefile_keep_freed")
        variants["pretrain_glibc_default"] = ("pretrain", ["--cpu_keep_freed_memory", "false"], {}, "onefile")
    both = shlex.split(args.both)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        workdir = Path(tmp)
        tokenizer = args.tokenizer_name or default_tokenizer(workdir)
        for (name, shape), reps in zip(shapes.items(), repeats if not args.quick else [1]):
            val_pct = 1 if name == "124M" else 5  # evaluation at 124M costs as much as several steps: keep it small
            for rep in range(reps):
                for vname, (recipe, extra, env, _) in ([("onefile", ("onefile", [], {}, "onefile"))]
                                                       + list(variants.items())):
                    onefile, pretrain = commands(shape, tokenizer, workdir, f"{name}-{vname}-{rep}", both, extra,
                                                 val_pct)
                    cmd = onefile if recipe == "onefile" else pretrain
                    print(f"[{name} round {rep + 1}/{reps}] {vname} ...", flush=True)
                    m = measure(recipe, cmd, shape, args.echo, env)
                    print(f"    loop {m['loop_tokens_per_s']:,.0f} tok/s "
                          f"(recipe's own: {m['recipe_tokens_per_s']:,.0f}), "
                          f"peak RSS {m['peak_rss_mib']:,.0f} MiB", flush=True)
                    results.append({"shape": name, "round": rep, "recipe": vname, **m, "env": env,
                                    "command": harness.shown(cmd[1:], workdir)})

    rows = []
    for name in shapes:
        def runs_of(vname, name=name):
            return [r for r in results if r["shape"] == name and r["recipe"] == vname]

        base = runs_of("onefile")
        for vname in ["onefile", *variants]:
            mine = runs_of(vname)
            # Ratio per round (each against the onefile run of the same round), then the median over rounds.
            ratios = [m["loop_tokens_per_s"] / b["loop_tokens_per_s"] for m, b in zip(mine, base)]
            like = variants[vname][3] if vname in variants else "onefile"
            same = [m["loop_tokens_per_s"] / b["loop_tokens_per_s"] for m, b in zip(mine, runs_of(like))]
            row = [name, vname, len(mine), harness.median([m["loop_tokens_per_s"] for m in mine]),
                   harness.median([m["recipe_tokens_per_s"] for m in mine]), harness.median(ratios),
                   " ".join(f"{x:.2f}" for x in ratios)]
            if args.allocator:
                row += [f"{harness.median(same):.3f} (vs {like})",
                        round(harness.median([m["peak_rss_mib"] for m in mine]))]
            rows.append(row)
    headers = ["shape", "recipe", "runs", "loop tok/s (median)", "recipe's own tok/s", "ratio vs onefile (median)",
               "ratio per round"]
    if args.allocator:
        headers += ["ratio under the same allocator", "peak RSS MiB"]
    out = harness.table(headers, rows)
    print(out)
    shape_lines = "\n".join(
        f"- {n}: `{' '.join(s[0])}`, batch {s[1]} x block {s[2]}, {s[3]} steps, log every {s[4]}, eval every {s[5]}"
        for n, s in shapes.items())
    body = (f"{out}\n\nShapes (both recipes, same tokenizer `{Path(tokenizer).name}`, embedded corpus, fp32, "
            f"no checkpoints):\n{shape_lines}\n\nExtra flags to both: `{args.both or '(none)'}`. Variants: "
            + (", ".join(f"{v} = {recipe} `{shlex.join(f)}`"
                         + (f" with {' '.join(f'{k}={x}' for k, x in e.items())}" if e else "")
                         for v, (recipe, f, e, _) in variants.items() if v != "pretrain") or "none") +
            "\n\n'loop tok/s' = tokens trained between the first and the last training log line / wall-clock seconds "
            "between them (evaluation and logging included); 'recipe's own' = the tokens/s the recipe logs "
            "(steps only).")
    harness.write_section("recipe_overhead", "1. Recipe overhead: pretrain.py (HF Trainer) vs onefile_train.py", body,
                          load=load, doc=args.doc or None)
    harness.save_json(args.json, {"load": load, "results": results, "table": rows})
    return results


if __name__ == "__main__":
    main()
