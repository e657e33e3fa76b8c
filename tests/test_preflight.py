"""Before any work, every recipe asks `toolkit plan` whether the run fits (toolkit/preflight.py); shape flags without
--preset mean GPT-2's shape; the guide's scenario commands each train or stop with the planner's one line.

The memory a run has is set by the test with GPT2_TOOLKIT_MEMORY (the preflight's documented override), so the
verdicts do not depend on this machine's RAM.
"""

from __future__ import annotations

import json

import pytest
from conftest import GPT2_TOKENIZER, free_port, needs_shared, one_error_line, recipe_in_process, run_script
from test_args import parse

TINY_RUN = ["--block_size", "32", "--per_device_train_batch_size", "2", "--eval_steps", "2", "--save_strategy", "no",
            "--report_to", "none", "--sample_max_new_tokens", "2", "--logging_steps", "1"]
TINY_FINETUNE = ["--max_length", "32", "--per_device_train_batch_size", "2", "--max_train_samples", "16",
                 "--max_eval_samples", "4", "--sample_max_new_tokens", "2"]


def planned(model: str, task: str, memory: str, extra: list[str] | None = None) -> dict:
    """`toolkit plan --json` for the same run on CPU (its recommendation and its table)."""
    from toolkit.commands.plan import build_parser
    from toolkit.plan import make_plan, setup_from_args, to_json

    args = build_parser().parse_args(["--model", model, "--task", task, "--device", "cpu", "--num_devices", "1",
                                      "--device_memory", memory, "--no_flops_benchmark", *(extra or [])])
    return to_json(make_plan(*setup_from_args(args)[:2]))


# ---------------------------------------------------------------------------------- shapes mean GPT-2


def test_shape_flags_without_a_preset_build_gpt2_15b_as_toolkit_plan_counts_it(tmp_path, capsys):
    from toolkit import preflight, presets
    from toolkit.commands import plan as plan_command

    model, _, _ = parse("pretrain", ["--n-layer", "48", "--n-head", "16", "--n-embd", "1600",
                                     "--output_dir", str(tmp_path)])
    assert (model.preset, model.vocab_size, model.gpt2_shape) == ("gpt2", presets.GPT2_VOCAB_SIZE, True)
    # what recipes/pretrain.py builds: its overrides over the preset, a BPE trained on little text (fewer tokens)
    overrides = presets.parse_config_overrides(model.config_overrides)
    overrides.update(n_layer=model.n_layer, n_head=model.n_head, n_embd=model.n_embd)
    config = presets.build_gpt2_config(model.preset, 3000, overrides, model.pad_vocab_to_multiple_of)
    built = presets.count_parameters(config.n_layer, config.n_embd, config.vocab_size, config.n_positions)
    assert plan_command.main(["--n_layer", "48", "--n_head", "16", "--n_embd", "1600", "--device", "cpu",
                      "--no_flops_benchmark", "--json"]) == 0
    planned_count = json.loads(capsys.readouterr().out)["model"]["n_params"]
    assert built == planned_count == preflight.pretrain_shape(model).n_params
    assert 1.5e9 < built < 1.6e9 and config.n_positions == 1024
    assert config.vocab_size == presets.pad_vocab(presets.GPT2_VOCAB_SIZE, 64)

    # a preset named, or a model to continue: the shape flags change that, as before
    model, _, _ = parse("pretrain", ["--preset", "gpt2-micro", "--n_layer", "2", "--output_dir", str(tmp_path)])
    assert (model.preset, model.vocab_size, model.gpt2_shape, model.config_overrides) == ("gpt2-micro", 4096,
                                                                                          False, None)
    model, _, _ = parse("pretrain", ["--output_dir", str(tmp_path)])
    assert (model.preset, model.vocab_size) == ("gpt2-micro", 4096)
    # a vocabulary of the user's own: the model takes the tokenizer's size, GPT-2's shape otherwise
    model, _, _ = parse("pretrain", ["--n_layer", "2", "--vocab_size", "1024", "--output_dir", str(tmp_path)])
    assert (model.preset, model.vocab_size, model.config_overrides) == ("gpt2", 1024, None)


