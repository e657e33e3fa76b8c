"""The adapter's model card (README.md): base, data, hyperparameters, metrics, sample, the command.

The card's YAML metadata is what the Hub indexes. `base_model` must be a Hub model id: a local path
there makes the Hub reject the upload (transformers#33922), so a base loaded from a folder is named
in the text only, or by --base_model_hub_id when the user says which Hub model it is.
"""

from __future__ import annotations

import os
import re
import shlex

_MODEL_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")
_SECRET_FLAGS = ("token", "password", "secret")


def is_hub_model_id(value: object) -> bool:
    """'gpt2' or 'user/name', and not something that exists as a local path."""
    return (
        isinstance(value, str) and bool(_MODEL_ID.match(value)) and ".." not in value and not os.path.exists(value)
    )


def card_base_model(model_name_or_path: str, base_model_hub_id: str | None = None) -> str | None:
    if base_model_hub_id:
        return base_model_hub_id
    return model_name_or_path if is_hub_model_id(model_name_or_path) else None


def reproduce_command(script: str, argv: list[str]) -> str:
    """The exact command line, with the value of any --*token* flag replaced (never write a token)."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("<redacted>")
            hide_next = False
            continue
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and any(s in flag.lower() for s in _SECRET_FLAGS):
            if "=" in arg:
                out.append(f"{flag}=<redacted>")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return " ".join(shlex.quote(a) for a in ["python", script, *out])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def write_model_card(output_dir: str, *, title: str, base_model: str, base_model_hub_id: str | None,
                     method: str, data_source: str, data_format: str, dataset_hub_id: str | None,
                     hyperparameters: dict, metrics: dict, sample: dict | None, command: str) -> str:
    """Write OUTPUT_DIR/README.md and return its path."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = card_base_model(base_model, base_model_hub_id)
    tags = ["peft", "lora", "gpt2", "trl", "sft", "gpt2-toolkit"] + (["qlora", "bitsandbytes"] if "QLoRA" in method else [])
    data = ModelCardData(
        base_model=hub_base,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[dataset_hub_id] if dataset_hub_id and is_hub_model_id(dataset_hub_id) else None,
    )
    base_line = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else f"a local model folder (`{base_model}`)"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {title}", "",
        f"A {method} adapter for {base_line}, trained with `gpt2-toolkit` (trl SFTTrainer + peft).",
    ]
    if not hub_base:
        lines += ["", "The base model was loaded from a local folder, so the card names no Hub `base_model`; "
                  "load the adapter onto the same weights (pass `--base_model_hub_id` when training to record a Hub id)."]
    lines += [
        "", "## Data", "",
        f"- source: `{data_source}`",
        f"- format: {data_format}" + (" (loss on the completion only)" if data_format == "prompt-completion" else ""),
        "", "## Hyperparameters", "", "| name | value |", "| --- | --- |",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in hyperparameters.items()]
    lines += ["", "## Results", "", "Held-out eval loss and perplexity, before and after fine-tuning:", "",
              "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    if sample:
        lines += ["", "## Sample (greedy)", "", "Prompt:", "", "```text", sample["prompt"], "```", "",
                  "Continuation:", "", "```text", sample["completion"], "```"]
    load_id = "path/to/this/adapter"
    lines += [
        "", "## Use", "", "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({(hub_base or base_model)!r})",
        f"model = PeftModel.from_pretrained(base, {load_id!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({load_id!r})",
        "```", "",
        "Merge it into the base (full precision, also for a QLoRA adapter): "
        "`toolkit merge --adapter path/to/this/adapter --output_dir merged`.",
        "", "## Reproduce", "", "```bash", command, "```", "",
    ]
    path = os.path.join(output_dir, "README.md")
    ModelCard("\n".join(lines)).save(path)
    return path
