"""4. recipes/lora.py and recipes/qlora.py on a 124M base on one GPU, and `toolkit merge` of the QLoRA adapter.

The base is the plain bf16 run's output (20 steps of pretraining from init-124m); both recipes train 30 steps of
8 x 1024 tokens of Tiny Shakespeare at lr 1e-3 with their GPU defaults: bf16, activation checkpointing, and for QLoRA
the CUDA NF4 kernels with double quantization, bf16 compute, `device_map={"": local_rank}` and paged AdamW. The CPU
rehearsal (kit.shape()) runs the same on the nano shape with bitsandbytes' CPU 4-bit backend, the recipes' CUDA
defaults given as flags.
"""

from __future__ import annotations

import json

import pytest

from . import kit

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
SH = kit.shape()


def _job(core_runs, name):
    job = core_runs[name]
    assert job.ok, job.tail()
    return job


def _logits(model):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=kit.fixed_ids(model.config.vocab_size, SH.device)).logits.float().cpu()


def _as_trained(model, setup: dict):
    """Give every floating parameter the dtype it had in the recipe's process (names match: same adapter name)."""
    import torch

    for name, param in model.named_parameters():
        want = setup["dtype_by_name"].get(name)
        if want and param.is_floating_point() and str(param.dtype) != want:
            param.data = param.data.to(getattr(torch, want.removeprefix("torch.")))
    return model


def _results(out) -> dict:
    return json.loads((out / "all_results.json").read_text())


def _peak_gpu_mb(results: dict, method: str) -> None:
    if SH.rehearsal:
        kit.not_measured(f"{method}.py's peak_gpu_mb (torch.cuda.max_memory_allocated)")
    else:
        assert results["peak_gpu_mb"] > 0, results


def test_lora_trains_on_gpu_and_the_adapter_reloads_with_the_same_logits(core_runs, work):
    import torch
    from peft import PeftModel

    from toolkit import model_loading

    _job(core_runs, "lora")
    out = work / "lora"
    setup = kit.probe(out)["setup"]
    assert setup["mixed_precision"] == "bf16" and setup["gradient_checkpointing"], setup
    assert setup["param_devices"] == {SH.device: setup["n_params"]}
    # 12 blocks x 4 projections x (A, B), fp32
    assert setup["trainable_dtypes"] == {"torch.float32": SH.n_layer * 8}, setup
    results = _results(out)
    assert results["eval_loss_after"] < results["eval_loss_before"] - SH.finetune_drop, results
    _peak_gpu_mb(results, "lora")

    base = model_loading.load_model(str(work / "eager")).to(SH.device)
    before = _logits(base)
    reloaded = _as_trained(PeftModel.from_pretrained(base, out, autocast_adapter_dtype=False), setup)
    got, expected = _logits(reloaded), kit.probe_logits(out)
    # The in-memory logits come from the unwrapped forward: fp32 base + fp32 adapter, as reloaded here.
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    effect = (before - expected).abs().max().item()
    kit.record(
        "lora_124m",
        peak_gpu_mb=results.get("peak_gpu_mb"),
        eval_loss_before=results["eval_loss_before"],
        eval_loss_after=results["eval_loss_after"],
        train_runtime_s=results["train_runtime_s"],
        reload_max_abs_diff=diff,
        adapter_effect_max_abs=effect,
    )
    assert diff <= 1e-4 * max(scale, 1.0), (diff, scale)
    assert effect > 100 * diff + 1e-3, (effect, diff)  # the adapter matters, and it is what came back
    assert torch.isfinite(got).all()


