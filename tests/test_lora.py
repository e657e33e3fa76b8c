"""LoRA / QLoRA fine-tuning on a tiny GPT-2 (CPU): recipes, adapters, 4-bit loading, merge, data formats, errors.

The recipes run in this process (importing transformers/trl once) on the tiny 2-layer model; the
subprocess run of a recipe's command line is in test_hub.py (it also pushes).
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import REPO, free_port, one_error_line, run_script

from toolkit.args.finetune import DataArguments, FinetuneConfig, LoraArguments, QuantizationArguments

FAST_TRAIN = ["--max_steps", "8", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8",
              "--max_length", "64", "--max_eval_samples", "8", "--lora_r", "4", "--lora_alpha", "8",
              "--lora_dropout", "0.0", "--logging_steps", "4", "--sample_max_new_tokens", "8", "--seed", "0"]


def run_recipe(name: str, argv: list[str]) -> dict:
    """recipes/<name>.py main(argv) in this process: the same code path as `python recipes/<name>.py ...`."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def user_error(capsys, fn, *args) -> str:
    """Run fn, expect the one-line user error (exit 2); return the message."""
    capsys.readouterr()  # what ran before is not this call's output
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    assert exc.value.code == 2
    err = one_error_line(capsys.readouterr().err)  # the whole stderr: one line
    assert err.startswith("error: ")
    return err


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _ids(vocab: int, n: int = 24):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


