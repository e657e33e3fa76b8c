"""MFU on CPU: training model-FLOPs utilisation of the GPT-2 124M shape at block 256 and 1024, against this
machine's fp32 matmul peak measured in the same run, plus where each step's time goes.

MFU = tokens/s x (6N + 12 L d T) / peak (toolkit/flops.py: N without the position table). The peak is the
fp32 torch.mm rate of 2048x2048 matrices, measured before each variant's steps; MFU uses the median of all
peak readings of the run (noise from other processes lowers both alike when interleaved).

The loop is pretrain.py's step written out (GPT2LMHeadModel, sdpa attention, fused AdamW with its decay groups,
clip at 1.0), so each phase (forward, backward, clip, optimizer) is timed separately; variants change one
thing each, and all variants run round-robin (A B C A B C) on the same model. `--trainer` also runs the real
recipes/pretrain.py at the same shape and reads its logged tokens/s.

    python benchmarks/mfu_cpu.py                  # 124M at 4x256 and 1x1024, updates docs/benchmarks.md
    python benchmarks/mfu_cpu.py --variants base eager --steps 3 --trainer
    python benchmarks/mfu_cpu.py --quick --doc ''  # smoke version (tiny model)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import harness

VARIANTS = {
    "base": "pretrain.py's step: sdpa, fused GELU (gelu_pytorch_tanh), fused AdamW, clip 1.0",
    "eager": "eager attention (HF's matmul+softmax) instead of sdpa",
    "noclip": "no gradient clipping",
    "foreach": "AdamW foreach (not fused)",
    "threads1": "torch.set_num_threads(1)",
    "gelu_new": "transformers' GPT-2 default GELU (gelu_new, 8 elementwise ops) instead of the fused kernel",
    "compile": "torch.compile(model) (default inductor backend)",
}


def peak_flops(size: int, seconds: float) -> float:
    """toolkit.flops.measure_cpu_peak_flops without its cache: we want a fresh reading each time."""
    from toolkit.flops import measure_cpu_peak_flops

    return measure_cpu_peak_flops.__wrapped__(size, seconds)


class Setup:
    """One model shared by all variants; one optimizer per optimizer kind (their states differ)."""

    def __init__(self, shape: dict, vocab: int, seed: int = 0):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        self.config = GPT2Config(**shape, vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = GPT2LMHeadModel(self.config).train()
        self.optimizers = {}
        self.compiled = None

    def optimizer(self, fused: bool):
        import torch

        if fused not in self.optimizers:
            # transformers' get_decay_parameter_names: no decay for biases and LayerNorm weights (pretrain.py's groups)
            decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
            self.optimizers[fused] = torch.optim.AdamW(
                [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=fused, foreach=None if fused else True)
        return self.optimizers[fused]

    def _set_gelu(self, fused: bool) -> None:
        """Same function (GELU, tanh approximation): transformers' "gelu_new" writes it as 8 tensor ops,
        "gelu_pytorch_tanh" (what pretrain.py gives new models) is torch's single fused kernel."""
        from transformers.activations import ACT2FN

        from toolkit.presets import NEW_MODEL_ACTIVATION

        act = ACT2FN[NEW_MODEL_ACTIVATION if fused else "gelu_new"]
        for block in self.model.transformer.h:
            block.mlp.act = act

    def step(self, variant: str, x) -> dict[str, float]:
        import torch

        self.model.set_attn_implementation("eager" if variant == "eager" else "sdpa")
        self._set_gelu(fused=variant != "gelu_new")
        model = self.model
        if variant == "compile":
            if self.compiled is None:
                self.compiled = torch.compile(self.model)
            model = self.compiled
        opt = self.optimizer(fused=variant != "foreach")
        threads = torch.get_num_threads()
        if variant == "threads1":
            torch.set_num_threads(1)
        try:
            t0 = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if variant != "noclip":
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            t3 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
        finally:
            torch.set_num_threads(threads)
        return {"forward": t1 - t0, "backward": t2 - t1, "clip": t3 - t2, "optimizer": t4 - t3, "total": t4 - t0,
                "loss": loss.item()}


