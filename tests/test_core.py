"""Unit tests of the pretraining core: config parsing, validation, presets, tokenizer, packing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from toolkit.errors import UserError

# ---------- config parsing ----------

def _parse(argv):
    from toolkit import args
    from toolkit.args.pretrain import DataArguments, ModelArguments, PretrainArguments

    model_args, data_args, training_args = args.parse([ModelArguments, DataArguments, PretrainArguments], argv,
                                                      defaults=args.resolve_defaults("pretrain"))
    args.derive_settings(training_args)
    args.resolve_model_shape(model_args)
    return model_args, data_args, training_args


def test_yaml_config_then_command_line_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: gpt2-mini\nblock_size: 64\nmax_steps: 7\nlearning_rate: 3.0e-4\n")
    model, data, train = _parse(["--config", str(cfg), "--max_steps", "9", "--n_layer", "3",
                                 "--output_dir", str(tmp_path / "o")])
    assert (model.preset, data.block_size, train.learning_rate) == ("gpt2-mini", 64, 3e-4)  # from YAML
    assert (train.max_steps, model.n_layer) == (9, 3)  # command line wins
    assert train.bf16 is False  # CPU default is fp32
    assert train.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


def test_unknown_yaml_key_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("block_sise: 64\n")
    with pytest.raises(UserError, match="unknown key.*block_sise"):
        _parse(["--config", str(cfg)])


def test_unknown_command_line_option_is_an_error():
    with pytest.raises((UserError, SystemExit)):
        _parse(["--block_sise", "64"])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match="cannot read config file"):
        _parse(["--config", str(tmp_path / "nope.yaml")])


def test_example_configs_parse():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[1].joinpath("recipes", "configs").glob("pretrain_*.yaml"))
    assert configs, "recipes/configs/pretrain_*.yaml examples are missing"
    for cfg in configs:
        model, data, train = _parse(["--config", str(cfg)])
        assert train.max_steps > 0 and data.block_size > 0


# ---------- presets and validation ----------

def test_gpt2_preset_parameter_count_matches_openai():
    from transformers import GPT2LMHeadModel

    from toolkit.presets import build_gpt2_config, count_parameters

    config = build_gpt2_config("gpt2", 50257, pad_vocab_to_multiple_of=1)
    assert count_parameters(config.n_layer, config.n_embd, config.vocab_size, config.n_positions) == 124_439_808
    with __import__("torch").device("meta"):
        assert GPT2LMHeadModel(config).num_parameters() == 124_439_808


@pytest.mark.parametrize("preset", ["gpt2-nano", "gpt2-micro", "gpt2-mini", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_preset_counts_match_the_real_model(preset):
    import torch
    from transformers import GPT2LMHeadModel

    from toolkit.presets import build_gpt2_config, count_parameters

    config = build_gpt2_config(preset, 50257)
    assert config.vocab_size == 50304  # padded to a multiple of 64
    with torch.device("meta"):
        n = GPT2LMHeadModel(config).num_parameters()
    assert n == count_parameters(config.n_layer, config.n_embd, config.vocab_size, config.n_positions)


def test_seed_guide_override_form():
    from toolkit.presets import build_gpt2_config

    config = build_gpt2_config("gpt2", 50257, {"n_layer": 48, "n_head": 16, "n_embd": 1600})
    assert (config.n_layer, config.n_head, config.n_embd) == (48, 16, 1600)


def test_config_overrides_string():
    from toolkit.presets import parse_config_overrides

    assert parse_config_overrides("n_embd=256, n_head=4,resid_pdrop=0.1") == {"n_embd": 256, "n_head": 4,
                                                                              "resid_pdrop": 0.1}
    with pytest.raises(UserError, match="key=value"):
        parse_config_overrides("n_embd")


def test_validation_errors_name_the_fix():
    from toolkit.presets import build_gpt2_config, validate_config

    with pytest.raises(UserError, match="not divisible by n_head"):
        build_gpt2_config("gpt2-nano", 512, {"n_embd": 100, "n_head": 3})
    with pytest.raises(UserError, match="unknown model preset 'gpt3'"):
        build_gpt2_config("gpt3", 512)
    config = build_gpt2_config("gpt2-nano", 512)
    with pytest.raises(UserError, match="block_size=512 is larger than the model's n_positions=256"):
        validate_config(config, block_size=512)
    with pytest.raises(UserError, match="tokenizer has 50257 tokens but the model's vocab_size is 512"):
        validate_config(config, tokenizer_size=50257)


# ---------- tokenizer ----------

def test_trained_bpe_round_trips_and_has_requested_size(tmp_path):
    from transformers import AutoTokenizer

    from toolkit.tokenizer import EOS_TOKEN, train_bpe_tokenizer

    texts = ["The quick brown fox jumps over the lazy dog. " * 20, "def f(x):\n    return x ** 2\n" * 20,
             "naïve café – ünïcödé ✓"]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    assert len(tok) <= 300 and tok.eos_token == EOS_TOKEN
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in texts:
        assert again.decode(again(text)["input_ids"]) == text  # byte-level: any text round-trips
    assert again.eos_token_id == tok.eos_token_id


def test_bpe_training_is_deterministic():
    from conftest import embedded_texts

    from toolkit.tokenizer import train_bpe_tokenizer

    texts = embedded_texts(30)
    a = train_bpe_tokenizer(texts, 400).backend_tokenizer.to_str()
    b = train_bpe_tokenizer(texts, 400).backend_tokenizer.to_str()
    assert a == b


def test_missing_tokenizer_folder_is_a_user_error(tmp_path):
    from toolkit.tokenizer import load_tokenizer

    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))


# ---------- data: packing, EOS, split, cache ----------

class _Args:
    def __init__(self, **kw):
        self.dataset_name = self.dataset_config_name = self.train_file = self.validation_file = self.token_store = None
        self.text_column, self.validation_split_percentage, self.block_size = "text", 10, 8
        self.streaming, self.data_cache_dir, self.preprocessing_num_workers = False, None, None
        self.validation_max_tokens = 5_000_000
        self.__dict__.update(kw)


def _cached(docs, tok, tmp_path, **kw):
    from toolkit.data import pretrain as data
    from toolkit.data.corpus import Corpus

    path = tmp_path / "docs.jsonl"  # written once: the cache key follows the file's size and modification time
    if not path.exists():
        path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    args = _Args(data_cache_dir=str(tmp_path / "cache"), **kw)
    return data.cached_store(Corpus.from_files(str(path)), None, tok, args, progress=False)


def test_packing_puts_eos_after_every_document_and_makes_full_blocks(tmp_path, tiny_tokenizer_dir):
    from toolkit.data import blocks as data
    from toolkit.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    docs = [f"document number {i} with a few words" for i in range(25)]
    store = _cached(docs, tok, tmp_path)  # 10%: documents 0, 10, 20 held out whole
    expected = {"train": [], "validation": []}
    for i, d in enumerate(docs):
        ids = tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected["validation" if i % 10 == 0 else "train"] += ids
    for split in ("train", "validation"):
        stream = getattr(store, split)
        assert stream.read(0, stream.n_tokens).tolist() == expected[split]  # order kept, EOS after each document
    train, _ = data.block_datasets(store, 8, 1)
    assert len(train) == len(expected["train"]) // 8
    blocks = [t for i in range(len(train)) for t in train[i]["input_ids"].tolist()]
    assert blocks == expected["train"][: len(train) * 8]
    item = train[0]
    assert item["input_ids"].dtype.is_floating_point is False and item["labels"].tolist() == item["input_ids"].tolist()


def test_prepared_data_is_cached(tmp_path, tiny_tokenizer_dir, monkeypatch):
    from toolkit.data import prepare
    from toolkit.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    docs = ["some words to pack"] * 50
    first = _cached(docs, tok, tmp_path)
    monkeypatch.setattr(prepare, "build_store", lambda *a, **k: pytest.fail("tokenized again despite the cache"))
    second = _cached(docs, tok, tmp_path)
    assert second.dir == first.dir
    assert np.array_equal(first.train.read(0, first.train.n_tokens), second.train.read(0, second.train.n_tokens))
    monkeypatch.undo()
    other = _cached(docs, tok, tmp_path, validation_split_percentage=20)
    assert other.dir != first.dir  # new settings, new cache entry


def test_data_smaller_than_a_block_is_a_user_error(tmp_path, tiny_tokenizer_dir):
    from toolkit.data import blocks as data
    from toolkit.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    store = _cached(["hi", "there"], tok, tmp_path, validation_split_percentage=50)
    with pytest.raises(UserError, match="shorter than one block"):
        data.block_datasets(store, 64, 1)


def test_bad_data_files_are_user_errors(tmp_path):
    from toolkit.data import pretrain as data

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="does not exist"):
        data.training_corpus(_Args(train_file=str(tmp_path / "nope.txt")))
    with pytest.raises(UserError, match="is empty"):
        data.training_corpus(_Args(train_file=str(empty)))
    odd = tmp_path / "data.xyz"
    odd.write_text("text")
    with pytest.raises(UserError, match="unsupported data file type"):
        data.training_corpus(_Args(train_file=str(odd)))


def test_local_file_formats(tmp_path):
    from toolkit.data import pretrain as data

    txt = tmp_path / "a.txt"
    txt.write_text("line one\nline two\n\nparagraph two\n")
    docs, _ = data.training_corpus(_Args(train_file=str(txt)))
    assert list(docs.texts()) == ["line one\nline two\n\nparagraph two\n"]  # a .txt file is one document
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"content": f"doc {i}"}) for i in range(3)))
    docs, _ = data.training_corpus(_Args(train_file=str(jl), text_column="content"))
    assert list(docs.texts()) == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(UserError, match="no 'text' field"):
        list(data.training_corpus(_Args(train_file=str(jl)))[0].texts())


def test_embedded_corpus_is_the_default():
    from toolkit.data import pretrain as data

    docs, validation = data.training_corpus(_Args())
    texts = list(docs.texts())
    assert validation is None and len(texts) > 50 and sum(len(t) for t in texts) > 400_000


# ---------- flops ----------

def test_flops_per_token_follows_6n_plus_attention():
    from toolkit.flops import flops_per_token, gpu_peak_flops

    # 124M: N without the position table = 124,439,808 - 1024*768
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(12, 768, 50257, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert gpu_peak_flops("Some Unknown Card") is None


def test_evaluation_sees_every_validation_block_despite_drop_last(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from toolkit.trainer import PretrainTrainer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    blocks = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(7)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, dataloader_drop_last=True,
                             report_to="none", use_cpu=True)
    trainer = PretrainTrainer(model=model, args=args, eval_dataset=blocks, flops_per_token=1.0, peak_flops=None,
                              tokens_per_step=1)
    assert sum(len(batch["input_ids"]) for batch in trainer.get_eval_dataloader()) == 7
    assert trainer.args.dataloader_drop_last is True  # training batches keep their fixed shape


# ---------- CPU allocator ----------

TRAINING_STEP_FAULTS = r"""
import resource, torch
from toolkit.cpu_allocator import keep_freed_memory

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(8192, 64), torch.nn.Linear(64, 8192))
tokens = torch.randint(0, 8192, (16, 128))

