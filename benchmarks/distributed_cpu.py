"""Distributed on CPU: recipes/pretrain.py in 1 process vs DDP vs FSDP2 at 2 processes (gloo): tokens/s and
memory per rank, against toolkit plan's per-rank prediction.

Launches are the documented ones (accelerate_configs/*_cpu.yaml); each rank gets the same per-device batch,
so DDP/FSDP2 train twice the tokens per step. Rounds are interleaved (1proc, ddp, fsdp2, 1proc, ...).
Memory per rank = peak RSS of each rank's process (the kernel's VmHWM, read every 0.1 s). FSDP2 shards parameters,
gradients and AdamW state, so its rank should hold (1 - 1/2) x (params + grads + optimizer) less than a DDP rank:
the table sets that measured saving beside the one the planner predicts, and each rank's peak beside the plan.

    python benchmarks/distributed_cpu.py                   # gpt2-mini shape, GPT-2 tokenizer,
                                                           # updates docs/benchmarks.md
    python benchmarks/distributed_cpu.py --preset gpt2 --steps 6 --repeats 1
    python benchmarks/distributed_cpu.py --quick --doc ''  # smoke version
    python benchmarks/distributed_cpu.py --extra "--cpu_keep_freed_memory false"   # one allocator setting for all

pretrain.py keeps freed memory on CPU (faster steps, toolkit/cpu_allocator.py) except under FSDP, so by default the
1-process and DDP rows run with that setting and FSDP2 with glibc's; --extra "--cpu_keep_freed_memory false" puts
every launch on glibc's defaults, which isolates what sharding saves.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import tempfile
from pathlib import Path

import harness

LAUNCHES = {
    "1 process": [sys.executable],
    "DDP x2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/ddp_cpu.yaml"],
    "FSDP2 x2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 "accelerate_configs/fsdp_cpu.yaml"],
}
PLAN_STRATEGY = {"1 process": ("single", 1), "DDP x2": ("ddp", 2), "FSDP2 x2": ("fsdp", 2)}


def command(launch: str, model: list[str], tokenizer: list[str], batch: int, block: int, steps: int, log_every: int,
            out: Path):
    cmd = [*LAUNCHES[launch], str(harness.PRETRAIN), *model, *tokenizer, "--block_size", str(block),
           "--per_device_train_batch_size", str(batch),
           # eval batch = train batch: with pretrain.py's dataloader_drop_last=True a 32-block eval batch x 2 ranks can
           # exceed the validation blocks, leaving no eval batch at all (then pretrain.py fails on
           # metrics["eval_loss"])
           "--per_device_eval_batch_size", str(batch), "--max_steps", str(steps), "--logging_steps", str(log_every),
           "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--sample_max_new_tokens", "1",
           "--optim", "adamw_torch_fused",  # one optimizer under every launch (auto: Muon, which FSDP cannot shard)
           "--output_dir", str(out)]
    return cmd + (["--use_cpu", "true"] if launch != "1 process" else [])


def rank_peaks(r: harness.Run) -> list[int]:
    """Peak RSS of each training process (not the launcher, whose command line also names pretrain.py)."""
    return sorted((rss for cmdline, rss in r.peak_rss.values()
                   if "pretrain.py" in cmdline and "accelerate" not in cmdline and "torchrun" not in cmdline),
                  reverse=True)


def planned(preset_args: list[str], vocab: int, batch: int, block: int) -> dict:
    """toolkit plan's CPU fp32 estimate per rank for 1 device, DDP and FSDP2 (its JSON output)."""
    from toolkit.commands import plan as plan_command

    out = {}
    model = preset_args[preset_args.index("--preset") + 1]
    for launch, (strategy, n) in PLAN_STRATEGY.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            plan_command.main(["--model", model, "--task", "pretrain", "--device", "cpu", "--num_devices", str(n),
                       "--batch_size", str(batch), "--seq_len", str(block), "--vocab_size", str(vocab),
                       "--strategy", strategy, "--json", "--no_flops_benchmark"])
        data = json.loads(buf.getvalue())
        est = next(e for e in data["strategies"] if e["strategy"] == strategy)
        comps = est["components_bytes"]
        state = sum(v for k, v in comps.items() if any(w in k.lower() for w in ("param", "weight", "grad", "optim")))
        out[launch] = {"total": est["total_bytes"], "state": state, "components": comps}
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(p)
    p.add_argument("--preset", default="gpt2-mini")
    p.add_argument("--batch", type=int, default=4, help="per-device batch")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--logging_steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--launches", nargs="+", default=list(LAUNCHES), choices=list(LAUNCHES))
    p.add_argument("--extra", default="", help="flags added to every launch's pretrain.py command")
    args = p.parse_args(argv)
    load = harness.load_average()
    model = ["--preset", args.preset]
    if args.quick:
        model = ["--preset", "gpt2-nano"]
        args.batch, args.block, args.steps, args.logging_steps, args.repeats = 2, 32, 4, 1, 1
    gpt2_tok = harness.GPT2_TOKENIZER.exists() and not args.quick
    tokenizer = ["--tokenizer_name", str(harness.GPT2_TOKENIZER)] if gpt2_tok else ["--vocab_size", "512"]
    vocab = 50257 if gpt2_tok else 512
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        for rep in range(args.repeats):
            for launch in args.launches:
                out = Path(tmp) / f"{launch.split()[0]}-{rep}"
                cmd = command(launch, model, tokenizer, args.batch, args.block, args.steps, args.logging_steps,
                              out) + shlex.split(args.extra)
                print(f"[round {rep + 1}/{args.repeats}] {launch} ...", flush=True)
                r = harness.run(cmd, echo=args.echo).check()
                world = 1 if launch == "1 process" else 2
                logs = [(t, d) for t, d in harness.trainer_logs(r) if "loss" in d]
                tokens_per_step = args.batch * args.block * world
                loop = harness.loop_throughput(logs, args.logging_steps, tokens_per_step)
                describe = next((line for _, line in r.lines if line.startswith("Distributed:")), "")
                peaks = rank_peaks(r)
                results.append({"launch": launch, "round": rep, "world": world, "loop_tokens_per_s": loop,
                                "rank_peak_rss": peaks, "distributed": describe, "final_loss": logs[-1][1]["loss"],
                                "command": harness.shown(cmd[1:], tmp)})
                print(f"    {loop:,.0f} tok/s, rank peaks {[round(x / 2**20) for x in peaks]} MiB; {describe}",
                      flush=True)
    try:
        plans = planned(model, vocab, args.batch, args.block)
    except Exception as err:  # the planner may change: report, do not fail
        print(f"planner unavailable: {type(err).__name__}: {err}")
        plans = {}

    rows = []
    base = {r["round"]: r["loop_tokens_per_s"] for r in results if r["launch"] == "1 process"}
    ddp_peak = harness.median([max(r["rank_peak_rss"]) for r in results if r["launch"] == "DDP x2"] or [0])
    for launch in args.launches:
        mine = [r for r in results if r["launch"] == launch]
        tok = harness.median([r["loop_tokens_per_s"] for r in mine])
        ratio = harness.median([r["loop_tokens_per_s"] / base[r["round"]] for r in mine]) if base else float("nan")
        peak = harness.median([max(r["rank_peak_rss"]) for r in mine])
        pl = plans.get(launch, {})
        saving = f"{(ddp_peak - peak) / 2**20:,.0f}" if launch == "FSDP2 x2" and ddp_peak else ""
        pl_saving = (f"{(plans['DDP x2']['state'] - pl['state']) / 2**20:,.0f}"
                     if launch == "FSDP2 x2" and "DDP x2" in plans else "")
        rows.append([launch, f"{tok:,.0f}", f"{ratio:.2f}", f"{peak / 2**20:,.0f}",
                     f"{pl['total'] / 2**20:,.0f}" if pl else "n/a", f"{pl['state'] / 2**20:,.0f}" if pl else "n/a",
                     saving, pl_saving])
    headers = ["launch", "tok/s (all ranks)", "vs 1 process", "peak RSS per rank MiB", "planned per rank MiB",
               "planned params+grads+optimizer MiB", "measured saving vs DDP MiB", "planned saving vs DDP MiB"]
    out = harness.table(headers, rows)
    print(out)
    body = (f"{out}\n\nModel `{' '.join(model)}` ({'GPT-2 tokenizer' if gpt2_tok else 'BPE 512'}), "
            f"per-device batch {args.batch} x block {args.block}, {args.steps} steps, fp32, gloo; {args.repeats} "
            "interleaved round(s), medians. tok/s is the end-to-end loop rate between the first and the last training "
            "log line. The 1-process run uses torch's default threads (2); the 2-process launches get 1 thread per "
            "rank from torch's launcher (OMP_NUM_THREADS=1).\n\n"
            "Launches:\n"
            + "\n".join(f"- {r['launch']}: `{r['command']}` ({r['distributed']})" for r in results if r['round'] == 0))
    harness.write_section("distributed_cpu", "5. Distributed on CPU: 1 process vs DDP vs FSDP2 (2 processes)", body,
                          load=load, doc=args.doc or None)
    harness.save_json(args.json, {"load": load, "results": results, "plan": plans})
    return results


if __name__ == "__main__":
    main()