@pytest.mark.slow
def test_a_gpt2_shape_trains_with_gpt2s_positions_and_vocabulary_and_says_which_tokenizer(
        tmp_path, small_text_file, capsys):
    out = tmp_path / "run"
    code, printed, err = recipe_in_process("pretrain", ["--n-layer", "2", "--n-head", "2", "--n-embd", "64",
                                                     "--data", str(small_text_file), "--steps", "2",
                                                     "--output_dir", str(out), *TINY_RUN], capsys)
    assert code == 0, err[-2000:]
    line = next(x for x in printed.splitlines() if x.startswith("Tokenizer:"))
    assert "BPE of up to 50,257 tokens" in line and "--tokenizer_name gpt2" in line  # offline: no gpt2 in the cache
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_positions"]) == (2, 64, 1024)
    assert config["vocab_size"] == 50304  # GPT-2's 50,257 rows padded to 64, though the BPE has fewer tokens


@pytest.mark.slow
@needs_shared
def test_a_gpt2_shape_takes_gpt2s_tokenizer_from_the_local_hub_cache(tmp_path, small_text_file):
    """With GPT-2's tokenizer in the local Hub cache (laid out as a download leaves it), the same command trains with
    it, offline."""
    import shutil

    snapshot = tmp_path / "hf-home" / "hub" / "models--gpt2" / "snapshots" / ("0" * 40)
    shutil.copytree(GPT2_TOKENIZER, snapshot)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    out = tmp_path / "run"
    result = run_script(["recipes/pretrain.py", "--n-layer", "1", "--n-head", "2", "--n-embd", "64", "--data",
                         str(small_text_file), "--steps", "1", "--output_dir", str(out), *TINY_RUN],
                        env={"HF_HOME": str(tmp_path / "hf-home")}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Tokenizer: GPT-2's (gpt2, from the local Hub cache)" in result.stdout
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == 50257
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 50304


# ---------------------------------------------------------------------------------- preflight


def test_a_run_that_does_not_fit_stops_before_any_work_with_the_planners_first_fix(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv("GPT2_TOOLKIT_MEMORY", "2GB")
    argv = ["--preset", "gpt2", "--per_device_train_batch_size", "16", "--block_size", "1024",
            "--output_dir", str(out)]
    code, _, err = recipe_in_process("pretrain", argv, capsys)
    line = one_error_line(err)
    assert code == 2 and not out.exists()  # nothing written, nothing trained
    expected = planned("gpt2", "pretrain", "2GB", ["--batch_size", "16", "--seq_len", "1024",
                                                   "--vocab_size", "4096"])
    single = expected["strategies"][0]
    choice = expected["recommendation"]
    assert f"needs {single['total_bytes'] / 2**30:.1f} GiB per process" in line
    assert "has 2.0 GiB (GPT2_TOOLKIT_MEMORY=2GB)" in line and "--skip_memory_check" in line
    assert choice["batch_size"] < 16  # this case needs both fixes: a smaller micro-batch and checkpointing
    assert f"--per_device_train_batch_size {choice['batch_size']} " in line
    assert f"--gradient_accumulation_steps {choice['grad_accum']}" in line
    assert ("--gradient_checkpointing true" in line) == choice["gradient_checkpointing"]


@pytest.mark.slow
def test_skip_memory_check_runs_what_the_check_would_stop(tmp_path, small_text_file, monkeypatch, capsys):
    monkeypatch.setenv("GPT2_TOOLKIT_MEMORY", "64MB")
    argv = ["--preset", "gpt2-nano", "--data", str(small_text_file), "--steps", "2", "--vocab_size", "512",
            *TINY_RUN]
    code, _, err = recipe_in_process("pretrain", [*argv, "--output_dir", str(tmp_path / "a")], capsys)
    assert code == 2 and "out of memory before it starts" in one_error_line(err)
    assert "nothing fits" in err and "a machine with more RAM" in err
    code, _, err = recipe_in_process("pretrain", [*argv, "--output_dir", str(tmp_path / "b"), "--skip_memory_check"],
                                  capsys)
    assert code == 0, err[-2000:]
    assert (tmp_path / "b" / "model.safetensors").is_file()


@pytest.mark.slow
def test_lora_and_qlora_ask_the_planner_with_their_own_task(tmp_path, tiny_model_dir, small_text_file, monkeypatch,
                                                             capsys):
    monkeypatch.setenv("GPT2_TOOLKIT_MEMORY", "20MB")
    for recipe, name in (("lora", "1 device"), ("qlora", "1 device + grad ckpt")):
        out = tmp_path / recipe
        code, _, err = recipe_in_process(recipe, ["--model", str(tiny_model_dir), "--data", str(small_text_file),
                                               "--output_dir", str(out), *TINY_FINETUNE], capsys)
        line = one_error_line(err)
        assert code == 2 and f"({name}, micro-batch 2 x 32 tokens)" in line and not out.exists(), line


def test_an_adapter_pushed_from_a_local_base_needs_the_bases_hub_id(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_TestSecretToken0123456789")
    out = tmp_path / "o"
    code, _, err = recipe_in_process("lora", ["--model", str(tiny_model_dir), "--output_dir", str(out),
                                           "--push_to_hub", "--hub_model_id", "someone/adapter"], capsys)
    line = one_error_line(err)
    assert code == 2 and "--base_model_hub_id" in line and f"toolkit push {tiny_model_dir}" in line
    assert "hf_Test" not in err and not out.exists()


def test_a_launch_that_leaves_gpus_idle_says_so():
    from toolkit.preflight import gpu_count_note

    assert gpu_count_note(1, 1) is None and gpu_count_note(4, 4) is None
    note = gpu_count_note(1, 4)
    assert "uses 1 of this machine's 4 GPUs" in note and "--nproc_per_node=4" in note and "\n" not in note


# ---------------------------------------------------------------------------------- the guide's scenarios


@pytest.mark.slow
def test_the_guides_single_process_scenarios_train_or_stop_with_the_planners_line(
        tmp_path, small_text_file, tiny_model_dir, monkeypatch, capsys):
    """docs/scripts_reference.md's map of the guide's commands, one process each, at a tiny size: the command as the
    guide types it plus a short run's flags, on a machine of GPT2_TOOLKIT_MEMORY."""
    import shutil

    monkeypatch.setenv("GPT2_TOOLKIT_MEMORY", "16GB")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                      {"role": "assistant", "content": f"{i}, as asked."}]}) + "\n"
                             for i in range(40)))
    # python train.py --data your_data --steps 500: trains
    code, _, err = recipe_in_process("pretrain", ["--data", str(small_text_file), "--steps", "2", *TINY_RUN,
                                               "--output_dir", str(tmp_path / "p1")], capsys)
    assert code == 0 and (tmp_path / "p1" / "model.safetensors").is_file(), err[-2000:]
    # python train.py --model gpt2-medium, and the 1.5B shape: more than this machine has, stopped before any work
    for argv in (["--model", "gpt2-medium"], ["--n-layer", "48", "--n-head", "16", "--n-embd", "1600"]):
        monkeypatch.setenv("GPT2_TOOLKIT_MEMORY", "2GB" if "gpt2-medium" in argv else "16GB")
        code, _, err = recipe_in_process("pretrain", [*argv, "--output_dir", str(tmp_path / "p2")], capsys)
        assert code == 2 and "out of memory before it starts" in one_error_line(err)
        assert not (tmp_path / "p2").exists()
    monkeypatch.setenv("GPT2_TOOLKIT_MEMORY", "16GB")
    # python finetune_lora.py --model gpt2 --data chats.jsonl (the tiny base for gpt2): trains
    code, _, err = recipe_in_process("lora", ["--model", str(tiny_model_dir), "--data", str(chats), "--max_steps", "2",
                                           "--output_dir", str(tmp_path / "l"), *TINY_FINETUNE], capsys)
    assert code == 0 and (tmp_path / "l" / "adapter_config.json").is_file(), err[-2000:]
    # python finetune_qlora.py: no arguments, the main job's out/pretrain (the tiny model here)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "out" / "pretrain")
    code, _, err = recipe_in_process("qlora", ["--max_steps", "2", *TINY_FINETUNE], capsys)
    assert code == 0 and (tmp_path / "out" / "qlora" / "adapter_config.json").is_file(), err[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["torchrun", "fsdp"])
