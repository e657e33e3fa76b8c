"""Documented `toolkit` command flags and errors that no other test runs: prepare and eval on a local dataset by
name, configuration and split; eval's --limit and --num_fewshot on a local lm-eval task; generate's --dtype;
merge's refusals; push's answers to a Hub that refuses (401, 403, 500) from tests/hub_server.py.

Only public entry points: `toolkit.cli.main` in this process, `python -m toolkit` where the Hub address must be set
before huggingface_hub is imported."""

from __future__ import annotations

import json

import pytest
from conftest import embedded_texts, one_error_line, require_dev, run_script
from hub_server import HubServer

from toolkit.cli import main as toolkit_main


def toolkit(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `toolkit ARGV` run in this process."""
    capsys.readouterr()
    try:
        code = toolkit_main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def _no_loading_bars():
    """transformers draws a 'Loading weights' bar on stderr; the error-line checks want the command's own lines."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------ local dataset


def dataset_folder(root):
    """A datasets dataset without a script: two configurations declared in README.md, each with its own splits; the
    text in a column named `content`."""
    folder = root / "corpus"
    texts = embedded_texts(24)
    splits = {("small", "train"): texts[:8], ("small", "validation"): texts[8:11], ("large", "train"): texts[11:]}
    for (config, split), rows in splits.items():
        (folder / config).mkdir(parents=True, exist_ok=True)
        (folder / config / f"{split}.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in rows),
                                                        encoding="utf-8")
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: small\n  data_files:\n  - split: train\n    path: small/train.jsonl\n"
        "  - split: validation\n    path: small/validation.jsonl\n"
        "- config_name: large\n  data_files:\n  - split: train\n    path: large/train.jsonl\n---\n", encoding="utf-8")
    return folder, splits


def test_prepare_and_eval_read_a_local_dataset_by_name_config_and_split(tmp_path, tiny_model_dir, capsys):
    """`--dataset_name FOLDER --dataset_config_name small --dataset_split validation --text_column content`: exactly
    that split's documents, for `toolkit prepare` (its tokens + one EOS each in the store) and `toolkit eval` (the same
    scores as the same rows given as a file)."""
    from transformers import AutoTokenizer

    folder, splits = dataset_folder(tmp_path)
    chosen = ["--dataset_name", str(folder), "--dataset_config_name", "small", "--dataset_split", "validation",
              "--text_column", "content"]
    store = tmp_path / "store"
    code, _, err = toolkit(["prepare", *chosen, "--tokenizer_name", str(tiny_model_dir), "--output_dir", str(store),
                            "--validation_fraction", "0", "--num_proc", "1", "--no_progress"], capsys)
    assert code == 0, err[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = sum(len(tokenizer(t).input_ids) + 1 for t in splits["small", "validation"])
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] == expected, manifest["splits"]

    scored = {}
    for name, source in (("dataset", chosen),
                         ("file", ["--text_file", str(folder / "small" / "validation.jsonl"), "--text_column",
                                   "content"])):
        code, out, err = toolkit(["eval", str(tiny_model_dir), *source, "--json", "--no_progress"], capsys)
        assert code == 0, err[-2000:]
        scored[name] = {k: v for k, v in json.loads(out)["text"].items() if k != "source"}
    assert scored["dataset"] == scored["file"] and scored["file"]["tokens"] > 256, scored
    # --max_tokens: only the first 256 tokens, in windows of 32 moved on by 16 (on the CPU, in float32)
    code, out, err = toolkit(["eval", str(tiny_model_dir), *chosen, "--max_tokens", "256", "--block_size", "32",
                              "--stride", "16", "--device", "cpu", "--dtype", "float32", "--json", "--no_progress"],
                             capsys)
    assert code == 0, err[-2000:]
    windowed = json.loads(out)["text"]
    assert windowed["tokens"] <= 256 and (windowed["block_size"], windowed["stride"]) == (32, 16), windowed
    assert windowed["windows"] > windowed["tokens"] // 32  # overlapping windows


# ------------------------------------------------------------------------------------------------ lm-eval


