"""The token store: `toolkit prepare` (formats, shards, validation split, resume after SIGKILL), the memory-mapped
training reader (blocks across shard boundaries, corrupt shards, tokenizer mismatch), and pretrain.py trained from
a store, on one process and on 2 DDP ranks. Corpora are made in the tests; tokenizers are the tiny local BPE."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, embedded_texts, needs_shared, run_script

from toolkit.errors import UserError


def make_documents(n: int, seed: int = 0) -> list[str]:
    """n documents of 50-1500 characters cut from the standard library docs (varied lengths, real English)."""
    text = "\n\n".join(embedded_texts())
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - 2000, n)
    return [text[s:s + int(k)] for s, k in zip(starts, rng.integers(50, 1500, n))]


def write_fineweb_parquet(folder, docs: list[str], files: int = 2) -> None:
    """FineWeb's columns (text, id, dump, url, ...) split over `files` parquet files with small row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    for f in range(files):
        part = docs[f * per:(f + 1) * per]
        n = len(part)
        table = pa.table({"text": part, "id": [f"<urn:uuid:{f}-{i}>" for i in range(n)],
                          "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.org/{f}/{i}" for i in range(n)],
                          "language": ["en"] * n,
                          "language_score": [0.95] * n, "token_count": [len(t) // 4 for t in part]})
        pq.write_table(table, folder / f"{f:03d}_00000.parquet", row_group_size=40)


def write_jsonl(path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")


def expected_streams(docs, tok, every: int, max_tokens: int = 10**12) -> tuple[list[int], list[int]]:
    """What a store must hold: documents 0, every, 2*every, ... whole in validation (until max_tokens), the rest in
    training, each followed by EOS, in order."""
    train: list[int] = []
    val: list[int] = []
    for i, d in enumerate(docs):
        ids = tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        (val if every and i % every == 0 and len(val) < max_tokens else train).extend(ids)
    return train, val


def split_tokens(store_dir, split: str) -> list[int]:
    manifest = json.loads((store_dir / "manifest.json").read_text())
    shards = manifest["splits"][split]["shards"]
    # The few lines of numpy any trainer needs (nanoGPT's reader): raw uint16/uint32 shards, concatenated.
    return np.concatenate([np.memmap(store_dir / s["file"], dtype=manifest["dtype"], mode="r") for s in shards]
                          or [np.zeros(0, np.uint16)]).tolist()


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from toolkit.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


# ---------- prepare: sources, shards, split ----------

def test_fineweb_parquet_jsonl_csv_and_txt_sources_give_the_same_documents(tmp_path):
    import csv

    from toolkit.data.corpus import Corpus

    docs = make_documents(90)
    write_fineweb_parquet(tmp_path / "parquet", docs)
    write_jsonl(tmp_path / "docs.jsonl", docs)
    with open(tmp_path / "docs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows(enumerate(docs))
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:04d}.txt").write_text(d, encoding="utf-8")
    for source in ("parquet", "docs.jsonl", "docs.csv", "txt"):
        corpus = Corpus.from_files(str(tmp_path / source))
        assert list(corpus.texts()) == docs, source
        assert [t for b in corpus.batches(start_document=37, batch_chars=3000) for t in b.texts] == docs[37:], source
    with pytest.raises(UserError, match="no 'body' column"):
        list(Corpus.from_files(str(tmp_path / "parquet"), text_column="body").texts())


def test_a_null_text_is_refused_by_every_reader(tmp_path):
    """One null rule for every source (docs/troubleshooting.md): a row whose text is null stops the read with one
    line naming the source; an empty string is a document."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from toolkit.data.corpus import Corpus

    texts = ["first document", None, ""]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "rows.json").write_text(json.dumps([{"text": t} for t in texts]))
    (tmp_path / "dataset" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts}), tmp_path / "rows.parquet")
    pq.write_table(pa.table({"text": texts}), tmp_path / "dataset" / "data" / "train.parquet")
    for name in ("rows.jsonl", "rows.json", "rows.parquet"):
        with pytest.raises(UserError, match=f"'.*{name}' has rows whose 'text' is empty \\(null\\); remove them"):
            list(Corpus.from_files(str(tmp_path / name)).texts())
    with pytest.raises(UserError, match="dataset '.*' has rows whose 'text' is empty \\(null\\)"):
        list(Corpus.from_dataset(str(tmp_path / "dataset")).texts())
    (tmp_path / "ok.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a", "", "b")))
    assert list(Corpus.from_files(str(tmp_path / "ok.jsonl")).texts()) == ["a", "", "b"]


def test_jsonl_is_read_in_pieces_of_whole_lines_with_memory_bounded_by_the_piece(tmp_path, monkeypatch):
    """A jsonl file is parsed a piece of whole lines at a time (pyarrow's streaming reader read ahead and held
    ~1.5x the file): pieces cut between lines, a line longer than a piece read whole, the last line without a
    newline, and pyarrow's pool never holding more than a few pieces, however long the file."""
    import pyarrow as pa

    from toolkit.data import files as files_module
    from toolkit.data.corpus import Corpus

    docs = make_documents(400) + ["x" * 5000] + make_documents(100, seed=1)  # one line longer than a piece
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, docs)
    path.write_text(path.read_text(encoding="utf-8").rstrip("\n"), encoding="utf-8")  # no final newline
    monkeypatch.setattr(files_module, "JSON_LINES_BYTES", 2000)
    pool = pa.default_memory_pool()
    before = pool.bytes_allocated()  # what earlier tests in this process left in pyarrow's pool (a cached table)
    texts, held = [], []
    for batch in Corpus.from_files(str(path)).batches(batch_chars=1):
        texts += batch.texts
        held.append(pool.bytes_allocated() - before)  # what pyarrow holds while the consumer works: no read-ahead
    assert texts == docs
    assert max(held) < 20_000, max(held)  # pieces of 2 kB (one of 5 kB), not the ~1 MB file


def test_a_tokenizer_worker_that_dies_gives_a_one_line_error_not_a_hang(tok):
    import multiprocessing
    import signal as signals

    from toolkit.data.corpus import Batch
    from toolkit.data.tokenize_pool import encoded_batches

    batches = (Batch([f"document {i} " * 50], 0.0) for i in range(200))
    results = encoded_batches(batches, tok.backend_tokenizer.to_str(), tok.eos_token_id, "uint16", 2)
    next(results)
    for child in multiprocessing.active_children():  # the pool's workers: as the OOM killer would
        os.kill(child.pid, signals.SIGKILL)
    with pytest.raises(UserError, match="worker process died.*rerun the same command"):
        for _ in results:
            pass


def test_store_holds_every_document_and_cuts_shards_inside_documents(tmp_path, tok):
    from toolkit.data.corpus import Corpus
    from toolkit.data.prepare import build_store
    from toolkit.data.store import TokenStore

    docs = make_documents(300)
    write_fineweb_parquet(tmp_path / "corpus", docs)
    corpus = Corpus.from_files(str(tmp_path / "corpus"))
    kwargs = {"validation_fraction": 0.05, "shard_tokens": 997, "batch_chars": 4000, "progress": False}
    manifest = build_store(corpus, tok, str(tmp_path / "two"), num_proc=2, **kwargs)
    train, val = expected_streams(docs, tok, every=20)
    assert split_tokens(tmp_path / "two", "train") == train and split_tokens(tmp_path / "two", "validation") == val
    shards = manifest["splits"]["train"]["shards"]
    assert [s["tokens"] for s in shards[:-1]] == [997] * (len(shards) - 1) and 0 < shards[-1]["tokens"] <= 997
    ends = np.cumsum([s["tokens"] for s in shards[:-1]]) - 1
    assert any(train[e] != tok.eos_token_id for e in ends)  # some shard ends inside a document
    assert manifest["dtype"] == "uint16" and manifest["complete"]
    assert manifest["tokenizer"]["eos_id"] == tok.eos_token_id
    split_docs = manifest["splits"]["train"]["documents"], manifest["splits"]["validation"]["documents"]
    assert split_docs == (285, 15)
    assert sum(s["utf8_bytes"] for part in manifest["splits"].values() for s in part["shards"]) == \
        sum(len(d.encode()) for d in docs)
    # The same bytes whatever the number of processes.
    build_store(corpus, tok, str(tmp_path / "one"), num_proc=1, **kwargs)
    for f in sorted(os.listdir(tmp_path / "two")):
        if f.endswith(".bin"):
            assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    # Rerunning on a complete store verifies it and changes nothing; other settings are refused in one line.
    assert build_store(corpus, tok, str(tmp_path / "two"), num_proc=1, **kwargs)["complete"]
    with pytest.raises(UserError, match="other settings.*shard_tokens"):
        build_store(corpus, tok, str(tmp_path / "two"), **{**kwargs, "shard_tokens": 500})
    assert TokenStore(str(tmp_path / "two")).train.n_tokens == len(train)


def test_validation_cap_and_the_one_document_corpus(tmp_path, tok):
    from toolkit.data.corpus import Corpus
    from toolkit.data.prepare import build_store

    docs = make_documents(200)
    write_jsonl(tmp_path / "docs.jsonl", docs)
    corpus = Corpus.from_files(str(tmp_path / "docs.jsonl"))
    manifest = build_store(corpus, tok, str(tmp_path / "capped"), validation_fraction=0.1, validation_max_tokens=600,
                           progress=False)
    train, val = expected_streams(docs, tok, every=10, max_tokens=600)
    assert split_tokens(tmp_path / "capped", "validation") == val
    assert split_tokens(tmp_path / "capped", "train") == train
    assert 600 <= len(val) < 600 + 1000 and manifest["splits"]["validation"]["documents"] < 20

    # One document (a single .txt, like tinyshakespeare): the last 5% of its tokens are validation.
    (tmp_path / "book.txt").write_text("\n\n".join(docs), encoding="utf-8")
    manifest = build_store(Corpus.from_files(str(tmp_path / "book.txt")), tok, str(tmp_path / "book"),
                           validation_fraction=0.05, progress=False)
    whole = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    head, tail = split_tokens(tmp_path / "book", "train"), split_tokens(tmp_path / "book", "validation")
    assert head + tail == whole and len(tail) == round(len(whole) * 0.05)
    assert manifest["validation"]["rule"] == "tail of the only document"


def test_a_validation_file_is_the_whole_validation_split_with_its_own_progress_bar(tmp_path, tok, capsys):
    from toolkit.data.corpus import Corpus
    from toolkit.data.prepare import build_store

    docs, held_out = make_documents(120), make_documents(30, seed=1)
    write_jsonl(tmp_path / "train.jsonl", docs)
    write_jsonl(tmp_path / "valid.jsonl", held_out)
    manifest = build_store(Corpus.from_files(str(tmp_path / "train.jsonl")), tok, str(tmp_path / "store"),
                           validation_corpus=Corpus.from_files(str(tmp_path / "valid.jsonl")), progress=True)
    train, _ = expected_streams(docs, tok, every=0)
    val, _ = expected_streams(held_out, tok, every=0)
    assert split_tokens(tmp_path / "store", "train") == train  # nothing held out of the training corpus
    assert split_tokens(tmp_path / "store", "validation") == val
    assert manifest["validation"]["rule"] == "documents from --validation_file"
    err = capsys.readouterr().err
    assert "prepare store:" in err and "prepare store (validation):" in err  # one bar per source
    assert f"{len(train) + len(val):,} tokens tokenized" in manifest["_summary"]  # the summary counts both


@pytest.mark.slow
def test_prepare_resumes_after_sigkill_with_identical_bytes(tmp_path, tok, tiny_tokenizer_dir):
    """A real `toolkit prepare` process (2 workers) killed with SIGKILL mid-run, then the same command again: the
    store equals one made in one go (and by one process)."""
    from toolkit.data.corpus import Corpus
    from toolkit.data.prepare import build_store

    docs = make_documents(3000, seed=1)
    write_jsonl(tmp_path / "docs.jsonl", docs)
    store = tmp_path / "store"
    command = [sys.executable, "-m", "toolkit", "prepare", str(tmp_path / "docs.jsonl"), "--output_dir", str(store),
               "--tokenizer_name", str(tiny_tokenizer_dir), "--shard_tokens", "25000", "--validation_fraction", "0.01",
               "--num_proc", "2", "--batch_chars", "20000", "--no_progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 120
    while True:  # kill the process group (command + workers) once a few shards are complete
        manifest = json.loads((store / "manifest.json").read_text()) if (store / "manifest.json").exists() else {}
        if len(manifest.get("splits", {}).get("train", {}).get("shards", [])) >= 3:
            break
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "no shard written in time"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed = json.loads((store / "manifest.json").read_text())
    assert not killed["complete"] and killed["resume"]["document"] > 0

    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    reference = tmp_path / "reference"
    build_store(Corpus.from_files(str(tmp_path / "docs.jsonl")), tok, str(reference), shard_tokens=25000,
                validation_fraction=0.01, num_proc=1, batch_chars=20000, progress=False)
    assert sorted(os.listdir(store)) == sorted(os.listdir(reference))  # no leftovers of the killed run
    for name in sorted(os.listdir(reference)):
        if name.endswith(".bin"):
            assert (store / name).read_bytes() == (reference / name).read_bytes(), name
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (store, reference))
    ours.pop("command"), theirs.pop("command")
    assert ours == theirs


# ---------- the training reader ----------

def test_blocks_straddle_shards_and_each_costs_the_same(tmp_path, tok):
    from toolkit.data import blocks as data
    from toolkit.data.corpus import Corpus
    from toolkit.data.prepare import build_store
    from toolkit.data.store import TokenStore

    docs = make_documents(100)
    write_jsonl(tmp_path / "docs.jsonl", docs)
    build_store(Corpus.from_files(str(tmp_path / "docs.jsonl")), tok, str(tmp_path / "s"), shard_tokens=100,
                validation_fraction=0.1, progress=False)
    store = TokenStore(str(tmp_path / "s"))
    stream = split_tokens(tmp_path / "s", "train")
    train, val = data.block_datasets(store, 64, 1)
    assert len(train) == len(stream) // 64 and len(val) == store.validation.n_tokens // 64
    for i in range(len(train)):  # most blocks of 64 tokens straddle a 100-token shard boundary
        assert train[i]["input_ids"].tolist() == stream[i * 64:(i + 1) * 64]
    with pytest.raises(IndexError):
        train[len(train)]
    import pickle

    clone = pickle.loads(pickle.dumps(train))  # DataLoader workers / spawn: paths travel, not mapped pages
    assert clone[3]["input_ids"].tolist() == train[3]["input_ids"].tolist()


def test_streaming_packs_batches_like_the_store(tmp_path, tok):
    """--streaming (no store) tokenizes a batch of rows per call and packs the same stream a store holds."""
    import datasets

    from toolkit.data.blocks import StreamingBlocks

    docs = make_documents(120)
    write_fineweb_parquet(tmp_path / "parquet", docs, files=1)
    stream = datasets.load_dataset("parquet", data_files=str(tmp_path / "parquet" / "*.parquet"), split="train",
                                   streaming=True)
    everything, _ = expected_streams(docs, tok, every=0)
    blocks = [b["input_ids"].tolist() for b in StreamingBlocks(stream, tok, 32, rows_per_batch=16, skip=3, take=50)]
    assert blocks == [everything[i * 32:(i + 1) * 32] for i in range(3, 53)]
    # pretrain.py --streaming --dataset_name FOLDER: the same stream; its first blocks are the evaluation set
    from types import SimpleNamespace

    from toolkit.data.blocks import streaming_datasets

    data_args = SimpleNamespace(dataset_name=str(tmp_path / "parquet"), dataset_config_name=None, block_size=32,
                                text_column="text", streaming_eval_blocks=4)
    train, evaluation = streaming_datasets(data_args, tok)
    assert [b["input_ids"].tolist() for b in evaluation] == [everything[i * 32:(i + 1) * 32] for i in range(4)]
    assert next(iter(train))["input_ids"].tolist() == everything[4 * 32:5 * 32]


def test_dataset_source_streams_into_the_same_store(tmp_path, tok):
    """--dataset_name (here a local parquet dataset folder, streamed with datasets like a Hub dataset)."""
    from toolkit.data.corpus import Corpus
    from toolkit.data.prepare import build_store

    docs = make_documents(150)
    write_fineweb_parquet(tmp_path / "dataset" / "data", docs, files=1)
    build_store(Corpus.from_dataset(str(tmp_path / "dataset")), tok, str(tmp_path / "s"), validation_fraction=0.05,
                shard_tokens=3000, progress=False)
    train, val = expected_streams(docs, tok, every=20)
    assert split_tokens(tmp_path / "s", "train") == train and split_tokens(tmp_path / "s", "validation") == val
    resumed = Corpus.from_dataset(str(tmp_path / "dataset")).batches(start_document=77)
    assert [t for b in resumed for t in b.texts] == docs[77:]


# ---------- pretrain.py from a store ----------

def run_pretrain_in_process(argv: list[str], capsys) -> tuple[int, str]:
    import runpy

    old = sys.argv
    sys.argv = ["recipes/pretrain.py", *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "recipes" / "pretrain.py"), run_name="__main__")
    finally:
        sys.argv = old
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def parquet_store(tmp_path_factory, tiny_tokenizer_dir):
    """A FineWeb-like parquet folder prepared by the real command (several shards, 1% validation)."""
    root = tmp_path_factory.mktemp("store")
    write_fineweb_parquet(root / "corpus", make_documents(1500, seed=2), files=3)
    result = run_script(["-m", "toolkit", "prepare", str(root / "corpus"), "--output_dir", str(root / "store"),
                         "--tokenizer_name", str(tiny_tokenizer_dir), "--shard_tokens", "40000",
                         "--validation_fraction", "0.01", "--no_progress"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training +" in result.stdout and "peak memory" in result.stdout and "--token_store" in result.stdout
    return root / "store"


@pytest.mark.slow
def test_pretrain_trains_from_a_store_and_its_tokenizer(parquet_store, tmp_path):
    out = tmp_path / "out"
    result = run_script(["recipes/pretrain.py", "--preset", "gpt2-nano", "--token_store", str(parquet_store),
                         "--block_size", "32", "--per_device_train_batch_size", "8", "--max_steps", "30",
                         "--warmup_steps", "5", "--eval_on_start", "true", "--eval_steps", "30",
                         "--save_strategy", "no", "--report_to", "none", "--sample_max_new_tokens", "4",
                         "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from the token store {parquet_store}" in result.stdout
    evals = {h["step"]: h["eval_loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
             if "eval_loss" in h}
    assert evals[30] < evals[0] - 0.5, evals
    assert len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]) == 512  # the store's tokenizer


@pytest.mark.slow
def test_store_problems_are_one_line_errors(parquet_store, tmp_path, capsys, tiny_model_dir):
    import shutil

    from toolkit.tokenizer import train_bpe_tokenizer

    base = ["--preset", "gpt2-nano", "--block_size", "32", "--per_device_train_batch_size", "4", "--report_to", "none",
            "--output_dir", str(tmp_path / "out")]
    other = tmp_path / "other-tokenizer"
    train_bpe_tokenizer(embedded_texts(20), 300).save_pretrained(other)

    def one_line_error(argv, pattern):
        code, err = run_pretrain_in_process(base + argv, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err[-2000:]
        assert __import__("re").search(pattern, err), err
        assert not (tmp_path / "out" / "model.safetensors").exists()

    one_line_error(["--token_store", str(parquet_store), "--tokenizer_name", str(other)],
                   "made with another tokenizer")
    one_line_error(["--token_store", str(tmp_path / "nowhere")], "does not exist.*toolkit prepare")
    broken = tmp_path / "broken"
    shutil.copytree(parquet_store, broken)
    first = broken / "train-00000.bin"
    first.write_bytes(first.read_bytes()[:-10])
    one_line_error(["--token_store", str(broken)], "train-00000.bin has .* bytes .*truncated.*rebuild")
    first.write_bytes(b"\xff" * (first.stat().st_size + 10))  # right size, garbage ids
    one_line_error(["--train_file", str(broken)], "train-00000.bin holds token id 65535.*corrupt")
    (broken / "manifest.json").unlink()
    one_line_error(["--token_store", str(broken)], "no manifest.json")


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_read_disjoint_blocks_that_cover_the_epoch(parquet_store, tmp_path):
    """2 real gloo ranks under torchrun: HF Trainer's train dataloader over the store gives each rank its own
    blocks."""
    script = tmp_path / "read_blocks.py"
    script.write_text(f"""
import json, os, sys
sys.path.insert(0, {str(REPO)!r})
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from toolkit.data import blocks as data
from toolkit.data.store import TokenStore

class Indexed(data.BlockDataset):  # the block's index travels with it, to check which blocks each rank read
    def __getitem__(self, i):
        return {{**super().__getitem__(i), "index": torch.tensor(i)}}

store = TokenStore({str(parquet_store)!r})
train = Indexed(store.train, 64)
args = TrainingArguments(output_dir={str(tmp_path / "out")!r}, use_cpu=True, per_device_train_batch_size=4,
                         report_to="none", seed=7, dataloader_drop_last=True, remove_unused_columns=False)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=512, n_positions=64))
trainer = Trainer(model=model, args=args, train_dataset=train)
seen = [(int(i), row) for batch in trainer.get_train_dataloader()
        for i, row in zip(batch["index"], batch["input_ids"].tolist())]
rank = torch.distributed.get_rank()
json.dump({{"world": torch.distributed.get_world_size(), "blocks": seen, "n": len(train)}},
          open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w"))
""")
    result = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    n = ranks[0]["n"]
    a, b = ({i for i, _ in r["blocks"]} for r in ranks)
    assert len(ranks[0]["blocks"]) == len(ranks[1]["blocks"]) == len(a) == len(b) == (n // 8) * 4  # 2 x 4 per step
    assert not a & b and len(a | b) == (n // 8) * 8 and a | b <= set(range(n))  # disjoint; the epoch, each block once
    stream = split_tokens(parquet_store, "train")
    for i, row in ranks[0]["blocks"][:50] + ranks[1]["blocks"][:50]:
        assert row == stream[i * 64:(i + 1) * 64]  # block i is tokens [64 i, 64 (i + 1)) of the training stream


@pytest.mark.slow
@needs_shared
@pytest.mark.usefixtures("warm_benchmark_runs")
def test_data_scale_benchmark_quick(tmp_path):
    """benchmarks/data_scale.py --quick end to end (tiny sizes; nothing here is timed): every method ran on the same
    tokens and the report parses."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import data_scale
    import harness

    doc, out = tmp_path / "benchmarks.md", tmp_path / "out.json"
    results = data_scale.main(["--quick", "--num_proc", "2", "--doc", str(doc), "--json", str(out)])
    rows = harness.parse_table(doc.read_text()[doc.read_text().index("|"):])
    assert len(results) == len(rows) == 3
    assert results[0]["tokens"] < results[1]["tokens"] < results[2]["tokens"]
    for r in results:
        assert r["prepare_tokens_per_s"] > 0 and r["raw_tokens_per_s"] > 0 and r["nanogpt_tokens_per_s"] > 0
        assert 0 < r["largest_file"] <= 50_000 * 2  # shards of 50,000 uint16 tokens
    data = json.loads(out.read_text())
    assert data["train_blocks_per_s"] > 0 and len(data["loader_blocks_per_s"]) == 2
    assert "Projection for FineWeb-Edu" in doc.read_text()