def _randomize_adapter(model, seed: int = 0):
    """A trained-looking adapter: LoRA B is zero at init (identity), so give A and B random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * 0.05)


def _lora_model(base_dir, quantized: bool, train_embeddings: bool = False, targets=("all",)):
    from peft import get_peft_model

    from toolkit import lora, model_loading

    if quantized:
        q = QuantizationArguments()
        base = model_loading.load_quantized_model(str(base_dir), lora.bnb_config(q, torch.float32), torch.float32,
                                                  {"": "cpu"})
    else:
        base = model_loading.load_model(str(base_dir))
    args = LoraArguments(lora_r=4, lora_alpha=8, lora_target_modules=list(targets),
                         lora_train_embeddings=train_embeddings)
    model = get_peft_model(base, lora.build_lora_config(args, base, quantized=quantized))
    _randomize_adapter(model)
    return model


# --------------------------------------------------------------------------------------------- recipes


@pytest.mark.slow
def test_lora_recipe_lowers_loss_and_saves_adapter(tmp_path, tiny_model_dir, small_text_file, capsys):
    out = tmp_path / "lora"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--train_file", str(small_text_file),
            "--output_dir", str(out), *FAST_TRAIN]
    metrics = run_recipe("lora", argv)
    printed = capsys.readouterr().out
    assert "trainable params: 8,192 (" in printed  # 2 layers x r=4 x (64+192 + 64+64 + 64+256 + 256+64)
    # on CPU the training steps reuse freed memory, as pretrain.py's do (the glibc setting, or the user's own)
    assert "CPU memory: glibc keeps freed memory" in printed or "CPU memory: allocator left as" in printed, printed

    # the loss really went down on held-out data
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.03, metrics
    assert metrics["eval_perplexity_after"] < metrics["eval_perplexity_before"]

    # the adapter folder: adapter, tokenizer, card with the numbers and the command, metrics
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md",
                 "all_results.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["fan_in_fan_out"] is True
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "base_model:" not in card  # a local base is no Hub id (transformers#33922)
    assert "| gradient_checkpointing | False |" in card  # LoRA on CPU: speed first
    assert f"{metrics['eval_loss_after']:.4g}" in card and "python recipes/lora.py --model_name_or_path" in card
    assert json.loads((out / "all_results.json").read_text())["eval_loss_after"] == metrics["eval_loss_after"]
    # a tiny fraction of the base (r=4 on a 64-wide model; ~2% at r=16 on the 124M shape, see docs)
    assert ((out / "adapter_model.safetensors").stat().st_size
            < 0.1 * (tiny_model_dir / "model.safetensors").stat().st_size)

    # a finished run is not overwritten without --overwrite_output_dir, and nothing is lost
    before = (out / "adapter_model.safetensors").read_bytes()
    err = user_error(capsys, run_recipe, "lora", argv)
    assert "already holds a finished adapter" in err and "--overwrite_output_dir" in err
    assert (out / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_qlora_recipe_lowers_loss(tmp_path, tiny_model_dir, small_text_file, capsys):
    out = tmp_path / "qlora"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--data", str(small_text_file), "--output_dir", str(out),
            *FAST_TRAIN]
    metrics = run_recipe("qlora", argv)
    assert "CPU memory: " not in capsys.readouterr().out  # qlora.py: glibc hands freed memory back (memory first)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.03, metrics
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert config["fan_in_fan_out"] is False  # bitsandbytes layers are Linear, not Conv1D
    card = (out / "README.md").read_text()
    assert "bitsandbytes 4-bit nf4" in card and "python recipes/qlora.py" in card
    assert "| gradient_checkpointing | True |" in card  # QLoRA checkpoints by default, on CPU too: memory first
    # adapters are fp32 with fp32 compute on CPU (trl would leave them bf16)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}


# ------------------------------------------------------------------------------------- adapters, 4-bit


@pytest.mark.parametrize("quantized,train_embeddings", [(False, False), (False, True), (True, False)],
                         ids=["lora", "lora+embeddings", "qlora"])
def test_adapter_reloads_with_same_logits(tmp_path, tiny_model_dir, quantized, train_embeddings):
    from peft import PeftModel

    from toolkit import lora, model_loading

    model = _lora_model(tiny_model_dir, quantized, train_embeddings)
    if train_embeddings:  # while training, head and embedding are one trainable matrix (as in the base)
        inner = model.get_base_model()
        assert inner.get_output_embeddings().weight.data_ptr() == inner.get_input_embeddings().weight.data_ptr()
        assert inner.get_input_embeddings().weight.requires_grad
    ids = _ids(model.config.vocab_size)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")

    if quantized:
        q = QuantizationArguments()
        base = model_loading.load_quantized_model(str(tiny_model_dir), lora.bnb_config(q, torch.float32),
                                                  torch.float32, {"": "cpu"})
    else:
        base = model_loading.load_model(str(tiny_model_dir))
    assert not torch.allclose(_logits(base, ids), expected, atol=1e-3)  # the adapter changes the model
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=0, atol=1e-6)


def test_4bit_linear_weights_take_one_eighth_of_fp32(tiny_model_dir):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from toolkit import lora, model_loading

    fp32 = model_loading.load_model(str(tiny_model_dir))
    q = lora.bnb_config(QuantizationArguments(), torch.float32)
    ours = model_loading.load_quantized_model(str(tiny_model_dir), q, torch.float32, {"": "cpu"})
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 4 * fp32.config.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    for name, module in layers.items():
        full = fp32.get_submodule(name).weight
        w = module.weight
        assert w.numel() * w.element_size() * 8 == full.numel() * full.element_size(), name
        assert w.quant_state.nested  # double quantization: the per-block scales are quantized too
        assert w.quant_state.quant_type == "nf4"
    # the pread loader builds exactly what transformers' own quantized from_pretrained builds
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), quantization_config=q, dtype=torch.float32,
                                                  device_map={"": "cpu"})
    model_loading.keep_training_layout(theirs)
    ids = _ids(fp32.config.vocab_size)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=0, atol=0)
    # and NF4 stays close to the fp32 model it came from
    assert (_logits(ours, ids) - _logits(fp32, ids)).abs().max() < 0.1


# --------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_merge_gives_same_logits_as_base_plus_adapter(tmp_path, tiny_model_dir, quantized):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from toolkit import merge, model_loading
    from toolkit.commands import merge as merge_command

    model = _lora_model(tiny_model_dir, quantized)
    model.save_pretrained(tmp_path / "adapter")
    # the reference: the adapter on the full-precision fp32 base (also for a QLoRA adapter)
    reference = PeftModel.from_pretrained(model_loading.load_model(str(tiny_model_dir)), tmp_path / "adapter")
    ids = _ids(model.config.vocab_size)

    assert merge_command.main(["--adapter", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged.config, "quantization_config") and merged.dtype == torch.float32
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # a plain GPT-2 again
    torch.testing.assert_close(_logits(merged, ids), _logits(reference, ids), rtol=0, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    # the merge check ran and its figure is in the merged model's card
    card = (tmp_path / "merged" / "README.md").read_text()
    figure = float(card.split("differ from base + adapter by ")[1].split(" ")[0])
    assert 0 <= figure <= merge.MERGE_TOLERANCE["float32"] and "tolerance 0.0001 for float32" in card


def test_merge_check_refuses_a_merge_that_changes_the_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A merge that loses the adapter's update (as unsloth#1089 / peft#1388 report) is refused with both figures and
    nothing written; --no_verify writes it and the card says the check was skipped; a real bf16 merge passes."""
    from peft.tuners.lora import LoraModel

    from toolkit import merge
    from toolkit.commands import merge as merge_command

    model = _lora_model(tiny_model_dir, quantized=False)
    model.save_pretrained(tmp_path / "adapter")
    argv = ["--adapter", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "merged")]

    assert merge_command.main([*argv[:3], str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert "for bfloat16" in (tmp_path / "bf16" / "README.md").read_text()

    # a merge that drops the adapter: the base comes back unchanged
    monkeypatch.setattr(LoraModel, "merge_and_unload", LoraModel.unload)
    err = user_error(capsys, merge_command.main, argv)
    assert err.startswith("error: merge check failed: the merged model's logits differ from base + adapter by ")
    relative = float(err.split(" by ")[1].split(" ")[0])
    assert relative > merge.MERGE_TOLERANCE["float32"] and "tolerance 0.0001 for float32" in err
    merged_loss, reference_loss = (float(x) for x in
                                   err.split("loss on the sample text ")[1].split(" base + adapter")[0]
                                   .split(" merged vs "))
    assert merged_loss != reference_loss and "--no_verify" in err
    assert not (tmp_path / "merged").exists()

    assert merge_command.main([*argv, "--no_verify"]) == 0
    assert "Merge check: skipped (`--no_verify`)" in (tmp_path / "merged" / "README.md").read_text()


# ----------------------------------------------------------------------------------------- data formats


def _sft_trainer(tiny_model_dir, data_file, **config):
    from trl import SFTTrainer

    from toolkit import finetune, lora, model_loading
    from toolkit.data.sft import load_sft_datasets
    from toolkit.tokenizer import load_tokenizer

    args = FinetuneConfig(output_dir=str(data_file.parent / "out"), report_to="none", **config)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    train, evaluation, fmt = load_sft_datasets(DataArguments(train_file=str(data_file)), seed=0)
    model = model_loading.load_model(str(tiny_model_dir))
    finetune.prepare_for_data(args, fmt, tokenizer, model.config)
    peft_config = lora.build_lora_config(LoraArguments(lora_r=2), model, quantized=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, peft_config=peft_config)
    return trainer, tokenizer, fmt


def test_training_loss_is_the_mean_over_predicted_tokens(tmp_path, tiny_model_dir, small_text_file):
    """The loss the fine-tuning trainer optimizes and logs is the mean over the tokens it predicts (every label
    but each row's first), the same number as the model's own loss, not (T-1)/T of it."""
    import torch
    import torch.nn.functional as F

    from toolkit import finetune, lora, model_loading
    from toolkit.data.sft import load_sft_datasets
    from toolkit.tokenizer import load_tokenizer

    args = FinetuneConfig(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
                                   max_length=32, packing=False)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    train, evaluation, fmt = load_sft_datasets(DataArguments(train_file=str(small_text_file)), seed=0)
    model = model_loading.load_model(str(tiny_model_dir))
    finetune.prepare_for_data(args, fmt, tokenizer, model.config)
    trainer = finetune.make_trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                    processing_class=tokenizer,
                                    peft_config=lora.build_lora_config(LoraArguments(lora_r=2), model,
                                                                       quantized=False))
    batches, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1, torch.device("cpu"))
    batch = batches[0]
    trained = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)

    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert int(num_items) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(trained.detach(), reference, rtol=1e-5, atol=1e-6)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_prompt_completion_trains_on_completion_only_and_ends_with_eos(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(20)]
    trainer, tok, fmt = _sft_trainer(tiny_model_dir, _jsonl(tmp_path / "pc.jsonl", rows))
    assert fmt == "prompt-completion" and trainer.args.packing is False
    for ex in trainer.train_dataset:
        ids, labels = ex["input_ids"], ex["labels"]
        n_prompt = next(i for i, label in enumerate(labels) if label != -100)
        assert n_prompt > 0 and tok.decode(ids[:n_prompt]).startswith("Question")
        assert all(label == t for label, t in zip(labels[n_prompt:], ids[n_prompt:]))  # loss on the completion
        assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id  # learns to stop


