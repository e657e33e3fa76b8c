"""recipes/onefile_train.py: it trains, writes checkpoints transformers loads, resumes exactly, and
matches recipes/pretrain.py (same loss curve) and itself under DDP."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch
from conftest import GPT2_TOKENIZER, REPO, SHAKESPEARE, needs_shared, run_script

ONEFILE = REPO / "recipes" / "onefile_train.py"
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--n_positions", "128", "--block_size", "64"]
QUIET = ["--eval_strategy", "no", "--save_strategy", "no", "--sample_max_new_tokens", "0", "--logging_steps", "1"]
NANO = ["--preset", "gpt2-nano", "--seed", "42"]  # with a tokenizer: what decides onefile's initial weights


# One thread per process: these models are tiny, and on a shared 2-core machine two OpenMP threads wait on
# each other at every op (measured: 6 tiny steps took 10.6 s with 2 threads, 0.5 s with 1, under load).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def onefile():
    """The script imported as a module (for its model and in-process runs of main())."""
    spec = importlib.util.spec_from_file_location("onefile_train", ONEFILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def same_start(tmp_path_factory, tiny_tokenizer_dir, small_text_file, onefile):
    """(onefile flags, folder) for runs of both recipes from the same weights: onefile with --max_steps 0 saves the
    weights it draws for this shape, tokenizer and seed, pretrain.py starts from that folder (--model_name_or_path),
    and onefile started with the same flags draws the same weights again."""
    start = [*NANO, "--tokenizer_name", str(tiny_tokenizer_dir)]
    folder = tmp_path_factory.mktemp("onefile-init")
    onefile.main([*start, "--train_file", str(small_text_file), "--max_steps", "0", "--sample_max_new_tokens", "0",
                  "--overwrite_output_dir", "--output_dir", str(folder)])
    assert not train_losses(folder) and (folder / "model.safetensors").is_file()  # no update, only the weights
    return start, folder


def train_losses(folder) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [e for e in map(json.loads, f) if "loss" in e]


def test_stands_alone():
    """The issue's promise: torch, numpy, the standard library, tokenizers and safetensors; nothing from toolkit."""
    import ast

    tree = ast.parse(ONEFILE.read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    third_party = {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"numpy", "torch", "tokenizers", "safetensors"}


@pytest.mark.slow
def test_cli_trains_and_transformers_loads_the_result(tmp_path, tiny_tokenizer_dir, small_text_file, onefile):
    out = tmp_path / "run"
    r = run_script([str(ONEFILE), "--train_file", str(small_text_file), "--tokenizer_name", str(tiny_tokenizer_dir),
                    *TINY, "--per_device_train_batch_size", "8", "--max_steps", "30", "--learning_rate", "3e-3",
                    "--warmup_steps", "3", "--logging_steps", "1", "--eval_steps", "15", "--save_steps", "15",
                    "--sample_max_new_tokens", "10", "--output_dir", str(out)], timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tok/s" in r.stdout and "mfu" in r.stdout and "sample:" in r.stdout

    # The loss really goes down, on training and held-out data; throughput and MFU are logged per step.
    logs = train_losses(out)
    assert [e["step"] for e in logs] == list(range(1, 31))
    assert all(e["tokens_per_s"] > 0 and 0 < e["mfu"] < 1 for e in logs)
    assert sum(e["loss"] for e in logs[-5:]) / 5 < logs[0]["loss"] - 0.7
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if "eval_loss" in line]
    assert [e["step"] for e in evals] == [15, 30] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert (out / "checkpoint" / "training_state.pt").exists()  # one fixed checkpoint folder, as nanoGPT's ckpt.pt

    # The output folder is a transformers model + tokenizer: it loads, tokenizes the same and generates.
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    text = "Hello world <|endoftext|> def f(x):\n    return x"
    ids = tok(text)["input_ids"]
    assert ids == onefile.load_tokenizer(str(out)).encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text and tok.eos_token == "<|endoftext|>"
    x = torch.tensor([ids])
    generated = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False,
                            pad_token_id=tok.eos_token_id)
    assert generated.shape == (1, len(ids) + 5)
    # Same weights, same function: HF's logits equal onefile's own model's logits.
    mine = onefile.load_checkpoint(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, mine(x), atol=1e-5, rtol=0)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # the head stays tied