def test_the_guides_multi_process_scenarios_stop_on_every_rank_with_the_planners_line(tmp_path, launch):
    """torchrun --nproc_per_node=4 train.py --n-layer 48 --n-head 16 --n-embd 1600 (Scenario 4) and train_fsdp.py
    --model gpt2-xl, on CPU ranks with 8 GB for the whole machine: each stops before any work."""
    if launch == "torchrun":
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node=4", "--master_port", str(free_port()),
               "recipes/pretrain.py", "--n-layer", "48", "--n-head", "16", "--n-embd", "1600"]
        where, ranks = "DDP", 4
    else:
        cmd = ["-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/fsdp_cpu.yaml",
               "--main_process_port", str(free_port()), "recipes/pretrain.py", "--model", "gpt2-xl"]
        where, ranks = "FSDP2", 2
    result = run_script([*cmd, "--output_dir", str(tmp_path / "o")], env={"GPT2_TOOLKIT_MEMORY": "8GB"},
                        timeout=300)
    assert result.returncode != 0
    lines = [x for x in result.stderr.splitlines() if "out of memory before it starts" in x]
    assert lines and all(f"({where}, micro-batch 16 x 128 tokens)" in x for x in lines), result.stderr[-3000:]
    # the launcher ends the other ranks once one has stopped: at least one line, each the same verdict
    assert 1 <= len(lines) <= ranks and all(f"x {ranks} processes" in x for x in lines)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- adapters others can load


