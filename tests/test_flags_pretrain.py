"""Documented recipes/pretrain.py flags that no other test runs, each in a real run of the recipe (in this process)
at the smallest size that shows what a user relies on: it trains, the loss falls, the flag did what it says.

Only public entry points: recipes/pretrain.py through conftest's recipe_in_process, `toolkit prepare` through
toolkit.cli.main. The data are local files and local dataset folders, read by `datasets` offline."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import embedded_texts, recipe_in_process, run_script

# 64-wide, 2 layers, 32-token blocks; no checkpoints (nothing here resumes); a short sample at the end
TINY = ["--block_size", "32", "--per_device_train_batch_size", "8",
        "--warmup_steps", "0", "--report_to", "none", "--save_strategy", "no", "--sample_max_new_tokens", "4",
        "--logging_steps", "1", "--eval_on_start", "true", "--learning_rate", "1e-2"]


def state(output_dir) -> dict:
    return json.loads((output_dir / "trainer_state.json").read_text())


def eval_losses(output_dir) -> dict[int, float]:
    return {h["step"]: h["eval_loss"] for h in state(output_dir)["log_history"] if "eval_loss" in h}


def pretrain(argv, tmp_path, capsys, name="out") -> tuple:
    out = tmp_path / name
    code, stdout, stderr = recipe_in_process("pretrain", [*argv, "--output_dir", str(out),
                                                          "--data_cache_dir", str(tmp_path / f"{name}-cache")], capsys)
    assert code == 0, stderr[-3000:]
    return out, stdout


def loss_fell(output_dir, by: float = 0.3) -> None:
    evals = eval_losses(output_dir)
    first, last = evals[0], evals[max(evals)]
    assert max(evals) > 0 and last < first - by, evals


PRESET = ["--preset", "gpt2-nano"]


def docs(start: int, count: int, chars: int = 600) -> list[str]:
    """`count` documents of `chars` characters of English (the standard library's docs), from document `start` on."""
    text = " ".join(embedded_texts(40))
    return [text[i * chars:(i + 1) * chars] for i in range(start, start + count)]


@pytest.mark.slow
def test_csv_and_json_array_files_muon_learning_rate_and_eager_attention(tmp_path, tiny_model_dir, capsys):
    """A .csv training file and a .json array validation file (a document per row, the text in `--text_column body`),
    continued from a checkpoint with `--optim muon --muon_learning_rate 1e-9`: Muon's hidden matrices keep their
    values while AdamW trains the rest and the validation loss falls; `--attn_implementation eager` is the kernel of
    that run. The output folder held an earlier run, replaced with --overwrite_output_dir."""
    import datasets
    import torch
    from safetensors.torch import load_file

    train = tmp_path / "train.csv"
    datasets.Dataset.from_list([{"body": t} for t in docs(0, 40)]).to_csv(str(train), index=False)
    (tmp_path / "valid.json").write_text(json.dumps([{"body": t} for t in docs(40, 3)]), encoding="utf-8")
    # the output folder holds an earlier run (a model and a checkpoint): --overwrite_output_dir replaces it
    shutil.copytree(tiny_model_dir, tmp_path / "out")
    (tmp_path / "out" / "checkpoint-3").mkdir()
    out, stdout = pretrain([*TINY, "--model_name_or_path", str(tiny_model_dir), "--train_file", str(train),
                            "--validation_file", str(tmp_path / "valid.json"), "--text_column", "body",
                            "--optim", "muon", "--muon_learning_rate", "1e-9", "--attn_implementation", "eager",
                            "--max_steps", "4", "--overwrite_output_dir"], tmp_path, capsys)
    assert "Muon + AdamW" in stdout and not (out / "checkpoint-3").exists()
    loss_fell(out)
    # every row of each file is a document: the blocks are the files' tokens (a document + EOS each) cut in 32s
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train_tokens, valid_tokens = (sum(len(tokenizer(t).input_ids) + 1 for t in texts)
                                  for texts in (docs(0, 40), docs(40, 3)))
    assert f"Data: {train_tokens // 32:,} train and {valid_tokens // 32:,} validation blocks of 32 tokens" in stdout, (
        stdout)
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    hidden = [k for k in before if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                               "mlp.c_proj.weight"))]
    assert len(hidden) == 8
    for key in hidden:  # Muon's matrices: steps of 1e-9 leave them where they were (AdamW's 1e-2 would not)
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-7)
    assert not torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])  # AdamW's: trained
    config = json.loads((out / "config.json").read_text())
    assert config.get("_attn_implementation", config.get("attn_implementation", "eager")) == "eager", config