def faults_in_10_steps():  # logits 16 x 128 x 8192 fp32 = 64 MiB, and their gradient: a small LM's training step
    counts = []
    for step in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(counts[6:])  # after the heap has grown to its working size (the first few steps)

print(faults_in_10_steps(), keep_freed_memory(), faults_in_10_steps(), sep="\n")
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_keep_freed_memory_stops_refaulting_large_blocks():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", TRAINING_STEP_FAULTS], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, note, after = out.stdout.strip().splitlines()
    block_pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # 16,384 with 4 KiB pages, 1,024 with 64 KiB (arm64)
    # glibc's default: the 64 MiB logits and their gradient faulted in afresh, every step (10 steps x 2 blocks,
    # 10% slack)
    assert int(before) > 18 * block_pages, (before, block_pages)
    assert "keeps freed memory" in note
    # reused from the heap; now and then the heap still grows by one block instead of reusing a hole
    assert int(after) < int(before) / 8, (before, after)


def test_keep_freed_memory_leaves_a_users_allocator_choice(monkeypatch):
    from toolkit import cpu_allocator

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert cpu_allocator.keep_freed_memory() == "allocator left as set by GLIBC_TUNABLES"
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert "MALLOC_MMAP_THRESHOLD_" in cpu_allocator.keep_freed_memory()


