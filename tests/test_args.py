"""The one argument parser of every recipe (toolkit/args/): YAML + overrides, the other guides' command forms,
range checks with one-line errors, the output folder checks, and every shipped YAML config parsed."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, one_error_line, run_recipe_in_process, run_script

from toolkit.errors import UserError

PRETRAIN_CONFIGS = sorted((REPO / "recipes" / "configs").glob("pretrain_*.yaml"))
FINETUNE_CONFIGS = sorted((REPO / "recipes" / "configs").glob("*lora_*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


def parse(recipe: str, argv: list[str]):
    """The recipe's own first step: its dataclasses parsed over its defaults, then the derived settings."""
    from toolkit import args

    if recipe == "pretrain":
        from toolkit.args.pretrain import DataArguments, ModelArguments, PretrainArguments

        types = [ModelArguments, DataArguments, PretrainArguments]
    else:
        from toolkit.args.finetune import (
            DataArguments,
            FinetuneConfig,
            LoraArguments,
            ModelArguments,
            QuantizationArguments,
        )

        types = [ModelArguments, LoraArguments, QuantizationArguments, DataArguments, FinetuneConfig]
    parsed = args.parse(types, argv, defaults=args.resolve_defaults(recipe))
    args.derive_settings(parsed[-1])
    if recipe == "pretrain":
        args.resolve_model_shape(parsed[0])
    return parsed


# ---------------------------------------------------------------------------------------------- command forms


def test_other_guides_command_forms_mean_our_options(tmp_path):
    out = ["--output_dir", str(tmp_path / "o")]
    model, data, train = parse("pretrain", ["--data", "corpus.txt", "--steps", "500", "--n-layer", "48",
                                            "--n-head", "16", "--n-embd", "1600", "--model", "gpt2-medium", *out])
    assert (data.train_file, train.max_steps) == ("corpus.txt", 500)
    assert (model.n_layer, model.n_head, model.n_embd) == (48, 16, 1600)
    assert (model.preset, model.model_name_or_path) == ("gpt2-medium", None)  # a preset name: train from scratch
    model, _, _ = parse("pretrain", ["--model", "out/shakespeare", "--per-device-train-batch-size=4", *out])
    assert (model.model_name_or_path, model.preset) == ("out/shakespeare", "gpt2-micro")  # else: continue that model
    model, _, _, data, train = parse("lora", ["--model", "gpt2", "--data", "chats.jsonl", "--steps", "3",
                                             "--gradient-checkpointing", "true", *out])
    assert (model.model_name_or_path, data.train_file, train.max_steps) == ("gpt2", "chats.jsonl", 3)
    assert train.activation_checkpointing is True and train.gradient_checkpointing is True


def test_prompts_that_look_like_options_are_kept(tmp_path):
    *_, train = parse("pretrain", ["--sample_prompt", "--data-free text", "--output_dir", str(tmp_path)])
    assert train.sample_prompt == "--data-free text"


def test_qlora_is_lora_with_4bit_defaults_and_each_can_be_overridden(tmp_path):
    _, _, quant, _, train = parse("qlora", [])
    assert quant.load_in_4bit and train.activation_checkpointing and train.output_dir == "out/qlora"
    _, _, quant, _, train = parse("lora", [])
    assert not quant.load_in_4bit and not train.activation_checkpointing and train.output_dir == "out/lora"
    _, _, _, _, train = parse("qlora", ["--gradient_checkpointing", "false"])  # transformers' older name still wins
    assert train.activation_checkpointing is False