def test_chat_messages_get_a_template_whose_eos_ends_every_reply(tmp_path, tiny_model_dir):
    from toolkit.data.sft import DEFAULT_CHAT_TEMPLATE, sample_prompt

    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}!"},
                          {"role": "user", "content": "Again."}, {"role": "assistant", "content": f"{i} again!"}]}
            for i in range(20)]
    trainer, tok, fmt = _sft_trainer(tiny_model_dir, _jsonl(tmp_path / "chat.jsonl", rows), assistant_only_loss=True)
    assert fmt == "messages" and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    eos = tok.eos_token_id
    for ex in trainer.train_dataset:
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids[-1] == eos and ids.count(eos) == 2  # each assistant turn ends with EOS
        trained = tok.decode([t for t, label in zip(ids, labels) if label != -100])
        assert "User" not in trained and trained.count(tok.eos_token) == 2  # assistant tokens (and their EOS) only
    prompt = sample_prompt(rows[0], fmt, tok)
    assert prompt == "User: Say 0.\nAssistant: 0!<|endoftext|>User: Again.\nAssistant:"
    assert trainer.model.generation_config.eos_token_id == eos  # generation stops at that EOS


def test_json_parquet_and_csv_files_read_like_jsonl(tmp_path):
    """The same prompt/completion rows as .jsonl, a .json array, .parquet and .csv: the same examples, format and
    seeded hold-out, whatever the file type."""
    import datasets

    from toolkit.data.sft import load_sft_datasets

    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(20)]
    _jsonl(tmp_path / "pc.jsonl", rows)
    (tmp_path / "pc.json").write_text(json.dumps(rows))  # one JSON array, not JSON lines
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pc.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "pc.csv"), index=False)
    splits = {}
    for ext in ("jsonl", "json", "parquet", "csv"):
        train, evaluation, fmt = load_sft_datasets(DataArguments(train_file=str(tmp_path / f"pc.{ext}")), seed=0)
        assert fmt == "prompt-completion", ext
        splits[ext] = (list(train), list(evaluation))
        assert sorted(r["prompt"] for r in splits[ext][0] + splits[ext][1]) == sorted(r["prompt"] for r in rows)
    assert splits["json"] == splits["parquet"] == splits["csv"] == splits["jsonl"]


