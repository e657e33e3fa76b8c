"""`toolkit generate` and `toolkit eval` (loss, perplexity, bits per byte, lm-eval tasks), bits per byte and the
model card of recipes/pretrain.py. CPU, offline, tiny models; the commands run in-process through main(argv)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import GPT2_TOKENIZER, REPO, embedded_texts, needs_shared, require_dev, run_script

ENGLISH = ("The quick brown fox jumps over the lazy dog. "
           "A stitch in time saves nine; the early bird catches the worm.\n"
           "Ünïcödé bytes: café, naïve, 日本語, emoji \N{GRINNING FACE}.\n") * 12


def run_main(module, argv, capsys):
    """(exit code, stdout, stderr) of `toolkit <module> argv` run in this process."""
    try:
        code = module.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error_line(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _quiet_loading():
    """transformers draws a 'Loading weights' bar on stderr; the error-line checks want the command's own lines."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "valid.txt"
    path.write_text(ENGLISH, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter with random (non-zero) weights on the tiny model, saved as recipes/lora.py saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"],
                        fan_in_fan_out=True, init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------
# toolkit generate
# ------------------------------------------------------------------------------------------------


def test_generate_same_seed_same_text_and_other_seed_other_text(tiny_model_dir, capsys):
    from toolkit.commands import generate

    argv = [str(tiny_model_dir), "--prompt", "The", "--max_new_tokens", "24", "--temperature", "1.0",
            "--num_samples", "2"]
    first = run_main(generate, [*argv, "--seed", "3"], capsys)
    again = run_main(generate, [*argv, "--seed", "3"], capsys)
    other = run_main(generate, [*argv, "--seed", "4"], capsys)
    assert first[0] == 0 and first[1] == again[1]
    assert first[1].count("--- sample") == 2 and first[1] != other[1]


def test_greedy_equals_model_generate(tiny_model_dir, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.commands import generate

    code, out, _ = run_main(generate, [str(tiny_model_dir), "--prompt", "The answer", "--temperature", "0",
                                       "--max_new_tokens", "20"], capsys)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tokenizer("The answer", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)
    assert code == 0
    assert out == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"  # streamed text, then a newline
    # sampling among the one most likely token is greedy decoding too; the prompt read from a file is the same prompt
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("The answer", encoding="utf-8")
    code, top_1, err = run_main(generate, [str(tiny_model_dir), "--prompt_file", str(prompt_file), "--top_k", "1",
                                           "--temperature", "1.0", "--max_new_tokens", "20", "--seed", "7"], capsys)
    assert code == 0 and top_1 == out, err


def test_adapter_changes_the_output_and_equals_the_merged_model(tiny_model_dir, adapter_dir, tmp_path, capsys):
    from toolkit.commands import generate
    from toolkit.merge import merge_adapter

    greedy = ["--prompt", "The", "--temperature", "0", "--max_new_tokens", "20"]
    _, plain, _ = run_main(generate, [str(tiny_model_dir), *greedy], capsys)
    code, adapted, err = run_main(generate, [str(tiny_model_dir), "--adapter", str(adapter_dir), *greedy], capsys)
    assert code == 0, err
    merged = merge_adapter(str(adapter_dir), str(tmp_path / "merged"))
    capsys.readouterr()
    _, from_merged, _ = run_main(generate, [merged, *greedy], capsys)
    _, base_from_adapter, _ = run_main(generate, ["--adapter", str(adapter_dir), *greedy], capsys)  # base recorded
    assert adapted != plain
    assert adapted == from_merged == base_from_adapter


# ------------------------------------------------------------------------------------------------
# toolkit eval: loss, perplexity, bits per byte
# ------------------------------------------------------------------------------------------------


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a byte-level BPE token stands for, by GPT-2's byte <-> character table (EOS: none)."""
    if token_id == tokenizer.eos_token_id:
        return b""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = [b for b in range(256) if b not in printable]
    char_to_byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(extra)}
    return bytes(char_to_byte[c] for c in tokenizer.convert_ids_to_tokens(token_id))


@pytest.mark.slow
def test_eval_loss_and_bits_per_byte_equal_a_hand_computation(tiny_model_dir, text_file, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.commands import eval as evaluation

    code, out, err = run_main(evaluation, [str(tiny_model_dir), "--text_file", str(text_file), "--block_size", "32",
                                           "--batch_size", "3", "--json", "--no_progress"], capsys)
    assert code == 0, err
    got = json.loads(out)["text"]

    # By hand: the file is one document followed by EOS; windows of 32 tokens without overlap (the last one shorter);
    # every token but a window's first is predicted from the ones before it in its window.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tokenizer(ENGLISH, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    nll, count, n_bytes = 0.0, 0, 0
    for start in range(0, len(ids), 32):
        window = ids[start:start + 32]
        if len(window) < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0].double(), dim=-1)
        nll -= sum(logp[pos - 1, window[pos]].item() for pos in range(1, len(window)))
        count += len(window) - 1
        n_bytes += sum(len(token_bytes(tokenizer, t)) for t in window[1:])
    assert got["tokens"] == count and got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(got["loss"] * got["tokens"] / got["bytes"] / math.log(2), rel=1e-9)

    # the same document as a JSON Lines row, and the text file inside a folder: the same tokens and loss
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": ENGLISH}) + "\n", encoding="utf-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "valid.txt").write_text(ENGLISH, encoding="utf-8")
    for source in (rows, folder):
        code, out, err = run_main(evaluation, [str(tiny_model_dir), "--text_file", str(source), "--block_size", "32",
                                               "--batch_size", "3", "--json", "--no_progress"], capsys)
        assert code == 0, err
        again = json.loads(out)["text"]
        assert (again["tokens"], again["bytes"]) == (count, n_bytes), source
        assert again["loss"] == pytest.approx(got["loss"], rel=1e-6), source


