"""Documented quantization and target flags of recipes/lora.py and recipes/qlora.py that no other test runs, each
in a real run of the recipe (in this process) on the tiny 2-layer GPT-2: it trains, the validation loss falls,
the adapter reloads on its base, and the model card names what the flag chose.

Only public entry points: the recipes through conftest's recipe_in_process; the output read with peft."""

from __future__ import annotations

import json

import pytest
from conftest import card_rows, recipe_in_process

FAST = ["--max_steps", "4", "--learning_rate", "3e-2", "--per_device_train_batch_size", "8", "--max_length", "64",
        "--max_eval_samples", "8", "--lora_r", "4", "--lora_alpha", "8", "--logging_steps", "2",
        "--sample_max_new_tokens", "4", "--seed", "0"]


def finetune(recipe, argv, base, data, out, capsys) -> str:
    code, stdout, stderr = recipe_in_process(recipe, ["--model_name_or_path", str(base), "--train_file", str(data),
                                                      "--output_dir", str(out), *FAST, *argv], capsys)
    assert code == 0, stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_loss_after"] < results["eval_loss_before"] - 0.02, results  # it learnt
    return stdout


def reloads_with_targets(out, base, targets: set[str], modules: set[str]) -> None:
    """The adapter names the preset's `targets` and loads on its (full-precision) base with peft, adapting exactly
    `modules` (attn.c_attn, ..., in each of the 2 layers)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == targets, config["target_modules"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    adapted = [name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A." in name]
    assert sorted(".".join(name.split(".")[-2:]) for name in adapted) == sorted(2 * list(modules)), adapted


@pytest.mark.slow
def test_qlora_fp4_without_nested_quantization_on_the_attention_preset(tmp_path, tiny_model_dir, small_text_file,
                                                                        capsys):
    out = tmp_path / "fp4"
    stdout = finetune("qlora", ["--bnb_4bit_quant_type", "fp4", "--no_use_bnb_nested_quant",
                                "--lora_target_modules", "attention", "--cpu_keep_freed_memory", "true"],
                      tiny_model_dir, small_text_file, out, capsys)
    assert "CPU memory: " in stdout  # qlora.py hands freed memory back unless told true
    rows = card_rows(out)
    assert rows["quantization"] == "bitsandbytes 4-bit fp4" and rows["double_quantization"] == "False", rows
    reloads_with_targets(out, tiny_model_dir, {"c_attn", "attn.c_proj"}, {"attn.c_attn", "attn.c_proj"})


@pytest.mark.slow
def test_qlora_in_8bit_on_the_mlp_preset_without_checkpointing_with_token_metrics(tmp_path, tiny_model_dir,
                                                                                  small_text_file, capsys):
    out = tmp_path / "int8"
    stdout = finetune("qlora", ["--load_in_8bit", "--lora_target_modules", "mlp", "--gradient_checkpointing", "false",
                                "--token_metrics", "true"], tiny_model_dir, small_text_file, out, capsys)
    rows = card_rows(out)
    assert rows["quantization"] == "bitsandbytes 8-bit (LLM.int8)" and rows["gradient_checkpointing"] == "False"
    assert "mean_token_accuracy" in stdout and "entropy" in stdout  # --token_metrics: trl's metrics in the logs
    reloads_with_targets(out, tiny_model_dir, {"c_fc", "mlp.c_proj"}, {"mlp.c_fc", "mlp.c_proj"})


@pytest.mark.slow
def test_lora_recipe_with_load_in_4bit_quantizes_with_loras_defaults(tmp_path, tiny_model_dir, small_text_file,
                                                                     capsys):
    """`python recipes/lora.py --load_in_4bit`: the base in NF4 with double quantization, and lora.py's own defaults
    otherwise (no activation checkpointing on CPU, unlike qlora.py)."""
    out = tmp_path / "lora-4bit"
    stdout = finetune("lora", ["--load_in_4bit", "--cpu_keep_freed_memory", "false"], tiny_model_dir,
                      small_text_file, out, capsys)
    assert "CPU memory: " not in stdout  # lora.py keeps freed memory unless told false
    rows = card_rows(out)
    assert rows["quantization"] == "bitsandbytes 4-bit nf4" and rows["double_quantization"] == "True", rows
    assert rows["gradient_checkpointing"] == "False", rows
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is False  # bitsandbytes Linear
    reloads_with_targets(out, tiny_model_dir, {"c_attn", "c_proj", "c_fc"},
                         {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"})