def test_sharegpt_conversations_train_exactly_like_messages(tmp_path, tiny_model_dir):
    """ShareGPT rows ("conversations" of from: human / gpt, value) are the same chat as role/content "messages":
    the same tokens, the same loss mask (assistant replies and their EOS only) and the same sample prompt."""
    from toolkit.data.sft import sample_prompt

    chats = [[(f"Say {i}.", f"{i}!"), ("Again.", f"{i} again!")] for i in range(20)]
    messages = [{"messages": [m for q, a in chat for m in ({"role": "user", "content": q},
                                                            {"role": "assistant", "content": a})]} for chat in chats]
    sharegpt = [{"conversations": [t for q, a in chat for t in ({"from": "human", "value": q},
                                                               {"from": "gpt", "value": a})]} for chat in chats]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    want, tok, _ = _sft_trainer(tiny_model_dir, _jsonl(tmp_path / "a" / "chat.jsonl", messages),
                                assistant_only_loss=True)
    got, _, fmt = _sft_trainer(tiny_model_dir, _jsonl(tmp_path / "b" / "chat.jsonl", sharegpt),
                               assistant_only_loss=True)
    assert fmt == "messages" and len(got.train_dataset) == len(want.train_dataset)
    for a, b in zip(want.train_dataset, got.train_dataset):
        assert (b["input_ids"], b["labels"]) == (a["input_ids"], a["labels"])
        assert b["input_ids"].count(tok.eos_token_id) == 2  # each reply ends with EOS
    assert sample_prompt(sharegpt[0], "messages", tok) == sample_prompt(messages[0], "messages", tok)