def test_default_learning_rate_shrinks_with_width_and_onefile_agrees():
    import importlib.util

    from conftest import REPO

    from toolkit.presets import PRESETS, default_learning_rate

    lrs = {name: default_learning_rate(shape["n_embd"]) for name, shape in PRESETS.items()}
    assert (lrs["gpt2-micro"], lrs["gpt2"], lrs["gpt2-medium"], lrs["gpt2-xl"]) == (3e-3, 6e-4, 3e-4, 2e-4)
    assert list(lrs.values()) == sorted(lrs.values(), reverse=True)  # presets are listed from small to large
    _, _, train = _parse(["--preset", "gpt2", "--output_dir", "unused"])
    assert train.learning_rate is None  # resolved by pretrain.py once the model's width is known
    spec = importlib.util.spec_from_file_location("onefile_train", REPO / "recipes" / "onefile_train.py")
    onefile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(onefile)
    for width in (64, 128, 256, 384, 512, 768, 1024, 1280, 1600, 2048):
        assert next(lr for w, lr in onefile.LEARNING_RATE_BY_WIDTH if width <= w) == default_learning_rate(width)


def test_default_optimizer_is_muon_up_to_gpt2_micro_in_both_recipes():
    """Muon for gpt2-nano and gpt2-micro (it beat AdamW at equal CPU time there, docs/benchmarks.md section 3),
    AdamW from gpt2-mini up (AdamW was ahead at gpt2-mini); onefile_train.py keeps the same threshold."""
    import importlib.util

    from conftest import REPO

    from toolkit.presets import MUON_UP_TO_WIDTH, PRESETS, default_optimizer

    chosen = {name: default_optimizer(shape["n_embd"]) for name, shape in PRESETS.items()}
    assert chosen == {"gpt2-nano": "muon", "gpt2-micro": "muon", "gpt2-mini": "adamw", "gpt2": "adamw",
                      "gpt2-medium": "adamw", "gpt2-large": "adamw", "gpt2-xl": "adamw"}
    _, _, train = _parse(["--output_dir", "unused"])
    assert train.optim_auto and not train.muon  # resolved by pretrain.py once the model's width is known
    _, _, train = _parse(["--optim", "muon", "--output_dir", "unused"])
    assert train.muon and not train.optim_auto and train.optim == "adamw_torch_fused"  # the AdamW part
    spec = importlib.util.spec_from_file_location("onefile_train", REPO / "recipes" / "onefile_train.py")
    onefile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(onefile)
    assert onefile.MUON_UP_TO_WIDTH == MUON_UP_TO_WIDTH


