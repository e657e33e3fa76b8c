"""The shipped configuration files run: every recipes/configs/*.yaml is read by its recipe's real parser (unknown
keys and out-of-range values are refused there) and trains for one step, at a tiny size given by overrides on the
command line (a config names GPU-sized models and Hub data); the values the file sets and no override replaces
reach the run (its model card lists them). The accelerate_configs/ files the docs describe for GPUs are read by
accelerate's own loader and hold what docs/scripts_reference.md says; single_gpu.yaml and ddp.yaml are launched.

Only public entry points: the recipes through conftest's recipe_in_process, `accelerate launch` in a subprocess."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, card_rows, free_port, recipe_in_process, run_script

CONFIGS = REPO / "recipes" / "configs"
ACCELERATE = REPO / "accelerate_configs"

# the tiny size and local data every config runs at; the file's own optimizer, schedule and batch settings stay
PRETRAIN_TINY = ["--max_steps", "1", "--block_size", "32", "--n_layer", "1", "--n_head", "2", "--n_embd", "64",
                 "--report_to", "none", "--save_strategy", "no", "--sample_max_new_tokens", "4",
                 "--torch_compile", "false"]
FINETUNE_TINY = ["--max_steps", "1", "--max_length", "64", "--max_eval_samples", "8", "--sample_max_new_tokens", "4",
                 "--save_strategy", "no", "--eval_strategy", "no"]
# file key -> model card row (the keys a card lists under another name)
PRETRAIN_CARD = {"learning_rate": "peak learning rate", "warmup_steps": "warmup_steps", "weight_decay": "weight_decay",
                 "seed": "seed"}
FINETUNE_CARD = {k: k for k in ("lora_r", "lora_alpha", "lora_dropout", "learning_rate", "seed",
                                "per_device_train_batch_size", "gradient_accumulation_steps")}


def same_value(card: str, file_value) -> bool:
    try:
        return float(card) == pytest.approx(float(file_value), rel=1e-3)
    except (TypeError, ValueError):
        return card == str(file_value)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """One token store for all pretraining configs: the same text, tokenizer and block size."""
    return tmp_path_factory.mktemp("config-runs-cache")


def config_names(prefix: str) -> list[str]:
    return sorted(p.name for p in CONFIGS.glob(f"{prefix}*.yaml"))


def test_every_config_file_is_run_below():
    """Each file starts with the name of the recipe that reads it, so one of the two tests below runs it."""
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert names and names == sorted(config_names("pretrain_") + config_names("lora_") + config_names("qlora_"))


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("name", config_names("pretrain_"))
def test_pretrain_config_trains_one_step(name, tmp_path, tiny_tokenizer_dir, small_text_file, data_cache, capsys):
    values = yaml.safe_load((CONFIGS / name).read_text())
    out = tmp_path / "out"
    code, stdout, stderr = recipe_in_process("pretrain", [
        "--config", str(CONFIGS / name), *PRETRAIN_TINY, "--tokenizer_name", str(tiny_tokenizer_dir),
        "--train_file", str(small_text_file), "--output_dir", str(out), "--data_cache_dir", str(data_cache)], capsys)
    assert code == 0, stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    rows = card_rows(out)
    # the batch the file asks for: micro-batch x accumulation x 32-token blocks
    tokens = values["per_device_train_batch_size"] * values.get("gradient_accumulation_steps", 1) * 32
    assert rows["tokens per step"] == str(tokens), rows
    for key, row in PRETRAIN_CARD.items():
        if key in values:
            assert same_value(rows[row], values[key]), (key, rows[row], values[key])
    assert rows["adam betas"].endswith(str(values.get("adam_beta2", 0.95))), rows


@pytest.mark.parametrize("name", config_names("lora_") + config_names("qlora_"))
def test_finetune_config_trains_one_step(name, tmp_path, tiny_model_dir, small_text_file, capsys):
    values = yaml.safe_load((CONFIGS / name).read_text())
    out = tmp_path / "out"
    recipe = name.split("_")[0]
    code, stdout, stderr = recipe_in_process(recipe, [
        "--config", str(CONFIGS / name), *FINETUNE_TINY, "--model_name_or_path", str(tiny_model_dir),
        "--train_file", str(small_text_file), "--output_dir", str(out)], capsys)
    assert code == 0, stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    rows = card_rows(out)
    for key, row in FINETUNE_CARD.items():
        if key in values:
            assert same_value(rows[row], values[key]), (key, rows[row], values[key])
    assert rows["lora_target_modules"] == ", ".join(values["lora_target_modules"])
    if recipe == "qlora":
        assert rows["quantization"] == f"bitsandbytes 4-bit {values['bnb_4bit_quant_type']}"
        assert rows["double_quantization"] == str(values["use_bnb_nested_quant"])


# ------------------------------------------------------------------------------------------------ accelerate


def accelerate_config(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(ACCELERATE / name))


def test_gpu_accelerate_configs_hold_what_the_docs_say():
    """single_gpu.yaml: one process; ddp.yaml: DDP over one machine's GPUs; multi_node.yaml: FSDP2 over several
    machines with rank 0's address (docs/scripts_reference.md, accelerate_configs/)."""
    single = accelerate_config("single_gpu.yaml")
    assert single.distributed_type.value == "NO" and single.num_processes == 1 and not single.use_cpu
    ddp = accelerate_config("ddp.yaml")
    assert ddp.distributed_type.value == "MULTI_GPU" and ddp.num_machines == 1 and ddp.num_processes >= 2
    assert ddp.gpu_ids == "all" and not ddp.use_cpu
    multi = accelerate_config("multi_node.yaml")
    assert multi.distributed_type.value == "FSDP" and multi.num_machines >= 2
    assert multi.num_processes % multi.num_machines == 0 and multi.main_process_ip and multi.main_process_port
    assert multi.fsdp_config["fsdp_version"] == 2
    assert multi.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "GPT2Block"
    for name in ("fsdp.yaml", "fsdp_offload.yaml"):  # the single-machine FSDP2 files agree with it
        assert accelerate_config(name).fsdp_config["fsdp_version"] == 2


LAUNCH_TINY = ["--preset", "gpt2-nano", "--vocab_size", "512", "--block_size", "32", "--per_device_train_batch_size",
               "4", "--max_steps", "2", "--report_to", "none", "--save_strategy", "no", "--sample_max_new_tokens", "4",
               "--eval_strategy", "no"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name,processes", [("single_gpu.yaml", 1), ("ddp.yaml", 2)])
def test_launch_with_the_gpu_configs_on_cpu(name, processes, tmp_path, small_text_file):
    out = tmp_path / "out"
    result = run_script(["-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / name),
                         "--num_processes", str(processes), "--main_process_port", str(free_port()),
                         "recipes/pretrain.py", *LAUNCH_TINY, "--train_file", str(small_text_file),
                         "--output_dir", str(out), "--data_cache_dir", str(tmp_path / "cache")], timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    assert f"world size {processes}," in result.stdout, result.stdout[-3000:]