def test_eval_limit_and_num_fewshot_on_a_local_task(tiny_model_dir, tmp_path, capsys):
    """`--limit 2` scores the first 2 documents only (the third, which the model gets wrong, is left out: accuracy
    1.0); `--num_fewshot 1` puts one solved example before each question (the harness reports 1 shot)."""
    require_dev("lm_eval")
    from test_generate_eval import favour_token, hellaswag_rows, hellaswag_task

    rows = hellaswag_rows(right_is_favoured=True)
    rows[2]["label"] = str((int(rows[2]["label"]) + 1) % 4)  # the model's favourite ending is wrong here
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    hellaswag_task(tasks, "tiny_hellaswag", rows)
    model = tmp_path / "favours-the"
    favour_token(tiny_model_dir, model, " the")
    base = [str(model), "--tasks", "tiny_hellaswag", "--include_path", str(tasks), "--json"]
    code, out, err = toolkit(["eval", *base, "--limit", "2", "--num_fewshot", "1"], capsys)
    assert code == 0, err[-2000:]
    report = json.loads(out)
    assert report["tasks"]["tiny_hellaswag"]["acc"] == 1.0, report
    assert report["lm_eval"]["n-shot"]["tiny_hellaswag"] == 1 and report["lm_eval"]["limit"] == 2, report["lm_eval"]
    code, out, err = toolkit(["eval", *base], capsys)  # the control: all three documents
    assert code == 0, err[-2000:]
    assert json.loads(out)["tasks"]["tiny_hellaswag"]["acc"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------ generate


def test_generate_top_p_and_dtype(tiny_model_dir, capsys):
    """`--top_p` keeps the smallest set of tokens holding that much probability: a tiny top_p leaves only the most
    likely token, so sampling at temperature 1 gives the greedy text; `--dtype bfloat16` loads the model in bf16 on
    `--device cpu`, and `--num_samples 2` writes two samples."""
    prompt = ["generate", str(tiny_model_dir), "--prompt", "The", "--max_new_tokens", "8"]
    code, greedy, err = toolkit([*prompt, "--temperature", "0"], capsys)
    assert code == 0, err[-2000:]
    code, nucleus, err = toolkit([*prompt, "--temperature", "1", "--top_k", "0", "--top_p", "1e-6", "--seed", "3"],
                                 capsys)
    assert code == 0 and nucleus == greedy, (nucleus, greedy, err[-2000:])
    code, out, err = toolkit([*prompt, "--temperature", "0", "--dtype", "bfloat16", "--device", "cpu",
                              "--num_samples", "2"], capsys)
    assert code == 0, err[-2000:]
    assert "bfloat16, cpu)" in err, err
    samples = out.split("--- sample ")[1:]  # --num_samples 2: two samples, each under its header
    assert [s.split(" ---")[0] for s in samples] == ["1/2", "2/2"], out
    assert all(s.split("---\n", 1)[1].startswith("The") for s in samples), out


# ------------------------------------------------------------------------------------------------ merge refusals


def test_merge_refusals_are_one_line_naming_the_fix(tmp_path, capsys):
    """An output folder that holds a model, an adapter that is not LoRA, an adapter without a recorded base: one
    line each, exit 2, before any model is loaded."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    cases = [({"peft_type": "LORA", "base_model_name_or_path": "x"}, taken,
              ["already holds a model", "--overwrite_output_dir"]),
             ({"peft_type": "IA3", "base_model_name_or_path": "x"}, tmp_path / "m1",
              ["is a IA3 adapter", "LoRA adapters only"]),
             ({"peft_type": "LORA"}, tmp_path / "m2", ["does not record its base model", "--base_model_name_or_path"])]
    for config, output_dir, needles in cases:
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        code, _, err = toolkit(["merge", "--adapter", str(adapter), "--output_dir", str(output_dir)], capsys)
        assert code == 2
        line = one_error_line(err)
        assert all(needle in line for needle in needles), line
    assert (taken / "config.json").read_text() == "{}" and not (tmp_path / "m1").exists()


# ------------------------------------------------------------------------------------------------ push refusals


@pytest.mark.parametrize("status,needles", [
    (401, ["the Hub refused the token (401)", "hf auth login", "HF_TOKEN"]),
    (403, ["no write access to 'someone/model' (403)", "a namespace you own"]),
    (500, ["the Hub refused the upload to 'someone/model' (500)"]),
])
def test_push_when_the_hub_refuses_is_one_line(status, needles, tmp_path):
    token = f"hf_Refused{status}Token0123456789"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with HubServer(reject_tokens={token: status}) as hub:
        result = run_script(["-m", "toolkit", "push", str(folder), "someone/model"], timeout=120,
                            env={"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
                                 "HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "127.0.0.1,localhost"})
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_error_line(result.stderr)
    assert all(needle in line for needle in needles), line
    assert token not in result.stdout + result.stderr
    assert hub.requests and not hub.repos  # it reached the Hub, which created nothing


@pytest.fixture(scope="module")
def hub_session(tmp_path_factory, tiny_model_dir):
    """One fresh process (huggingface_hub reads the Hub's address at import) against tests/hub_server.py: `toolkit
    push` of an adapter into a private repo with --token, then `toolkit generate` / `toolkit eval` of it from there,
    with and without the token, and `toolkit merge --push_to_hub`. (hub, {call: [exit code, stdout, stderr]},
    folder of the run)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp_path = tmp_path_factory.mktemp("hub-session")
    valid = tmp_path / "valid.txt"
    valid.write_text(" ".join(embedded_texts(2)), encoding="utf-8")
    adapter = tmp_path / "adapter"
    lora = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                      init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(adapter)
    greedy = ["--prompt", "The", "--max_new_tokens", "6", "--temperature", "0"]
    calls = {
        "push": ["push", str(adapter), "someone/adapter", "--token", OWNER, "--private", "--commit_message",
                 "first adapter"],
        "merge": ["merge", "--adapter", str(adapter), "--output_dir", str(tmp_path / "merged"), "--token", OWNER,
                  "--push_to_hub", "--hub_model_id", "someone/merged"],
        # before any download: a later tokenless call may read the copy in the Hub cache, as huggingface_hub allows
        "eval_without_token": ["eval", "--adapter", "someone/adapter", "--text_file", str(valid), "--no_progress"],
        "generate": ["generate", "--adapter", "someone/adapter", "--token", OWNER, *greedy],
        "generate_local": ["generate", "--adapter", str(adapter), *greedy],
        "eval": ["eval", "--adapter", "someone/adapter", "--token", OWNER, "--text_file", str(valid), "--json",
                 "--no_progress"],
    }
    script = f"""
import contextlib, io, json
from toolkit.cli import main
results = {{}}
for name, argv in json.loads({json.dumps(json.dumps(calls))}).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_info:
            code = exit_info.code
    results[name] = [code, out.getvalue(), err.getvalue()]
print("RESULTS " + json.dumps(results))
"""
    with HubServer() as hub:
        result = run_script(["-c", script], timeout=240,
                            env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
                                 "NO_PROXY": "127.0.0.1,localhost", "HF_HUB_DISABLE_TELEMETRY": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert OWNER not in result.stdout + result.stderr  # the token is never printed
    return hub, json.loads(result.stdout.split("RESULTS ", 1)[1]), tmp_path


OWNER = "hf_OwnerToken0123456789"


@pytest.mark.slow
def test_push_with_a_token_to_a_private_repo_and_merge_push_to_hub(hub_session):
    """`toolkit push --token T --private --commit_message M`: a private repo with that commit; `toolkit merge
    --push_to_hub --hub_model_id`: the merged model, as written locally, is on the Hub."""
    hub, results, folder = hub_session
    for name in ("push", "merge"):
        assert results[name][0] == 0, (name, results[name][2][-2000:])
    repo = hub.repos["someone/adapter"]
    assert repo.private and repo.commits[-1]["summary"] == "first adapter", repo.commits
    assert repo.owner_auth == f"Bearer {OWNER}"  # created with --token
    assert "adapter_model.safetensors" in repo.files
    merged = hub.repos["someone/merged"].files
    assert merged["model.safetensors"] == (folder / "merged" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_generate_and_eval_load_a_private_hub_adapter_with_the_token(hub_session):
    """`toolkit generate --adapter user/name --token T` generates what the same adapter does locally; `toolkit eval`
    scores with it; without the token the private repo is not found (one line, exit 2)."""
    _, results, _ = hub_session
    for name in ("generate", "generate_local", "eval"):
        assert results[name][0] == 0, (name, results[name][2][-2000:])
    assert results["generate"][1] == results["generate_local"][1]
    assert json.loads(results["eval"][1])["text"]["tokens"] > 0
    assert results["eval_without_token"][0] == 2, results["eval_without_token"]


# ------------------------------------------------------------------------------------------------ plan


def plan_json(argv, capsys) -> dict:
    code, out, err = toolkit(["plan", "--model", "gpt2", "--device", "cuda", "--num_devices", "2", "--device_memory",
                              "80GB", "--batch_size", "4", "--seq_len", "512", "--json", *argv], capsys)
    assert code == 0, err
    return json.loads(out)


def single(plan: dict) -> dict:
    """The memory per device of the first strategy planned (one process, or DDP where only that is planned)."""
    return plan["strategies"][0]["components_bytes"]


def test_plan_options_change_the_plan_as_documented(capsys):
    base = plan_json([], capsys)
    assert single(plan_json(["--optimizer", "sgd"], capsys))["optimizer"] < single(base)["optimizer"]
    assert single(plan_json(["--attn", "eager"], capsys))["activations"] > single(base)["activations"]
    assert (single(plan_json(["--precision", "fp32"], capsys))["activations"]
            > single(plan_json(["--precision", "bf16"], capsys))["activations"])
    forced = plan_json(["--strategy", "fsdp"], capsys)["recommendation"]
    assert "fsdp" in forced["command"], forced
    assert "--gradient_accumulation_steps 4" in plan_json(["--grad_accum", "4"], capsys)["recommendation"]["command"]
    lora = ["--task", "lora", "--lora_r", "8"]
    assert (single(plan_json([*lora, "--lora_targets", "attention"], capsys))["optimizer"]
            < single(plan_json([*lora, "--lora_targets", "all"], capsys))["optimizer"])
    assert (single(plan_json(["--task", "qlora", "--no_double_quant"], capsys))["quantization"]
            > single(plan_json(["--task", "qlora"], capsys))["quantization"])
    assert (single(plan_json([*lora, "--lora_dropout", "0.1"], capsys))["activations"]
            > single(plan_json([*lora, "--lora_dropout", "0"], capsys))["activations"])
    assert single(plan_json(["--gradient_checkpointing"], capsys))["activations"] < single(base)["activations"]
    assert (single(plan_json(["--config_overrides", "n_layer=24"], capsys))["parameters"]
            > single(base)["parameters"])
    assert single(plan_json(["--vocab_size", "4096"], capsys))["parameters"] < single(base)["parameters"]
    shape = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--seq_len", "64"]
    assert (single(plan_json([*shape, "--n_positions", "2048"], capsys))["parameters"]
            > single(plan_json([*shape, "--n_positions", "128"], capsys))["parameters"])
    assert (single(plan_json([*lora, "--token_metrics"], capsys))
            != single(plan_json(lora, capsys)))
    # DDP's all-reduce over a 1 GB/s link instead of the default NVLink: fewer tokens/s (an A10G's peak FLOP/s)
    speed = {bandwidth: plan_json(["--gpu", "A10G", *bandwidth], capsys)["recommendation"]["throughput"]
             for bandwidth in ((), ("--bandwidth", "1"))}
    assert 0 < speed[("--bandwidth", "1")]["tokens_per_s"] < speed[()]["tokens_per_s"], speed


# ------------------------------------------------------------------------------------------------ presets


def test_presets_count_the_parameters_for_the_vocabulary_given(capsys):
    """`toolkit presets --vocab_size 4096`: each preset's count is the real model's at that vocabulary (4,096 is a
    multiple of 64: no padding rows)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    code, out, err = toolkit(["presets", "--vocab_size", "4096"], capsys)
    assert code == 0, err
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["gpt2-nano"])
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=256, vocab_size=4096))
    assert int(row[-1].replace(",", "")) == model.num_parameters(), row