@pytest.mark.slow
def test_dataset_name_as_a_local_parquet_folder_for_num_train_epochs(tmp_path, tiny_tokenizer_dir, capsys):
    """`--dataset_name FOLDER` (train and validation parquet files, a datasets dataset without a script) with
    `--num_train_epochs 2 --max_steps -1`: two passes over the training blocks, and the loss falls (with activation
    checkpointing: --gradient_checkpointing true)."""
    import datasets

    folder = tmp_path / "corpus"
    folder.mkdir()
    datasets.Dataset.from_list([{"text": t} for t in docs(0, 4)]).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_list([{"text": t} for t in docs(4, 1)]).to_parquet(str(folder / "validation.parquet"))
    out, stdout = pretrain([*TINY, *PRESET, "--tokenizer_name", str(tiny_tokenizer_dir), "--dataset_name", str(folder),
                            "--num_train_epochs", "2", "--max_steps", "-1", "--gradient_checkpointing", "true",
                            "--n_positions", "64"], tmp_path, capsys)
    assert json.loads((out / "config.json").read_text())["n_positions"] == 64  # the preset's 256, changed
    train_blocks = int(stdout.split("Data: ")[1].split(" train and ")[0].replace(",", ""))
    steps_per_epoch = train_blocks // 8
    assert steps_per_epoch >= 3, stdout
    finished = state(out)
    assert finished["global_step"] == 2 * steps_per_epoch and finished["epoch"] == pytest.approx(2.0)
    loss_fell(out)


@pytest.mark.slow
def test_streaming_from_a_local_dataset_folder(tmp_path, tiny_tokenizer_dir, capsys):
    """`--streaming true --dataset_name FOLDER`: a real stream (datasets' IterableDataset over local jsonl files),
    packed into blocks on the fly; evaluation on the first blocks of the stream; the loss falls. With --dropout and
    the closing sample from --sample_prompt."""
    folder = tmp_path / "stream"
    folder.mkdir()
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for text in docs(0, 60):
            f.write(json.dumps({"text": text}) + "\n")
    out, stdout = pretrain([*TINY, *PRESET, "--tokenizer_name", str(tiny_tokenizer_dir), "--dataset_name", str(folder),
                            "--streaming", "true", "--streaming_eval_blocks", "16", "--max_steps", "4",
                            "--dropout", "0.1", "--sample_prompt", "The meaning of", "--seed", "7"], tmp_path, capsys)
    assert f"Data: streaming {folder}, blocks of 32 tokens" in stdout
    assert json.loads((out / "config.json").read_text())["resid_pdrop"] == 0.1  # --dropout
    assert "Sample: 'The meaning of" in stdout, stdout[-2000:]  # --sample_prompt starts the closing sample
    assert "| seed | 7 |" in (out / "README.md").read_text()
    assert state(out)["global_step"] == 4
    loss_fell(out)