def test_eval_with_an_adapter_scores_the_adapted_model(tiny_model_dir, adapter_dir, text_file, tmp_path, capsys):
    """`toolkit eval --adapter`: the loss of the base with the adapter applied, which is the merged model's."""
    from toolkit.commands import eval as evaluation
    from toolkit.merge import merge_adapter

    common = ["--text_file", str(text_file), "--block_size", "32", "--json", "--no_progress"]
    losses = {}
    for name, argv in (("base", [str(tiny_model_dir)]), ("adapter", [str(tiny_model_dir), "--adapter",
                                                                      str(adapter_dir)])):
        code, out, err = run_main(evaluation, [*argv, *common], capsys)
        assert code == 0, err
        losses[name] = json.loads(out)["text"]["loss"]
    merged = merge_adapter(str(adapter_dir), str(tmp_path / "merged"))
    capsys.readouterr()
    code, out, err = run_main(evaluation, [merged, *common], capsys)
    assert code == 0, err
    assert losses["adapter"] != pytest.approx(losses["base"], rel=1e-3)
    assert losses["adapter"] == pytest.approx(json.loads(out)["text"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_sliding_windows_give_a_lower_perplexity_than_non_overlapping_ones():
    """With --stride every scored token has at least block_size - stride tokens of context; without it a window's
    first tokens have almost none. On a sequence that only longer contexts disambiguate (a 48-token cycle over 6
    token ids, learnt by a tiny GPT-2 in 120 steps), the sliding estimate must be lower. Scored from token arrays,
    the entry point for text already tokenized."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from toolkit.evaluation import score_token_chunks

    class OneBytePerToken:
        def count(self, ids):
            return len(ids)

    rng = np.random.default_rng(0)
    stream = np.tile(rng.choice(np.arange(10, 16), size=48), 30)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=64, bos_token_id=0,
                                       eos_token_id=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small run faster on one thread (and much faster on a busy machine)
    try:
        for _ in range(120):
            x = torch.tensor(np.stack([stream[s:s + 32] for s in rng.integers(0, len(stream) - 32, size=16)]))
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    chunks = [stream[:500], stream[500:1200]]  # windows span the chunk boundary
    plain = score_token_chunks(model, chunks, OneBytePerToken(), 32, progress=False)
    sliding = score_token_chunks(model, chunks, OneBytePerToken(), 32, stride=8, progress=False)
    assert plain.tokens == 1200 - 38 and sliding.tokens == 1199  # 38 windows; sliding scores every token but the first
    assert sliding.perplexity < plain.perplexity
    assert sliding.bits_per_byte == pytest.approx(sliding.loss / math.log(2))  # one byte per token


@pytest.mark.parametrize("which", ["tiny", pytest.param("gpt2", marks=needs_shared)])
def test_byte_counts_are_the_utf8_bytes_of_the_text(tiny_tokenizer_dir, which):
    from transformers import AutoTokenizer

    from toolkit.lm_metrics import ByteCounter

    for tokenizer in [AutoTokenizer.from_pretrained(tiny_tokenizer_dir if which == "tiny" else GPT2_TOKENIZER)]:
        ids = tokenizer(ENGLISH, add_special_tokens=False).input_ids
        counter = ByteCounter(tokenizer)
        assert counter.exact
        assert counter.count(ids) == len(ENGLISH.encode("utf-8"))
        assert counter.count(ids + [tokenizer.eos_token_id]) == len(ENGLISH.encode("utf-8"))  # EOS: 0 bytes


def test_text_read_in_pieces_tokenizes_as_a_whole(tiny_tokenizer_dir, tmp_path):
    """Memory stays flat because a long file is tokenized in pieces; the cuts must not change the tokens."""
    import numpy as np
    from transformers import AutoTokenizer

    from toolkit.data.files import text_file_pieces
    from toolkit.evaluation import tokenize_pieces

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = "\n\n".join(embedded_texts(30)) + ENGLISH
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    pieces = text_file_pieces(str(path), piece_chars=2000)
    got = np.concatenate([ids for ids, _ in tokenize_pieces(pieces, tokenizer)])
    expected = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert got.tolist() == expected


# ------------------------------------------------------------------------------------------------
# Bad input: one line on stderr that names the fix
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, argv, needles", [
    ("generate", ["./missing/model", "--prompt", "x"], ["'./missing/model' does not exist", "save_pretrained folder"]),
    ("generate", ["missing/model", "--prompt", "x"],  # a Hub id's shape: asked of the Hub (offline here)
     ["could not load the config of model 'missing/model'", "save_pretrained folder", "reachable Hub name"]),
    ("eval", ["--text_file", "x.txt"], ["no model given", "pass MODEL"]),
    ("generate", ["M", "--max_new_tokens", "0"], ["--max_new_tokens 0 is out of range: it must be at least 1"]),
    ("generate", ["M", "--temperature", "-1"],
     ["--temperature -1 is out of range: it must be at least 0 (0 = greedy)"]),
    ("generate", ["M", "--top_p", "0"], ["--top_p 0 is out of range: it must be in (0, 1] (1 = no limit)"]),
    ("generate", ["M", "--seed", "-1"], ["--seed -1 is out of range: it must be at least 0"]),
    ("eval", ["M", "--text_file", "T", "--stride", "0"], ["--stride 0 is out of range: it must be at least 1"]),
    ("eval", ["M", "--text_file", "T", "--block_size", "32", "--stride", "64"],
     ["--stride 64 is out of range: it must be in [1, 32] (at most the block size)"]),
    ("eval", ["M", "--text_file", "T", "--limit", "0"], ["--limit 0 is out of range: it must be above 0"]),
    ("eval", ["M", "--text_file", "T", "--block_size", "4096"], ["larger than the model's context of 128 tokens"]),
    ("eval", ["M"], ["nothing to evaluate", "--text_file", "--tasks"]),
    ("eval", ["M", "--text_file", "EMPTY"], ["is empty", "pass a file with text"]),
    ("eval", ["M", "--text_file", "missing.txt"], ["'missing.txt' does not exist"]),
    ("generate", ["M", "--prompt", "x", "--max_new_tokens", "500"],
     ["exceeds the model's context of 128", "--max_new_tokens"]),
])
def test_bad_input_is_one_line_naming_the_fix(command, argv, needles, tiny_model_dir, text_file, tmp_path, capsys):
    from toolkit.commands import eval as evaluation
    from toolkit.commands import generate

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = [{"M": str(tiny_model_dir), "T": str(text_file), "EMPTY": str(empty)}.get(a, a) for a in argv]
    code, _, err = run_main(generate if command == "generate" else evaluation, argv, capsys)
    assert_one_error_line(code, err, *needles)


def test_adapter_for_another_base_is_one_line(adapter_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from toolkit.commands import generate

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    other = tmp_path / "other-base"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.eos_token_id,
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    code, _, err = run_main(generate, [str(other), "--adapter", str(adapter_dir), "--prompt", "x"], capsys)
    assert_one_error_line(code, err, "does not fit model", "trained on another base", "pass as MODEL the base")


def test_lm_eval_missing_is_one_line(tiny_model_dir, monkeypatch, capsys):
    import sys

    from toolkit.commands import eval as evaluation

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    code, _, err = run_main(evaluation, [str(tiny_model_dir), "--tasks", "hellaswag"], capsys)
    assert_one_error_line(code, err, "lm-evaluation-harness is not installed", 'pip install -e ".[eval]"')


# ------------------------------------------------------------------------------------------------
# lm-eval: a HellaSwag-format task from a local file, scored by the harness's own hellaswag config
# ------------------------------------------------------------------------------------------------


def favour_token(model_dir: Path, out_dir: Path, word: str) -> None:
    """Save a copy of the tiny model that puts almost all probability on the token of `word` after any context."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (token,) = tokenizer(word, add_special_tokens=False).input_ids
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    # the final LayerNorm output leans along axis 0, and the (tied) row of `token` points along it
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 10.0
        model.transformer.wte.weight[token] = 0.0
        model.transformer.wte.weight[token, 0] = 10.0
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def hellaswag_task(folder: Path, name: str, rows: list[dict]) -> None:
    """A task YAML that includes lm-eval's own hellaswag.yaml (prompt, processing, acc/acc_norm) on a local file."""
    import lm_eval

    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    hellaswag = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (folder / f"{name}.yaml").write_text(
        f"include: {hellaswag}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        f"training_split: null\nvalidation_split: validation\n",
        encoding="utf-8")


def hellaswag_rows(right_is_favoured: bool) -> list[dict]:
    """HellaSwag's schema; the ending made of ' the' tokens is the right one, or (control) never the right one."""
    rows = []
    for i, (label, context) in enumerate([(0, "A man sits at a piano"), (2, "The woman opens the door"),
                                          (3, "Two dogs run")]):
        endings = ["plays loud music.", "eats an orange slowly.", "sings with a choir!", "looks at the sky."]
        endings[label] = "the the the the"
        rows.append({"ind": i, "activity_label": "Test", "ctx_a": context, "ctx_b": "and then",
                     "ctx": f"{context} and then", "endings": endings,
                     "label": str(label if right_is_favoured else (label + 1) % 4), "split": "val",
                     "split_type": "indomain", "source_id": f"test~{i}"})
    return rows


def test_lm_eval_scores_a_hellaswag_format_task_offline(tiny_model_dir, tmp_path, capsys):
    require_dev("lm_eval")
    from toolkit.commands import eval as evaluation

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    hellaswag_task(tasks, "tiny_hellaswag", hellaswag_rows(right_is_favoured=True))
    hellaswag_task(tasks, "tiny_hellaswag_control", hellaswag_rows(right_is_favoured=False))
    model = tmp_path / "favours-the"
    favour_token(tiny_model_dir, model, " the")
    code, out, err = run_main(evaluation, [str(model), "--tasks", "tiny_hellaswag,tiny_hellaswag_control",
                                           "--include_path", str(tasks), "--json"], capsys)
    assert code == 0, err[-2000:]
    report = json.loads(out)
    assert report["tasks"]["tiny_hellaswag"]["acc_norm"] == 1.0
    assert report["tasks"]["tiny_hellaswag"]["acc"] == 1.0
    assert report["tasks"]["tiny_hellaswag_control"]["acc_norm"] == 0.0  # the scores follow the labels
    assert report["lm_eval"]["version"]


@pytest.mark.slow
def test_unknown_task_is_one_line(tiny_model_dir, tmp_path, capsys):
    require_dev("lm_eval")
    from toolkit.commands import eval as evaluation

    code, _, err = run_main(evaluation, [str(tiny_model_dir), "--tasks", "hellaswagg",
                                         "--include_path", str(tmp_path)], capsys)
    assert_one_error_line(code, err, "unknown lm-eval task(s): hellaswagg", "lm-eval ls tasks", "--include_path")


# ------------------------------------------------------------------------------------------------
# recipes/pretrain.py: bits per byte in the logs (equal to toolkit eval's), lm-eval during training, the model card
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_logs_bits_per_byte_that_toolkit_eval_reproduces_and_writes_a_card(tmp_path, small_text_file, capsys):
    require_dev("lm_eval")
    from huggingface_hub import ModelCard

    from toolkit.commands import eval as evaluation

    valid = tmp_path / "valid.txt"
    valid.write_text("\n\n".join(embedded_texts(75)[60:75])[:20_000], encoding="utf-8")  # ~200 blocks of 32 tokens
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    hellaswag_task(tasks, "tiny_hellaswag", hellaswag_rows(right_is_favoured=True))
    out = tmp_path / "out"
    result = run_script(["recipes/pretrain.py", "--preset", "gpt2-nano", "--vocab_size", "512", "--block_size", "32",
                         "--per_device_train_batch_size", "8", "--max_steps", "20", "--warmup_steps", "5",
                         "--eval_steps", "20", "--save_strategy", "no", "--report_to", "none",
                         "--sample_max_new_tokens", "8", "--train_file", str(small_text_file),
                         "--validation_file", str(valid), "--output_dir", str(out),
                         "--data_cache_dir", str(tmp_path / "cache"), "--eval_tasks", "tiny_hellaswag",
                         "--eval_tasks_include_path", str(tasks), "--eval_tasks_limit", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bits per byte" in result.stdout

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    # one evaluation at step 20: the last step's evaluation is the final one (pretrain.py does not evaluate twice)
    assert [h["step"] for h in evals] == [20]
    assert all("eval_bits_per_byte" in h and "eval_perplexity" in h for h in evals)
    assert all("eval_tiny_hellaswag_acc_norm" in h for h in evals)  # lm-eval ran at every evaluation
    final = json.loads((out / "eval_results.json").read_text())

    # toolkit eval on the same validation text, same window: the same bits per byte (the recipe drops the last
    # partial block, toolkit eval scores it too: well within 0.5%)
    code, stdout, err = run_main(evaluation, [str(out), "--text_file", str(valid), "--block_size", "32", "--json",
                                              "--no_progress"], capsys)
    assert code == 0, err
    plain = json.loads(stdout)["text"]
    assert plain["bits_per_byte"] == pytest.approx(final["eval_bits_per_byte"], rel=0.005)
    assert plain["loss"] == pytest.approx(final["eval_loss"], rel=0.005)

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.eval_results and card.data.eval_results[0].dataset_type == "tiny_hellaswag"
    for text in ("## Results", "eval_bits_per_byte", f"{final['eval_bits_per_byte']:.4g}",
                 "![training and validation loss](loss_curve.png)", "recipes/pretrain.py --preset gpt2-nano",
                 "--sample_max_new_tokens 8", "from_pretrained", "tokens seen in training"):
        assert text in card.text, text
    assert (out / "loss_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_eval_speed_benchmark_quick(tmp_path):
    """benchmarks/eval_speed.py end to end at a tiny size (figures are not checked: this machine is shared)."""
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    raw = importlib.import_module("eval_speed").main(["--quick", "--doc", str(tmp_path / "b.md"),
                                                      "--json", str(tmp_path / "r.json")])
    assert [r["tokens"] for r in raw] == [2000, 4000, 8000]
    assert all(r["eval_tokens_per_s"] > 0 and r["train_forward_tokens_per_s"] > 0 and r["peak_mb"] > 0 for r in raw)
    assert all(r["scored"] >= r["tokens"] * 0.9 for r in raw)  # --max_tokens honoured, windows' first tokens unscored
    assert "ratio (eval / forward)" in (tmp_path / "b.md").read_text()


def test_help_of_the_new_commands(capsys):
    """In this process, through the entry point's main() (its real process: tests/test_core.py)."""
    from toolkit import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--stride" in out and "--tasks" in out
    assert cli.main(["--help"]) == 0 and "generate" in capsys.readouterr().out


@needs_shared
def test_gpt2_tokenizer_byte_table_is_exact_on_shakespeare():
    from conftest import SHAKESPEARE
    from transformers import AutoTokenizer

    from toolkit.lm_metrics import ByteCounter

    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    assert ByteCounter(tokenizer).count(tokenizer(text).input_ids) == len(text.encode("utf-8"))
