"""Every line a recipe or command prints on a normal run is the toolkit's own (toolkit/third_party.py).

The main jobs run as the README types them, offline, in a fresh folder: `python recipes/pretrain.py`, then
`recipes/lora.py` and `recipes/qlora.py` on its output, `recipes/onefile_train.py`, and `toolkit generate / eval /
merge` on what they wrote (only the run length is shortened). A line is the toolkit's when it starts the way one of the
strings in toolkit/ or recipes/ starts; progress bars, the HF Trainer's log dicts and its metrics block are left out.

What a library prints while it is imported is printed by a new interpreter only, so pretrain.py, qlora.py and
onefile_train.py run in one each: between them they import every library the others do (lora.py is qlora.py without
the 4-bit load; generate, eval and merge load models, adapters and tokenizers through the same libraries). lora.py and
the commands start warm (tests/warm_start.py): what they print while running is checked the same way.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from conftest import PROGRESS_BAR, REPO, run_script, script_env

pytestmark = pytest.mark.slow

SIMULATED_AVX512_BF16 = Path(__file__).parent / "sim_avx512bf16"


def _leading_text(node: ast.AST) -> str | None:
    """What a string in our source starts with: its text up to the first {field}, or for a string that starts with
    a field, its longest piece of text (matched anywhere in the line then)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = [v.value if isinstance(v, ast.Constant) else None for v in node.values]
        if parts and parts[0] is not None:
            return parts[0]
        texts = [p for p in parts if p]
        return "\0" + max(texts, key=len) if texts else None  # \0: "found anywhere in the line"
    return None