def large_vocabulary_tokenizer(folder, size: int = 70_000):
    """A word-level tokenizer with more ids than uint16 holds (`w0` ... `w69998`, EOS last)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size - 1)} | {"<|endoftext|>": size - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)


@pytest.mark.slow
def test_uint32_token_store_from_a_large_vocabulary_trains(tmp_path, capsys):
    """A tokenizer of 70,000 ids: `toolkit prepare` writes uint32 shards (ids above 65,535 in them; the validation
    split from --validation_file), and pretrain.py --token_store trains on them with its tokenizer, the embedding
    exactly 70,000 rows with --pad_vocab_to_multiple_of 1; the loss falls."""
    import numpy as np

    from toolkit.cli import main as toolkit

    large_vocabulary_tokenizer(tmp_path / "tokenizer")
    # documents that walk through ids 65,530-65,609 in order: learnable in a few steps
    words = [f"w{i}" for i in range(65_530, 65_610)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": " ".join(words[k:] + words[:k])}) + "\n"
                                                 for k in range(0, 80, 2)), encoding="utf-8")
    store = tmp_path / "store"
    (tmp_path / "valid.jsonl").write_text(json.dumps({"text": " ".join(words)}) + "\n", encoding="utf-8")
    assert toolkit(["prepare", str(tmp_path / "docs.jsonl"), "--tokenizer_name", str(tmp_path / "tokenizer"),
                    "--output_dir", str(store), "--validation_file", str(tmp_path / "valid.jsonl"), "--num_proc", "1",
                    "--no_progress"]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32", manifest
    assert manifest["splits"]["validation"]["tokens"] == 81  # the --validation_file document and its EOS
    shards = sorted(store.rglob("*.bin"))
    assert shards and max(int(np.fromfile(s, dtype=np.uint32).max()) for s in shards) == 69_999  # EOS
    ids = np.concatenate([np.fromfile(s, dtype=np.uint32) for s in shards])
    assert ids[ids != 69_999].min() == 65_530  # the words' ids, above what uint16 holds
    capsys.readouterr()
    out, stdout = pretrain([*TINY, *PRESET, "--token_store", str(store), "--max_steps", "4",
                            "--pad_vocab_to_multiple_of", "1"], tmp_path, capsys)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 70_000  # not padded: multiple of 1
    loss_fell(out, by=1.0)


@pytest.mark.slow
def test_onefile_compiled_on_the_cpu_gives_the_same_losses(tmp_path, tiny_tokenizer_dir, small_text_file):
    """`recipes/onefile_train.py --device cpu --compile`: torch.compile'd steps on the CPU give the losses of the
    eager steps (real processes: a compiled model's state stays out of the test process)."""
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        result = run_script(["recipes/onefile_train.py", "--device", "cpu", *extra,
                             "--train_file", str(small_text_file), "--tokenizer_name", str(tiny_tokenizer_dir),
                             "--n_layer", "2", "--n_head", "2",
                             "--n_embd", "64", "--n_positions", "64", "--block_size", "32",
                             "--per_device_train_batch_size", "8", "--max_steps", "3", "--logging_steps", "1",
                             "--eval_strategy", "no", "--save_strategy", "no", "--sample_max_new_tokens", "0",
                             "--output_dir", str(out)], timeout=280)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4), losses


@pytest.mark.slow
def test_push_to_hub_uploads_the_finished_run(tmp_path):
    """`--push_to_hub --hub_model_id user/name` (token from HF_TOKEN): the output folder, model card included, is
    on the Hub at the end of the run, trained on a .parquet file (a document per row). A real process pointed at
    tests/hub_server.py (huggingface_hub reads the Hub's address when it is imported)."""
    import datasets
    from hub_server import HubServer

    token = "hf_PretrainToken0123456789"
    out = tmp_path / "out"
    datasets.Dataset.from_list([{"text": t} for t in docs(0, 30)]).to_parquet(str(tmp_path / "train.parquet"))
    with HubServer() as hub:
        result = run_script(["recipes/pretrain.py", *TINY, *PRESET, "--vocab_size", "512",
                             "--train_file", str(tmp_path / "train.parquet"), "--max_steps", "2", "--push_to_hub",
                             "--hub_model_id", "someone/tiny-gpt2",
                             "--output_dir", str(out), "--data_cache_dir", str(tmp_path / "cache")], timeout=280,
                            env={"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
                                 "HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "127.0.0.1,localhost"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert token not in result.stdout + result.stderr
    files = hub.repos["someone/tiny-gpt2"].files
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "tokenizer.json" in files and "someone/tiny-gpt2" in files["README.md"].decode()
    assert "train.parquet" in files["README.md"].decode()  # the card names the training data