# ---------- the `toolkit` command ----------

@pytest.mark.slow
def test_python_m_toolkit_presets_lists_every_preset_with_its_parameter_count(capsys):
    """`python -m toolkit presets` as a user types it (the one real process of the `toolkit` entry point here): every
    preset, with the parameter count of the model transformers builds from it."""
    import torch
    from transformers import GPT2LMHeadModel

    from toolkit import cli
    from toolkit.presets import PRESETS, build_gpt2_config

    out = subprocess.run([sys.executable, "-m", "toolkit", "presets", "--pad_vocab_to_multiple_of", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert list(rows) == list(PRESETS)
    assert rows["gpt2"][-1] == "124,439,808"  # OpenAI's GPT-2 small, unpadded
    for name, shape in PRESETS.items():
        with torch.device("meta"):
            n = GPT2LMHeadModel(build_gpt2_config(name, 50257, pad_vocab_to_multiple_of=1)).num_parameters()
        assert rows[name][1:5] == [str(shape[k]) for k in ("n_layer", "n_head", "n_embd", "n_positions")]
        assert int(rows[name][-1].replace(",", "")) == n, name
    # the usage and an unknown command, in this process (the same main() the entry point calls)
    capsys.readouterr()
    assert cli.main([]) == 0
    usage = capsys.readouterr().out
    assert all(f"  {cmd} " in usage for cmd in ("presets", "plan", "merge", "push"))
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'trian'") and len(err.splitlines()) == 1


@pytest.mark.parametrize("command,argv,message", [
    ("presets", ["--vocab_size", "0"], "--vocab_size 0 is out of range: it must be at least 1"),
    ("presets", ["--pad_vocab_to_multiple_of", "-64"], "--pad_vocab_to_multiple_of -64 is out of range"),
    ("presets", ["--vocab_size", "many"], "argument --vocab_size: invalid int value: 'many'"),
    ("merge", ["--output_dir", "x"], "the following arguments are required: --adapter"),
    ("merge", ["--adapter", "a", "--output_dir", "x", "--dtype", "int4"], "argument --dtype: invalid choice: 'int4'"),
    ("push", ["only-a-folder"], "the following arguments are required: repo_id"),
    ("prepare", ["c.txt", "--output_dir", "s", "--tokenizer_name", "t", "--shard_tokens", "0"],
     "--shard_tokens 0 is out of range: it must be at least 1"),
    ("prepare", ["c.txt", "--output_dir", "s", "--tokenizer_name", "t", "--validation_fraction", "0.6"],
     "--validation_fraction 0.6 is out of range: it must be in [0, 0.5]"),
    ("prepare", ["c.txt", "--output_dir", "s", "--tokenizer_name", "t", "--validation_max_tokens", "-1"],
     "--validation_max_tokens -1 is out of range: it must be at least 0"),
], ids=["presets-vocab", "presets-pad", "presets-type", "merge-missing", "merge-dtype", "push-missing",
        "prepare-shard", "prepare-fraction", "prepare-max-tokens"])
def test_toolkit_commands_refuse_bad_options_in_one_line(command, argv, message, capsys):
    from toolkit import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, *argv])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err.splitlines() == [captured.err.strip()] and message in captured.err, captured.err
    assert captured.err.startswith("error: ") and "--help" in captured.err  # the fix: where to read the options