def test_qlora_uses_cuda_nf4_and_paged_adamw_and_the_adapter_reloads(core_runs, work):
    import torch
    from peft import PeftModel, prepare_model_for_kbit_training

    from toolkit import lora, model_loading
    from toolkit.args.finetune import QuantizationArguments  # toolkit.lora names it for type checking only

    _job(core_runs, "qlora")
    out = work / "qlora"
    probe = kit.probe(out)
    setup = probe["setup"]
    layers = SH.n_layer * 4  # 12 blocks x 4 projections
    assert setup["four_bit"]["layers"] == layers and setup["four_bit"]["quant_type"] == "nf4", setup
    assert setup["four_bit"]["double_quant"] and setup["four_bit"]["compute_dtype"] == "torch.bfloat16", setup
    assert setup["four_bit"]["weight_devices"] == {SH.device: layers}, setup  # device_map={"": local_rank}
    # bitsandbytes' paged AdamW, the recipe's CUDA default: transformers builds it for optim="paged_adamw_32bit" as
    # bitsandbytes' AdamW class with is_paged=True and 32-bit state (there is no class named PagedAdamW in play)
    assert setup["optimizer"] == "bitsandbytes.optim.adamw.AdamW", setup["optimizer"]
    assert setup["optimizer_is_paged"] and setup["optimizer_bits"] == 32, setup
    if SH.rehearsal:
        kit.not_measured("paged AdamW's paging of optimizer state (CUDA unified memory; on CPU bitsandbytes pages "
                         "nothing)")
    assert setup["gradient_checkpointing"], setup
    results = _results(out)
    assert results["eval_loss_after"] < results["eval_loss_before"] - SH.finetune_drop, results
    _peak_gpu_mb(results, "qlora")
    card = (out / "README.md").read_text()
    assert "bitsandbytes 4-bit nf4" in card and "paged_adamw_32bit" in card

    # Reload as the recipe built the model: NF4 base on the GPU, prepare_model_for_kbit_training, the adapter, and each
    # parameter in the dtype it had in training (trl casts some of a 4-bit model's modules to bf16). Same modules,
    # same dtypes, same kernels: the logits agree to a few bf16 roundings.
    q = QuantizationArguments()  # the recipe's defaults: NF4, double quantization
    base = model_loading.load_quantized_model(
        str(work / "eager"), lora.bnb_config(q, torch.bfloat16), torch.bfloat16,
        device_map={"": 0 if SH.device == "cuda" else "cpu"},
    )
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    before = _logits(base)
    reloaded = _as_trained(PeftModel.from_pretrained(base, out, autocast_adapter_dtype=False), setup)
    got, expected = _logits(reloaded), kit.probe_logits(out)
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    effect = (before - expected).abs().max().item()
    kit.record(
        "qlora_124m",
        peak_gpu_mb=results.get("peak_gpu_mb"),
        eval_loss_before=results["eval_loss_before"],
        eval_loss_after=results["eval_loss_after"],
        train_runtime_s=results["train_runtime_s"],
        reload_max_abs_diff=diff,
        adapter_effect_max_abs=effect,
        optimizer=setup["optimizer"],
        trainable_dtypes=setup["trainable_dtypes"],
    )
    assert diff <= 2**-7 * max(scale, 1.0), (diff, scale)  # one bf16 step at the largest logit
    assert effect > 10 * diff + 1e-3, (effect, diff)


def test_toolkit_merge_folds_the_qlora_adapter_into_the_bf16_base(core_runs, work):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from toolkit import cli

    _job(core_runs, "qlora")
    merged_dir = work / "qlora-merged-bf16"
    assert (
        cli.main(
            [
                "merge",
                "--adapter",
                str(work / "qlora"),
                "--output_dir",
                str(merged_dir),
                "--dtype",
                "bfloat16",
                "--overwrite_output_dir",
            ]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto").to(SH.device)
    assert merged.dtype == torch.bfloat16 and not hasattr(merged.config, "quantization_config")
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # a plain GPT-2 again

    def bf16_base():
        return AutoModelForCausalLM.from_pretrained(work / "eager", dtype=torch.bfloat16).to(SH.device)

    base = _logits(bf16_base())
    reference = _logits(PeftModel.from_pretrained(bf16_base(), work / "qlora"))  # unmerged: base + adapter at run time
    got = _logits(merged)
    # Merging rounds W + BA to bf16 once, so some of a small update is lost in the rounding; most of the adapter's
    # effect must survive (a merge that dropped the adapter leaves the base: ratio 1).
    lost = (got - reference).norm().item() / max((base - reference).norm().item(), 1e-12)
    kit.record("qlora_merge_bf16", fraction_of_adapter_effect_lost=lost)
    assert lost < 0.5, lost