@needs_shared
def test_gpt2_vocab_and_merges_tokenize_like_transformers(onefile):
    """A folder with only vocab.json + merges.txt gives the ids AutoTokenizer gives (same data for both recipes)."""
    from transformers import AutoTokenizer

    text = SHAKESPEARE.read_text(encoding="utf-8")[:50_000] + " <|endoftext|> tail"
    ours = onefile.load_tokenizer(str(GPT2_TOKENIZER)).encode(text, add_special_tokens=False).ids
    assert ours == AutoTokenizer.from_pretrained(GPT2_TOKENIZER)(text)["input_ids"]
    assert 50256 in ours


@pytest.mark.slow
def test_resume_continues_the_same_run(tmp_path, tiny_tokenizer_dir, small_text_file, onefile):
    common = [*NANO, "--tokenizer_name", str(tiny_tokenizer_dir), "--train_file", str(small_text_file),
              "--block_size", "64", "--per_device_train_batch_size", "4", "--warmup_steps", "2",
              "--learning_rate", "2e-3", "--eval_strategy", "no", "--sample_max_new_tokens", "0",
              "--logging_steps", "1", "--save_steps", "3"]
    onefile.main([*common, "--max_steps", "6", "--output_dir", str(tmp_path / "a")])
    # Stop after 3 updates (the checkpoint is written at the last step), then --resume with --max_steps 6: steps 4-6
    # repeat the 6-step run exactly. Updates 1-3 have the same learning rates under either --max_steps (warmup 2:
    # 0, lr/2, then the cosine starts at lr), so only the checkpoint (weights + optimizer + step) carries the run on.
    onefile.main([*common, "--max_steps", "3", "--output_dir", str(tmp_path / "b")])
    onefile.main([*common, "--max_steps", "6", "--output_dir", str(tmp_path / "b"), "--resume"])
    with pytest.raises(SystemExit) as exc:  # the finished run is not overwritten by accident
        onefile.main([*common, "--max_steps", "6", "--output_dir", str(tmp_path / "a")])
    assert exc.value.code == 2
    full, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [e["step"] for e in resumed] == [1, 2, 3, 4, 5, 6]  # metrics.jsonl goes on where it stopped
    for a, b in zip(full, resumed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["lr"] == a["lr"]


def test_bad_input_is_one_line_error(tmp_path, tiny_tokenizer_dir, capsys, onefile):
    with pytest.raises(SystemExit) as exc:
        onefile.main(["--tokenizer_name", str(tiny_tokenizer_dir), "--n_positions", "64", "--block_size", "128",
                      "--output_dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--block_size" in err and "\n" not in err
    with pytest.raises(SystemExit) as exc:  # --resume with no checkpoint in the output folder
        onefile.main(["--resume", "--output_dir", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: --resume") and "checkpoint" in err and "\n" not in err


@pytest.mark.slow
def test_same_loss_curve_as_pretrain(tmp_path, same_start, small_text_file, onefile):
    """The promise of docs/training_architecture.md: same init, tokenizer, data, seed and settings ->
    the same 20 training losses as the HF Trainer recipe (and the same learning rates)."""
    start, init = same_start
    same = ["--train_file", str(small_text_file), "--block_size", "64", "--per_device_train_batch_size", "4",
            "--max_steps", "20", "--learning_rate", "1e-3", "--warmup_steps", "5", "--weight_decay", "0.1",
            "--adam_beta2", "0.95", "--max_grad_norm", "1.0", "--seed", "42", "--logging_steps", "1",
            "--eval_strategy", "steps", "--eval_steps", "20", "--save_strategy", "no",
            "--optim", "adamw_torch_fused"]  # AdamW here (the small presets' default is Muon: the test below)
    onefile.main([*start, *same, "--sample_max_new_tokens", "0", "--output_dir", str(tmp_path / "onefile")])
    r = run_script([str(REPO / "recipes" / "pretrain.py"), "--model_name_or_path", str(init), *same,
                    "--report_to", "none", "--data_cache_dir", str(tmp_path / "cache"), "--sample_max_new_tokens", "1",
                    "--output_dir", str(tmp_path / "pretrain")], timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    history = json.loads((tmp_path / "pretrain" / "trainer_state.json").read_text())["log_history"]
    theirs = [e for e in history if "loss" in e and "step" in e]
    ours = train_losses(tmp_path / "onefile")
    assert [e["step"] for e in theirs] == [e["step"] for e in ours] == list(range(1, 21))
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs)]
    assert max(diffs) < 1e-4, ("loss curves differ: "
                               f"{[(round(a['loss'], 6), round(b['loss'], 6)) for a, b in zip(ours, theirs)]}")
    for a, b in zip(ours, theirs):
        assert a["lr"] == pytest.approx(b["learning_rate"], rel=1e-9, abs=1e-15)
    # the same held-out documents, scored the same way: eval loss and bits per byte at step 20
    our_eval = [json.loads(line) for line in open(tmp_path / "onefile" / "metrics.jsonl") if "eval_loss" in line][-1]
    their_eval = next(e for e in history if "eval_loss" in e and e["step"] == 20)
    assert our_eval["eval_loss"] == pytest.approx(their_eval["eval_loss"], abs=1e-4)
    assert our_eval["eval_bits_per_byte"] == pytest.approx(their_eval["eval_bits_per_byte"], rel=1e-4)


@pytest.mark.slow
def test_ddp_matches_one_process(tmp_path, tiny_tokenizer_dir, small_text_file, onefile):
    common = [*NANO, "--tokenizer_name", str(tiny_tokenizer_dir), "--train_file", str(small_text_file),
              "--block_size", "64", "--max_steps", "4", "--warmup_steps", "1", *QUIET]
    # 2 processes x 4 blocks (gloo) vs 1 process x 8 blocks vs 1 process x 4 blocks x 2 accumulation steps:
    # the same 8 blocks per update, so the same losses.
    r = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ONEFILE), *common,
                    "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "ddp")],
                   timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    onefile.main([*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "single")])
    onefile.main([*common, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                  "--output_dir", str(tmp_path / "accum")])
    ddp, single, accum = (train_losses(tmp_path / d) for d in ("ddp", "single", "accum"))
    assert len(ddp) == len(single) == len(accum) == 4
    for a, b, c in zip(ddp, single, accum):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and c["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.slow
def test_reads_a_token_store_as_pretrain_does(tmp_path, tiny_tokenizer_dir, small_text_file, onefile):
    """A store from `toolkit prepare`: the same training and validation blocks as pretrain.py's reader."""
    from transformers import AutoTokenizer

    from toolkit.data.blocks import BlockDataset
    from toolkit.data.corpus import Corpus
    from toolkit.data.prepare import build_store
    from toolkit.data.store import TokenStore

    docs = small_text_file.read_text().split("\n\n")
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    build_store(Corpus.from_files(str(tmp_path / "docs.jsonl")), tok, str(tmp_path / "store"), validation_fraction=0.1,
                shard_tokens=5000, num_proc=1, progress=False)
    store = TokenStore(str(tmp_path / "store"))
    for pieces, theirs in zip(onefile.read_store(str(tmp_path / "store"), len(tok)), (store.train, store.validation)):
        ours = onefile.Blocks(pieces, 64)
        assert ours.n == len(BlockDataset(theirs, 64)) > 0
        assert all(torch.equal(ours[torch.tensor([i])][0], BlockDataset(theirs, 64)[i]["input_ids"])
                   for i in range(ours.n))  # every block, those that span two shards included
    # trains from it, with the store's own tokenizer
    onefile.main(["--token_store", str(tmp_path / "store"), *TINY, "--per_device_train_batch_size", "4",
                  "--max_steps", "3", *QUIET, "--output_dir", str(tmp_path / "run")])
    assert len(train_losses(tmp_path / "run")) == 3


def test_gpu_peak_table_agrees_with_toolkit():
    """onefile keeps its own copy of the data-sheet peaks (it stands alone); the two copies give the same figure."""
    import importlib.util

    from toolkit import flops

    spec = importlib.util.spec_from_file_location("onefile_peaks", ONEFILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB",
             "NVIDIA A10G", "NVIDIA L4", "NVIDIA L40S", "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090",
             "Tesla V100-SXM2-16GB", "Tesla T4", "Some Future GPU"]
    assert [module.gpu_peak(n) for n in names] == [flops.gpu_peak_flops(n) for n in names]
    assert module.GPU_PEAK_BF16 == flops.GPU_PEAK_BF16_FLOPS


@pytest.mark.slow
def test_muon_gives_the_same_losses_as_pretrain(tmp_path, same_start, small_text_file, onefile):
    """--optim muon in both recipes (onefile's Muon class, pretrain.py's toolkit/muon.py): the same 8 losses."""
    same = ["--train_file", str(small_text_file), "--block_size", "64", "--per_device_train_batch_size", "4",
            "--max_steps", "8", "--warmup_steps", "2", "--optim", "muon", "--seed", "42", "--logging_steps", "1",
            "--eval_strategy", "no", "--save_strategy", "no"]
    start, init = same_start
    onefile.main([*start, *same, "--sample_max_new_tokens", "0", "--output_dir", str(tmp_path / "o")])
    r = run_script([str(REPO / "recipes" / "pretrain.py"), "--model_name_or_path", str(init), *same,
                    "--report_to", "none", "--data_cache_dir", str(tmp_path / "cache"), "--sample_max_new_tokens", "1",
                    "--output_dir", str(tmp_path / "p")], timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    history = json.loads((tmp_path / "p" / "trainer_state.json").read_text())["log_history"]
    theirs = [e["loss"] for e in history if "loss" in e and "step" in e]
    ours = [e["loss"] for e in train_losses(tmp_path / "o")]
    assert len(ours) == len(theirs) == 8
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4, list(zip(ours, theirs))


@pytest.mark.slow
def test_a_store_larger_than_the_memory_it_may_use_trains_in_flat_memory(tmp_path, tiny_tokenizer_dir):
    """--token_store memory-maps the shards and copies out one batch at a time, so a store larger than the memory a
    process may use still trains. The training run gets RLIMIT_DATA = 1 GiB, the kernel's cap on the process's own
    memory (heap and private maps, which is what reading the store into arrays would take; the pages of a read-only
    file map are the kernel's page cache, shared and reclaimable, and are not counted), against 16 shards of 40M
    tokens: 1.28 GB as uint16, 5 GB as the int64 batches are made of. The same child first checks that the limit
    bites: one allocation of the store's size fails under it. The shards are sparse files (ids 0: nothing is written
    to disk), so the test costs seconds; the tokens' values play no part in how memory is used."""
    import numpy as np

    store, n_shards, shard_tokens = tmp_path / "store", 16, 40_000_000
    (store / "tokenizer").mkdir(parents=True)
    for f in tiny_tokenizer_dir.iterdir():
        (store / "tokenizer" / f.name).write_bytes(f.read_bytes())
    shards = [{"file": f"train-{i:05d}.bin", "tokens": shard_tokens} for i in range(n_shards)]
    for shard in shards:
        with open(store / shard["file"], "wb") as f:
            f.truncate(2 * shard_tokens)  # a hole: reads as zeros, takes no disk
    np.random.default_rng(0).integers(0, 512, 50_000, dtype=np.uint16).tofile(store / "validation-00000.bin")
    (store / "manifest.json").write_text(json.dumps({
        "complete": True, "dtype": "uint16", "tokenizer": {"vocab_size": 512},
        "splits": {"train": {"shards": shards},
                   "validation": {"shards": [{"file": "validation-00000.bin", "tokens": 50_000}]}}}))
    limit, store_bytes = 1 << 30, 2 * n_shards * shard_tokens
    assert store_bytes > limit
    code = ("import resource, runpy, sys\n"
            f"resource.setrlimit(resource.RLIMIT_DATA, ({limit}, {limit}))\n"
            "try:\n"
            f"    bytearray({store_bytes})\n"
            "    sys.exit('RLIMIT_DATA does not limit this process: the test would prove nothing')\n"
            "except MemoryError:\n"
            "    pass\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    # --vocab_size 512: the store tokenizer's rows (shape flags alone mean GPT-2's 50,257, whose logits would not fit)
    result = run_script(["-c", code, str(ONEFILE), "--token_store", str(store), *TINY, "--vocab_size", "512",
                         "--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1",
                         "--eval_steps", "3", "--sample_max_new_tokens", "0", "--output_dir", str(tmp_path / "run")],
                        env=ONE_THREAD, fresh=True)  # a fresh interpreter: the limit counts its whole heap
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(train_losses(tmp_path / "run")) == 3 and "10000000 train" in result.stdout


def test_shape_flags_mean_gpt2_as_in_pretrain(onefile):
    """The guide's `--n-layer 48 --n-head 16 --n-embd 1600` is GPT-2 1.5B in both recipes: GPT-2's positions and
    vocabulary; without shape flags both keep the CPU-sized default."""
    from toolkit.args import resolve_model_shape
    from toolkit.args.pretrain import ModelArguments

    for argv, kwargs in ((["--n-layer", "48", "--n-head", "16", "--n-embd", "1600"],
                          dict(n_layer=48, n_head=16, n_embd=1600)), ([], {})):
        ours, theirs = onefile.parse_args(argv), ModelArguments(**kwargs)
        resolve_model_shape(theirs)  # as pretrain.py does after parsing
        assert (ours.preset, ours.vocab_size) == (theirs.preset, theirs.vocab_size)
    assert onefile.parse_args(["--n_layer", "48"]).n_positions == 1024