def trainer_run(shape_name: str, model_flags: list[str], batch: int, block: int, steps: int, tokenizer: str,
                echo: bool) -> dict:
    """The real recipes/pretrain.py at this shape: its own logged tokens/s (steps only) after the first window."""
    with tempfile.TemporaryDirectory(prefix="bench-mfu-") as tmp:
        cmd = [sys.executable, str(harness.PRETRAIN), *model_flags, "--tokenizer_name", tokenizer,
               "--block_size", str(block), "--per_device_train_batch_size", str(batch), "--max_steps", str(steps),
               "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
               "--validation_split_percentage", "1", "--sample_max_new_tokens", "1", "--output_dir", tmp]
        r = harness.run(cmd, echo=echo, sample_memory=False).check()
    logs = [d for _, d in harness.trainer_logs(r) if "loss" in d and isinstance(d.get("tokens_per_s"), float)]
    rates = [d["tokens_per_s"] for d in logs[1:]] or [d["tokens_per_s"] for d in logs]
    return {"tokens_per_s": harness.median(rates), "steps_timed": len(rates),
            "command": harness.shown(cmd, tmp)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(p)
    p.add_argument("--variants", nargs="+", default=["base", "eager", "noclip", "foreach"], choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps per variant and shape (after one warm-up step each)")
    p.add_argument("--shapes", nargs="+", default=["4x256", "1x1024"], help="BATCHxBLOCK")
    p.add_argument("--trainer", action="store_true", help="also time the real pretrain.py (HF Trainer) at each shape")
    p.add_argument("--peak_size", type=int, default=2048)
    args = p.parse_args(argv)
    import torch

    from toolkit.flops import flops_per_token

    load = harness.load_average()
    if args.quick:
        model_shape = dict(n_layer=2, n_head=2, n_embd=64, n_positions=128)
        vocab, args.shapes, args.steps, args.peak_size = 512, ["2x64"], 1, 256
        model_flags = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--n_positions", "128"]
    else:
        model_shape = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)
        vocab = 50304  # GPT-2's 50257 padded to a multiple of 64, as pretrain.py builds it
        model_flags = ["--preset", "gpt2"]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    setup = Setup(model_shape, vocab)
    n_params = sum(p.numel() for p in setup.model.parameters())
    peaks = [peak_flops(args.peak_size, 0.5)]
    timings = {}  # (shape, variant) -> list of per-step dicts
    gen = torch.Generator().manual_seed(0)
    for batch, block in shapes:
        x = torch.randint(0, vocab, (batch, block), generator=gen)
        for variant in args.variants:  # warm-up step each (first-call allocation, compile)
            setup.step(variant, x)
        for i in range(args.steps):
            for variant in args.variants:
                peaks.append(peak_flops(args.peak_size, 0.5))
                t = setup.step(variant, x)
                timings.setdefault((f"{batch}x{block}", variant), []).append(t)
                print(f"[{batch}x{block} step {i + 1}/{args.steps}] {variant}: {t['total']:.2f} s "
                      f"(peak now {peaks[-1] / 1e9:.0f} GFLOP/s)", flush=True)
    trainer = {}
    if args.trainer:
        tokenizer = str(harness.GPT2_TOKENIZER) if harness.GPT2_TOKENIZER.exists() and not args.quick else None
        if tokenizer is None:
            from toolkit.data.corpus import embedded_documents
            from toolkit.tokenizer import train_bpe_tokenizer

            tmp = tempfile.mkdtemp(prefix="bench-tok-")
            train_bpe_tokenizer(embedded_documents(), vocab).save_pretrained(tmp)
            tokenizer = tmp
        for batch, block in shapes:
            peaks.append(peak_flops(args.peak_size, 0.5))
            trainer[f"{batch}x{block}"] = trainer_run(f"{batch}x{block}", model_flags, batch, block, args.steps + 2,
                                                      tokenizer, args.echo)
        peaks.append(peak_flops(args.peak_size, 0.5))
    peak = harness.median(peaks)

    rows, results = [], []
    for batch, block in shapes:
        fpt = flops_per_token(model_shape["n_layer"], model_shape["n_embd"], vocab, block)
        key = f"{batch}x{block}"
        base_total = harness.median([t["total"] for t in timings[(key, args.variants[0])]])
        for variant in args.variants:
            ts = timings[(key, variant)]
            med = {k: harness.median([t[k] for t in ts])
                   for k in ("forward", "backward", "clip", "optimizer", "total")}
            tok_s = batch * block / med["total"]
            mfu = tok_s * fpt / peak
            results.append({"shape": key, "variant": variant, "tokens_per_s": tok_s, "mfu": mfu, **med})
            rows.append([key, variant, f"{tok_s:,.0f}", f"{100 * mfu:.1f}%", f"{base_total / med['total']:.3f}",
                         *(f"{med[k]:.3f}" for k in ("forward", "backward", "clip", "optimizer", "total"))])
        if key in trainer:
            tr = trainer[key]
            mfu = tr["tokens_per_s"] * fpt / peak
            results.append({"shape": key, "variant": "pretrain.py", "mfu": mfu, **tr})
            rows.append([key, "pretrain.py (Trainer)", f"{tr['tokens_per_s']:,.0f}", f"{100 * mfu:.1f}%",
                         f"{tr['tokens_per_s'] / (batch * block / base_total):.3f}", "", "", "", "",
                         f"{batch * block / tr['tokens_per_s']:.3f}"])
    headers = ["batch x block", "variant", "tok/s", "MFU", "speed vs base", "fwd s", "bwd s", "clip s", "optim s",
               "step s"]
    out = harness.table(headers, rows)
    spread = f"{min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f}"
    print(out)
    print(f"peak fp32 matmul: median {peak / 1e9:.1f} GFLOP/s over {len(peaks)} readings ({spread}); "
          f"{n_params:,} parameters")
    body = (f"{out}\n\nPeak: fp32 `torch.mm` {args.peak_size}x{args.peak_size}, median {peak / 1e9:.1f} GFLOP/s "
            f"of {len(peaks)} readings taken between the steps (range {spread} GFLOP/s). Model: GPT2LMHeadModel "
            f"{model_shape}, vocab {vocab}, {n_params:,} parameters, fp32; {args.steps} timed steps per row after a "
            "warm-up step (median). "
            "Variants: " + "; ".join(f"`{v}` = {VARIANTS[v]}" for v in args.variants) + "."
            + ("".join(f"\n\npretrain.py at {k}: `{v['command']}` (its logged tokens/s, median of "
                       f"{v['steps_timed']} steps)." for k, v in trainer.items())))
    harness.write_section("mfu_cpu", "2. MFU on CPU (124M shape)", body, load=load, doc=args.doc or None)
    data = {"load": load, "peak_flops": peak, "peaks": peaks, "n_params": n_params, "results": results}
    harness.save_json(args.json, data)
    return data


if __name__ == "__main__":
    main()