@pytest.mark.slow
def test_an_adapter_trained_on_a_local_base_loads_from_the_hub_on_its_pushed_base(tmp_path, tiny_model_dir,
                                                                                  small_text_file):
    """The base pushed first (`toolkit push`), the adapter trained on the local folder and pushed with
    --base_model_hub_id; then, as someone else would, AutoPeftModelForCausalLM.from_pretrained(adapter repo) from
    the local Hub server: it finds the base there and gives the logits of the local adapter on the local base."""
    import torch
    from hub_server import HubServer
    from test_hub import TOKEN, hub_env

    out = tmp_path / "adapter"
    recipe_argv = ["--model_name_or_path", str(tiny_model_dir), "--train_file", str(small_text_file),
                   "--output_dir", str(out), "--max_steps", "2", "--lora_r", "2", *TINY_FINETUNE,
                   "--push_to_hub", "--hub_model_id", "someone/tiny-adapter", "--base_model_hub_id",
                   "someone/tiny-base"]
    script = f"""
import runpy, sys, torch
from toolkit import errors
errors.exit_now = lambda code=0: None  # the script goes on after the recipe (its os._exit would end it here)
from toolkit.cli import main
assert main(["push", {str(tiny_model_dir)!r}, "someone/tiny-base"]) == 0
sys.argv = ["recipes/lora.py", *{recipe_argv!r}]
runpy.run_path("recipes/lora.py", run_name="__main__")
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("someone/tiny-adapter")
model.eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.arange(20).reshape(1, 20)).logits, {str(tmp_path / "hub.pt")!r})
"""
    with HubServer() as hub:
        result = run_script(["-c", script], env=hub_env(hub, tmp_path), timeout=420)
        assert result.returncode == 0, result.stderr[-3000:]
        assert TOKEN not in result.stdout + result.stderr
        card = hub.repos["someone/tiny-adapter"].files["README.md"].decode()
    assert "base_model: someone/tiny-base" in card
    assert "AutoPeftModelForCausalLM.from_pretrained('someone/tiny-adapter')" in card
    assert "path/to/this/adapter" not in card.split("## Use")[1].split("```")[1]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    local.eval()
    with torch.no_grad():
        expected = local(input_ids=torch.arange(20).reshape(1, 20)).logits
    torch.testing.assert_close(torch.load(tmp_path / "hub.pt", weights_only=True), expected, rtol=0, atol=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