def test_yaml_keys_take_aliases_too(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 7\ndata: story.txt\ngradient_checkpointing: true\n")
    *_, data, train = parse("lora", ["--config", str(cfg)])
    assert (train.max_steps, data.train_file, train.activation_checkpointing) == (7, "story.txt", True)


# ---------------------------------------------------------------------------------------------- errors, one line


@pytest.mark.parametrize("recipe", ["pretrain", "lora"])
@pytest.mark.parametrize("option,value", [
    ("per_device_train_batch_size", "0"), ("gradient_accumulation_steps", "-2"), ("learning_rate", "0"),
    ("max_steps", "0"), ("warmup_steps", "-1"), ("weight_decay", "-0.1"), ("adam_beta2", "1.0"),
    ("logging_steps", "0"), ("save_total_limit", "0"), ("seed", "-1"), ("num_train_epochs", "0"),
])
def test_shared_numeric_options_out_of_range_are_refused_by_name(recipe, option, value):
    with pytest.raises(UserError) as err:
        parse(recipe, [f"--{option}", value])
    message = str(err.value)
    assert f"--{option} {float(value):g} is out of range" in message and "\n" not in message


@pytest.mark.parametrize("recipe,option,value", [
    ("pretrain", "block_size", "1"), ("pretrain", "n_layer", "0"), ("pretrain", "n_embd", "-64"),
    ("pretrain", "dropout", "1.5"), ("pretrain", "vocab_size", "100"),
    ("pretrain", "validation_split_percentage", "100"), ("pretrain", "global_batch_size", "0"),
    ("pretrain", "ddp_timeout", "0"), ("pretrain", "streaming_eval_blocks", "0"),
    ("lora", "lora_r", "0"), ("lora", "lora_alpha", "-8"), ("lora", "lora_dropout", "1"), ("lora", "max_length", "0"),
    ("lora", "validation_split_percentage", "0"), ("lora", "max_eval_samples", "0"),
])
def test_recipe_numeric_options_out_of_range_are_refused_by_name(recipe, option, value):
    with pytest.raises(UserError, match=rf"^--{option} \S+ is out of range: it must be "):
        parse(recipe, [f"--{option}", value])


def test_valid_edges_are_accepted(tmp_path):
    model, data, train = parse("pretrain", ["--max_steps", "-1", "--warmup_steps", "0", "--dropout", "0",
                                            "--validation_split_percentage", "1", "--output_dir", str(tmp_path)])
    assert (train.max_steps, train.warmup_steps, model.dropout, data.validation_split_percentage) == (-1, 0, 0, 1)


def test_broken_yaml_names_file_line_and_column(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("max_steps: 10\nlearning_rate: [3e-4\nblock_size: 64\n")
    with pytest.raises(UserError) as err:
        parse("pretrain", ["--config", str(cfg)])
    message = str(err.value)
    assert str(cfg) in message and "not valid YAML at line 3, column" in message and "\n" not in message


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- max_steps\n- 10\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        parse("lora", ["--config", str(cfg)])


def test_bad_choice_and_bad_type_are_one_line():
    with pytest.raises(UserError, match="--eval_strategy") as err:
        parse("pretrain", ["--eval_strategy", "sometimes"])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="invalid int value: 'many'") as err:
        parse("pretrain", ["--max_steps", "many"])
    assert "\n" not in str(err.value)


def test_output_dir_that_is_a_file_or_unwritable_is_named(tmp_path, monkeypatch):
    from toolkit.run_dir import check_writable_dir

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is an existing file, not a folder"):
        check_writable_dir(str(a_file))
    with pytest.raises(UserError, match="is a file; choose a folder path"):
        check_writable_dir(str(a_file / "run"))
    locked = tmp_path / "locked"
    locked.mkdir()
    import os

    real_access = os.access
    # root may write anywhere, so a read-only folder is simulated where the check asks the OS
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(UserError, match="is not writable"):
        check_writable_dir(str(locked / "run"))
    monkeypatch.undo()
    check_writable_dir(str(tmp_path / "new" / "run"))  # a folder that can be made passes, and is not made yet
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_cli_errors_are_one_stderr_line_before_any_work(tmp_path, capsys):
    """The real command line, as a user meets it (one real process per recipe, started warm: what a fresh
    interpreter of these recipes prints while importing is test_own_output's): the whole stderr is one line, exit 2,
    nothing written. A third refusal runs in this process, through the same recipe code."""
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    cases = [
        (["recipes/pretrain.py", "--per_device_train_batch_size", "0"],
         "--per_device_train_batch_size 0 is out of range"),
        (["recipes/lora.py", "--lora-r", "0", "--output_dir", str(tmp_path / "l")], "--lora_r 0 is out of range"),
    ]
    for argv, expected in cases:
        result = run_script(argv, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], (argv, result.stderr[-2000:])
    code, stderr = run_recipe_in_process("pretrain", ["--output_dir", str(a_file)], capsys)
    assert code == 2 and "is an existing file, not a folder" in one_error_line(stderr)
    assert a_file.read_text() == "keep me" and not (tmp_path / "l").exists()


# ---------------------------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("config", PRETRAIN_CONFIGS + FINETUNE_CONFIGS, ids=lambda p: p.name)
def test_every_recipe_config_parses(config: Path, tmp_path):
    recipe = config.name.split("_")[0]
    parsed = parse(recipe, ["--config", str(config), "--output_dir", str(tmp_path)])
    train = parsed[-1]
    assert train.max_steps > 0 and train.learning_rate > 0
    if recipe == "qlora":
        assert parsed[2].load_in_4bit


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_loads(config: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    cluster = load_config_from_file(str(config))
    assert cluster.num_processes >= 1 and cluster.distributed_type is not None
    if "fsdp" in config.name:
        assert cluster.fsdp_config.get("fsdp_version") == 2


def test_config_names_match_a_recipe():
    assert PRETRAIN_CONFIGS and FINETUNE_CONFIGS and ACCELERATE_CONFIGS
    for config in PRETRAIN_CONFIGS + FINETUNE_CONFIGS:
        assert (REPO / "recipes" / f"{config.name.split('_')[0]}.py").is_file(), config.name


@pytest.mark.parametrize("recipe", ["pretrain", "lora"])
def test_help_shows_the_other_guides_names_beside_the_options_they_stand_for(recipe, capsys):
    import re

    with pytest.raises(SystemExit) as exc:
        parse(recipe, ["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    flat = re.sub(r"\s+", " ", text)
    for alias, canonical in (("--data", "--train_file"), ("--steps", "--max_steps"),
                             ("--gradient_checkpointing", "--activation_checkpointing")):
        assert re.search(rf"{canonical} .*?\(also {alias}[,)]", flat), (alias, canonical)  # beside the option
        assert re.search(rf"^  {alias} +(?:[^\n=]*)?= {canonical}$", text, re.M), alias  # and in the list at the end
    model_line = next(x for x in text.splitlines() if x.startswith("  --model NAME"))
    assert ("--preset NAME for a preset name" in model_line) == (recipe == "pretrain")
    assert "--model_name_or_path NAME" in model_line and "--n-layer 48" in text