@pytest.mark.slow
def test_dataset_name_as_a_local_folder_offline(tmp_path, tiny_model_dir, capsys):
    """`--dataset_name ./folder` (train/test files, read by datasets.load_dataset without a network): its test split
    is the eval set; here ShareGPT chats, end to end through the recipe."""
    folder = tmp_path / "chats"
    folder.mkdir()
    chat = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]
    _jsonl(folder / "train.jsonl", [{"conversations": chat}] * 24)
    _jsonl(folder / "test.jsonl", [{"conversations": chat}] * 6)
    out = tmp_path / "out"
    metrics = run_recipe("lora", ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(folder),
                                  "--output_dir", str(out), "--assistant_only_loss", "true", "--max_steps", "2",
                                  "--per_device_train_batch_size", "4", "--lora_r", "2",
                                  "--sample_max_new_tokens", "2"])
    printed = capsys.readouterr().out
    assert "data: 24 train / 6 eval examples, format messages" in printed
    assert "sample: 'User: Name a colour.\\nAssistant:'" in printed
    assert metrics["train_steps"] == 2 and (out / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------- DDP and resume


def _checkpoint_losses(checkpoint) -> dict[int, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_and_qlora_under_ddp_on_two_cpu_ranks_then_resume(tmp_path, tiny_model_dir, small_text_file, capsys):
    """LoRA with `accelerate launch --config_file accelerate_configs/ddp_cpu.yaml`, QLoRA with `torchrun`, 2 CPU
    ranks each, checkpoints every 2 steps; each resumed from its step-2 checkpoint by one process with the same
    global batch (4 x 2 accumulation steps = 2 ranks x 4) goes on with the 2-rank run's losses."""
    common = ["--model_name_or_path", str(tiny_model_dir), "--train_file", str(small_text_file), "--max_steps", "4",
              "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-2", "--max_length", "64",
              "--max_eval_samples", "8", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
              "--logging_steps", "1", "--sample_max_new_tokens", "2", "--seed", "0", "--report_to", "none"]
    launchers = {
        "lora": ["-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
                 "--config_file", str(REPO / "accelerate_configs" / "ddp_cpu.yaml"), "recipes/lora.py"],
        "qlora": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                  "recipes/qlora.py"],
    }
    for recipe, launcher in launchers.items():
        ddp = tmp_path / f"{recipe}-ddp"
        result = run_script([*launcher, *common, "--use_cpu", "true", "--per_device_train_batch_size", "4",
                             "--output_dir", str(ddp)], timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "distributed setup: MULTI_CPU, world size 2, backend gloo" in result.stdout, result.stdout[-2000:]
        assert (ddp / "adapter_model.safetensors").is_file() and (ddp / "checkpoint-2" / "rng_state_1.pth").is_file()
        resumed = tmp_path / f"{recipe}-resumed"
        metrics = run_recipe(recipe, [*common, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps",
                                      "2", "--output_dir", str(resumed), "--resume_from_checkpoint",
                                      str(ddp / "checkpoint-2")])
        assert metrics["train_steps"] == 4
        want, got = _checkpoint_losses(ddp / "checkpoint-4"), _checkpoint_losses(resumed / "checkpoint-4")
        for step in (3, 4):
            assert got[step] == pytest.approx(want[step], abs=1e-5), (recipe, step, got, want)
    printed = capsys.readouterr().out
    assert "note: resuming a 2-process checkpoint on 1 process(es) with the same global batch of 8" in printed


# --------------------------------------------------------------------------------------------- errors


def test_bad_input_gives_one_line_errors(tmp_path, tiny_model_dir, small_text_file, capsys):
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from toolkit import lora
    from toolkit.commands import merge as merge_command

    base = ["--train_file", str(small_text_file), "--output_dir", str(tmp_path / "o"), *FAST_TRAIN]
    err = user_error(capsys, run_recipe, "lora", ["--model_name_or_path", str(tmp_path / "missing"), *base])
    assert "does not exist" in err and "save_pretrained folder" in err
    err = user_error(capsys, run_recipe, "lora", ["--model_name_or_path", str(tiny_model_dir), *base,
                                                  "--lora_target_modules", "q_proj"])
    assert "q_proj" in err and "c_attn" in err
    assert not (tmp_path / "o" / "adapter_config.json").exists()

    # an adapter trained on another base (other width) does not merge into this one
    other = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=512))
    other_adapter = get_peft_model(other, lora.build_lora_config(LoraArguments(lora_r=2), other, quantized=False))
    other_adapter.save_pretrained(tmp_path / "other-adapter")
    err = user_error(capsys, merge_command.main, ["--adapter", str(tmp_path / "other-adapter"),
                                          "--output_dir", str(tmp_path / "m"),
                                          "--base_model_name_or_path", str(tiny_model_dir)])
    assert "does not fit base" in err and "--base_model_name_or_path" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_4bit_loading_leaves_a_user_chosen_mmap_threshold_alone(monkeypatch):
    from toolkit import cpu_allocator

    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))

    monkeypatch.setattr(cpu_allocator.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with cpu_allocator.large_blocks_from_mmap():  # what the 4-bit loader (toolkit/lora.py) loads under
        pass
    assert [v for _, v in calls] == [128 * 1024, 32 * 1024 * 1024]  # low while loading, then glibc's ceiling

    calls.clear()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    with cpu_allocator.large_blocks_from_mmap():
        pass
    assert calls == []


# ------------------------------------------------------------------------------ no arguments: the defaults


@pytest.mark.slow
def test_no_arguments_fine_tunes_the_main_jobs_model_on_the_embedded_corpus(tmp_path, tiny_model_dir, monkeypatch,
                                                                             capsys):
    """`python recipes/qlora.py` after `python recipes/pretrain.py`: base out/pretrain, data the embedded corpus
    (only the run length is given here, to keep the test short); offline without out/pretrain: one line with the
    commands to run."""
    import shutil

    monkeypatch.chdir(tmp_path)
    err = user_error(capsys, run_recipe, "qlora", [])
    assert "run `python recipes/pretrain.py`" in err and "--model_name_or_path" in err and "\n" not in err

    shutil.copytree(tiny_model_dir, tmp_path / "out" / "pretrain")
    metrics = run_recipe("qlora", ["--max_steps", "2", "--max_length", "64", "--per_device_train_batch_size", "2",
                                   "--max_train_samples", "16", "--max_eval_samples", "4",
                                   "--sample_max_new_tokens", "2"])
    printed = capsys.readouterr().out
    assert "fine-tuning out/pretrain" in printed and "the embedded Python documentation corpus" in printed
    assert metrics["train_steps"] == 2 and (tmp_path / "out" / "qlora" / "adapter_config.json").is_file()
    config = json.loads((tmp_path / "out" / "qlora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "out/pretrain"