@lru_cache(maxsize=1)
def our_texts() -> tuple[set[str], set[str]]:
    """(starts, inner): the leading texts of every string in toolkit/ and recipes/, one per line of the string."""
    starts, inner = set(), set()
    for path in [*REPO.glob("toolkit/**/*.py"), *REPO.glob("recipes/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = _leading_text(node)
            if not text:
                continue
            anywhere = text.startswith("\0")
            for line in text.lstrip("\0").split("\n"):
                line = line.strip()
                if len(line) >= 4:
                    (inner if anywhere else starts).add(line)
    return starts, inner


TRAINER_LINES = re.compile(r"^(\{'.*\}|\*{5} \w+ metrics \*{5}|\w+\s+=\s+\S.*)$")  # log dicts, log_metrics' block


def _starts_with_text(line: str, text: str) -> bool:
    """`line` starts with `text`, and not in the middle of a word ('warn' does not start 'warnings.warn(')."""
    return line.startswith(text) and not (len(line) > len(text) and text[-1].isalnum() and line[len(text)].isalnum())


def foreign_lines(output: str) -> list[str]:
    """The lines of `output` that are neither the toolkit's nor a progress bar or the Trainer's log output."""
    starts, inner = our_texts()
    foreign = []
    for part in re.split(r"[\r\n]", output.replace("\x1b[A", "")):
        line = PROGRESS_BAR.sub("", part).strip()
        if not line or line in ("[A",) or TRAINER_LINES.match(line):
            continue
        if any(_starts_with_text(line, s) for s in starts) or any(s in line for s in inner if len(s) >= 8):
            continue
        foreign.append(line)
    return foreign


def assert_all_ours(result: subprocess.CompletedProcess, what: str, stdout_too: bool = True) -> None:
    assert result.returncode == 0, f"{what} failed:\n{result.stderr[-3000:]}"
    output = (result.stdout if stdout_too else "") + "\n" + result.stderr
    foreign = foreign_lines(output)
    assert not foreign, f"{what} printed lines that are not the toolkit's:\n" + "\n".join(foreign[:20])


def test_the_line_check_tells_ours_from_theirs():
    """The classifier itself: lines from our sources pass, the third-party lines seen on fresh installs do not."""
    ours = ["Model saved to out/pretrain (model card: README.md)", "eval before: loss 8.2540  perplexity 3843.15",
            "{'loss': '8.3', 'epoch': '0.1'}", "  eval_loss               =     8.2725",
            "prepare store: 100%|██████████| 34.0/34.0 [00:00<00:00, 719B/s]"]
    theirs = ["Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
              "Hub is in offline mode.",
              "[transformers] We strongly recommend passing in an `attention_mask` since your input_ids may be "
              "padded.",
              "/x/transformers/modeling_utils.py:3314: FutureWarning: `is_gradient_checkpointing` is deprecated",
              "  warnings.warn("]
    assert foreign_lines("\n".join(ours)) == []
    assert foreign_lines("\n".join(theirs)) == [t.strip() for t in theirs]


@pytest.fixture(scope="module")
def main_jobs(tmp_path_factory):
    """The README's main job and the fine-tuning recipes after it, in a fresh folder: {name: CompletedProcess}."""
    cwd = tmp_path_factory.mktemp("main-jobs")
    short = ["--max_steps", "4"]
    few = ["--max_train_samples", "16", "--max_eval_samples", "4"]
    runs = {}
    for name, args in [("pretrain", [*short, "--eval_steps", "2"]), ("lora", [*short, *few]),
                       ("qlora", [*short, *few])]:
        runs[name] = run_script([str(REPO / "recipes" / f"{name}.py"), *args], cwd=cwd, fresh=name != "lora")
        assert runs[name].returncode == 0, f"{name} failed:\n{runs[name].stderr[-3000:]}"
    return cwd, runs


@pytest.mark.parametrize("recipe", ["pretrain", "lora", "qlora"])
def test_recipe_main_job_prints_only_our_lines(main_jobs, recipe):
    assert_all_ours(main_jobs[1][recipe], f"recipes/{recipe}.py")


def test_onefile_prints_only_our_lines(tmp_path):
    result = run_script([str(REPO / "recipes" / "onefile_train.py"), "--max_steps", "4"], cwd=tmp_path, fresh=True)
    # the closing sample is the model's text, lines and all: everything from "sample:" on is not a message
    result.stdout = result.stdout.split("\nsample:")[0]
    assert_all_ours(result, "recipes/onefile_train.py")


def test_commands_on_the_main_jobs_outputs_print_only_our_lines(main_jobs):
    cwd, _ = main_jobs
    (cwd / "valid.txt").write_text("The meaning of the function is explained below.\n", encoding="utf-8")
    generate = run_script(["-m", "toolkit", "generate", "out/pretrain", "--adapter", "out/qlora", "--prompt", "The",
                           "--max_new_tokens", "8"], cwd=cwd)
    assert_all_ours(generate, "toolkit generate", stdout_too=False)  # its stdout is the model's text
    for name, args in [("eval", ["out/pretrain", "--text_file", "valid.txt"]),
                       ("merge", ["--adapter", "out/qlora", "--output_dir", "out/merged"])]:
        assert_all_ours(run_script(["-m", "toolkit", name, *args], cwd=cwd), f"toolkit {name}")


BNB_4BIT_LOAD = """
import sys
import toolkit  # as every recipe does first
import torch
from transformers import BitsAndBytesConfig
from toolkit.model_loading import load_quantized_model
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
for _ in range(2):  # the line is said once per run
    load_quantized_model(sys.argv[1], config, torch.float32, {"": "cpu"})
"""


def test_missing_bitsandbytes_cpu_kernel_is_one_line_of_ours_without_a_network_call(tiny_model_dir):
    """On a CPU with AVX512-BF16 (simulated: bitsandbytes' check answers yes while its CPU backend imports)
    bitsandbytes asks the Hub for a kernel at import. Without the toolkit that prints two foreign lines; with it, a
    4-bit load prints one line of ours, once, and no request is made even when the Hub is "online" (at a closed
    port here, which would fail the lookup with a different message)."""
    import importlib.util

    ops = importlib.util.find_spec("bitsandbytes.backends.cpu.ops")
    if ops is None or "kernels-community" not in Path(ops.origin).read_text(encoding="utf-8"):
        pytest.skip("this bitsandbytes does not ask the Hub for a CPU kernel: nothing to gate")
    if importlib.util.find_spec("kernels") is None:  # not installed with transformers 5.23
        pytest.skip("the kernels package is not installed: bitsandbytes cannot fetch a Hub kernel, nothing to gate")
    online = {"PYTHONPATH": f"{SIMULATED_AVX512_BF16}:{REPO}", "HF_HUB_OFFLINE": "0",
              "HF_ENDPOINT": "http://127.0.0.1:9"}
    bare = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=script_env(
        {"PYTHONPATH": str(SIMULATED_AVX512_BF16), "HF_HUB_OFFLINE": "1"}), capture_output=True, text=True,
        timeout=300)
    assert "Skipping publisher trust check" in bare.stderr and "Failed to load CPU gemm_4bit_forward" in bare.stderr, \
        f"the simulation no longer reaches bitsandbytes' kernel lookup:\n{bare.stderr[-2000:]}"

    result = subprocess.run([sys.executable, "-c", BNB_4BIT_LOAD, str(tiny_model_dir)], env=script_env(online),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for part in re.split(r"[\r\n]", result.stderr)
             if (line := PROGRESS_BAR.sub("", part).strip())]
    assert len(lines) == 1 and lines[0].startswith("4-bit on this CPU:"), lines
    assert "kernels-community/quantization-bitsandbytes" in lines[0] and "get_kernel(" in lines[0]
