"""Model cards (README.md) as the Hub expects them: YAML metadata, then what was trained, how, how well, and how to
load it. `write_model_card` is the adapter's (recipes/lora.py, qlora.py); `write_pretrained_model_card` is
recipes/pretrain.py's (architecture, tokenizer, data and tokens seen, hyperparameters, eval loss / perplexity /
bits per byte, benchmark scores, the loss curve).

The card's YAML metadata is what the Hub indexes. `base_model` must be a Hub model id: a local path
there makes the Hub reject the upload (transformers#33922), so a base loaded from a folder is named
in the text only, or by --base_model_hub_id when the user says which Hub model it is.
"""

from __future__ import annotations

import os
import re
import shlex

_MODEL_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")
_SECRET_WORDS = ("token", "password", "secret")  # a flag is secret when one of its _-separated words is one of these


def is_hub_model_id(value: object) -> bool:
    """'gpt2' or 'user/name', and not something that exists as a local path."""
    return (
        isinstance(value, str) and bool(_MODEL_ID.match(value)) and ".." not in value and not os.path.exists(value)
    )


def card_base_model(model_name_or_path: str, base_model_hub_id: str | None = None) -> str | None:
    if base_model_hub_id:
        return base_model_hub_id
    return model_name_or_path if is_hub_model_id(model_name_or_path) else None


def hub_adapter_config(folder: str) -> bytes | None:
    """adapter_config.json as it should be pushed: peft records the base's local path, which nobody else can load;
    the pushed copy names the card's Hub `base_model` instead (the folder keeps the local path, which `toolkit
    merge` and `toolkit generate` use). None when there is nothing to change."""
    import json

    config_path, card_path = os.path.join(folder, "adapter_config.json"), os.path.join(folder, "README.md")
    if not (os.path.isfile(config_path) and os.path.isfile(card_path)):
        return None
    from huggingface_hub import ModelCard

    base = ModelCard.load(card_path).data.get("base_model")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    recorded = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not is_hub_model_id(base) or not recorded or is_hub_model_id(recorded):
        return None
    config["base_model_name_or_path"] = base
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def reproduce_command(script: str, argv: list[str]) -> str:
    """The exact command line, with the value of any --token / --hub_token / --*_password flag replaced (never write a
    token); --sample_max_new_tokens is no secret."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("<redacted>")
            hide_next = False
            continue
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and any(word in _SECRET_WORDS
                                         for word in flag[2:].lower().replace("-", "_").split("_")):
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
                     hyperparameters: dict, metrics: dict, sample: dict | None, command: str,
                     adapter_hub_id: str | None = None) -> str:
    """Write OUTPUT_DIR/README.md and return its path. `adapter_hub_id`: the repo the adapter is pushed to, which the
    usage snippet then loads from."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = card_base_model(base_model, base_model_hub_id)
    tags = (["peft", "lora", "gpt2", "trl", "sft", "gpt2-toolkit"]
            + (["qlora", "bitsandbytes"] if "QLoRA" in method else []))
    data = ModelCardData(
        base_model=hub_base,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[dataset_hub_id] if dataset_hub_id and is_hub_model_id(dataset_hub_id) else None,
    )
    base_line = (f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base
                 else f"a local model folder (`{base_model}`)")
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {title}", "",
        f"A {method} adapter for {base_line}, trained with `gpt2-toolkit` (trl SFTTrainer + peft).",
    ]
    if not hub_base:
        lines += ["", "The base model was loaded from a local folder, so the card names no Hub `base_model`; "
                  "load the adapter onto the same weights (pass `--base_model_hub_id` when training to record a "
                  "Hub id)."]
    lines += [
        "", "## Data", "",
        f"- source: `{data_source}`",
        f"- format: {data_format}" + (" (loss on the completion only)" if data_format == "prompt-completion" else ""),
        "", "## Hyperparameters", "", "| name | value |", "| --- | --- |",
    ]
    lines += [f"| {k} | {_fmt(getattr(v, 'value', v))} |" for k, v in hyperparameters.items()]  # enums by value
    lines += ["", "## Results", "", "Held-out eval loss and perplexity, before and after fine-tuning:", "",
              "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    if sample:
        lines += ["", "## Sample (greedy)", "", "Prompt:", "", "```text", sample["prompt"], "```", "",
                  "Continuation:", "", "```text", sample["completion"], "```"]
    load_id = adapter_hub_id or "path/to/this/adapter"
    if hub_base:  # peft finds the base in adapter_config.json, which a push makes name the Hub repo
        use = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
               f"model = AutoPeftModelForCausalLM.from_pretrained({load_id!r})  # base: {hub_base}"]
    else:
        use = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
               f"base = AutoModelForCausalLM.from_pretrained({base_model!r})",
               f"model = PeftModel.from_pretrained(base, {load_id!r})"]
    lines += [
        "", "## Use", "", "```python", *use,
        f"tokenizer = AutoTokenizer.from_pretrained({load_id!r})",
        "```", "",
        "Merge it into the base (full precision, also for a QLoRA adapter): "
        "`toolkit merge --adapter path/to/this/adapter --output_dir merged`.",
        "", "## Reproduce", "", "```bash", command, "```", "",
    ]
    path = os.path.join(output_dir, "README.md")
    ModelCard("\n".join(lines)).save(path)
    return path


def _benchmark_results(model_name: str, benchmarks: dict[str, dict[str, float]]):
    """model-index entries (the Hub's evaluation-results metadata) for lm-evaluation-harness scores."""
    from huggingface_hub import EvalResult

    results = []
    for task, row in benchmarks.items():
        for metric, value in row.items():
            if not metric.endswith("_stderr"):
                results.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                          metric_type=metric, metric_value=round(float(value), 4),
                                          source_name="lm-evaluation-harness",
                                          source_url="https://github.com/EleutherAI/lm-evaluation-harness"))
    return results or None


def write_pretrained_model_card(output_dir: str, *, title: str, architecture: dict, n_params: int, tokenizer: str,
                                data: dict, hyperparameters: dict, metrics: dict, benchmarks: dict | None,
                                command: str, base_model: str | None = None, dataset_hub_id: str | None = None,
                                sample: str | None = None,
                                repo_id: str | None = None, loss_curve: str | None = "loss_curve.png") -> str:
    """Write OUTPUT_DIR/README.md for a model trained by recipes/pretrain.py and return its path.

    `metrics`: final eval_loss / eval_perplexity / eval_bits_per_byte; `benchmarks`: {task: {metric: value}} from
    lm-eval; `data`: rows for the data section (source, tokens seen, ...).
    """
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = card_base_model(base_model) if base_model else None
    name = repo_id.split("/")[-1] if repo_id else os.path.basename(os.path.abspath(output_dir))
    card = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gpt2", "text-generation", "pretraining", "gpt2-toolkit"],
        base_model=hub_base,
        datasets=[dataset_hub_id] if dataset_hub_id and is_hub_model_id(dataset_hub_id) else None,
        model_name=name if benchmarks else None,
        eval_results=_benchmark_results(name, benchmarks or {}),
    )
    shape = ", ".join(f"{k}={v}" for k, v in architecture.items())
    start = f"continued from [{hub_base}](https://huggingface.co/{hub_base})" if hub_base else (
        f"continued from a local model (`{base_model}`)" if base_model else "trained from scratch")
    lines = [
        "---", card.to_yaml(), "---", "",
        f"# {title}", "",
        (f"A GPT-2 language model ({n_params:,} parameters; {shape}), {start} with `gpt2-toolkit` "
         "(transformers Trainer, recipes/pretrain.py)."),
        "", "## Tokenizer", "", tokenizer,
        "", "## Data", "",
    ]
    lines += [f"- {k}: {_fmt(v) if not isinstance(v, int) else f'{v:,}'}" for k, v in data.items()]
    lines += ["", "## Hyperparameters", "", "| name | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in hyperparameters.items()]
    lines += ["", "## Results", "", ("Final evaluation on the held-out validation data (bits per byte = total loss / "
                                     "(ln 2 x UTF-8 bytes of the scored text), comparable across tokenizers):"), "",
              "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    if benchmarks:
        lines += ["", ("Benchmarks (lm-evaluation-harness, run during training; `--eval_tasks_limit` may have "
                       "limited them to part of each task):"), "", "| task | metric | value |", "| --- | --- | --- |"]
        lines += [f"| {task} | {metric} | {value:.4f} |"
                  for task, row in benchmarks.items() for metric, value in row.items()
                  if not metric.endswith("_stderr")]
    if loss_curve and os.path.isfile(os.path.join(output_dir, loss_curve)):
        lines += ["", "## Loss curve", "", f"![training and validation loss]({loss_curve})"]
    if sample:
        lines += ["", "## Sample (top-k 50)", "", "```text", sample, "```"]
    load_id = repo_id or "path/to/this/model"
    lines += [
        "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({load_id!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({load_id!r})",
        'ids = tokenizer("The", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=True, top_k=50)[0]))",
        "```", "",
        "With gpt2-toolkit: `toolkit generate " + load_id + " --prompt \"The\"`, "
        "`toolkit eval " + load_id + " --text_file valid.txt` (loss, perplexity, bits per byte), "
        "`toolkit eval " + load_id + " --tasks hellaswag` (benchmarks).",
        "", "## Reproduce", "", "```bash", command, "```", "",
    ]
    path = os.path.join(output_dir, "README.md")
    ModelCard("\n".join(lines)).save(path)
    return path


def write_pretrain_card(args, model_args, data_args, config, tokenizer, n_params: int, steps: int,
                        tokens_per_step: int, metrics: dict, benchmark, sample: str, push_to_hub: bool) -> str:
    """OUTPUT_DIR/README.md for a recipes/pretrain.py run: the facts of the run, as write_pretrained_model_card
    takes them."""
    import sys


    if model_args.tokenizer_name:
        tokenizer_note = f"`{model_args.tokenizer_name}` ({len(tokenizer):,} tokens)."
    elif model_args.model_name_or_path:
        tokenizer_note = f"The tokenizer of `{model_args.model_name_or_path}` ({len(tokenizer):,} tokens)."
    else:
        tokenizer_note = (f"A byte-level BPE with {len(tokenizer):,} tokens (EOS `{tokenizer.eos_token}` ends every "
                          "document), trained on the training text by this run; saved in this folder.")
    if data_args.dataset_name:
        source = f"{data_args.dataset_name}" + (f" ({data_args.dataset_config_name})"
                                                if data_args.dataset_config_name else "")
        source += ", streamed" if data_args.streaming else ""
    else:
        source = data_args.train_file or "the embedded corpus (Python's documentation topics)"
    validation = (data_args.validation_file or (f"the first {data_args.streaming_eval_blocks} blocks of the stream"
                  if data_args.streaming
                  else f"the last {data_args.validation_split_percentage}% of the training blocks"))
    data = {"training data": source, "validation data": validation, "tokens seen in training": steps * tokens_per_step,
            "sequence length (block_size)": data_args.block_size,
            "packing": "documents joined with EOS between them, cut into blocks"}
    hyperparameters = {
        "optimizer steps": steps, "tokens per step": tokens_per_step, "processes": args.world_size,
        "peak learning rate": args.learning_rate, "schedule": args.lr_scheduler_type,
        "warmup_steps": args.warmup_steps,
        "optimizer": ("Muon (hidden matrices) + AdamW" if getattr(args, "muon", False)
                      else str(getattr(args.optim, "value", args.optim))),
        "weight_decay": args.weight_decay, "adam betas": (args.adam_beta1, args.adam_beta2),
        "max_grad_norm": args.max_grad_norm,
        "precision": "bf16 mixed" if args.bf16 else "fp32", "dropout": config.resid_pdrop, "seed": args.seed,
    }
    keys = ("eval_loss", "eval_perplexity", "eval_bits_per_byte")
    shape = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}
    return write_pretrained_model_card(
        args.output_dir,
        title=os.path.basename(os.path.abspath(args.output_dir)) if not push_to_hub else args.hub_model_id,
        architecture=shape, n_params=n_params, tokenizer=tokenizer_note, data=data, hyperparameters=hyperparameters,
        metrics={k: metrics[k] for k in keys if k in metrics}, benchmarks=benchmark.last if benchmark else None,
        command=reproduce_command("recipes/pretrain.py", sys.argv[1:]), base_model=model_args.model_name_or_path,
        dataset_hub_id=data_args.dataset_name, sample=sample, repo_id=args.hub_model_id if push_to_hub else None)


def write_merged_model_card(output_dir: str, *, adapter: str, base_model: str, dtype: str,
                            check: dict | None) -> str:
    """OUTPUT_DIR/README.md for `toolkit merge`: what was merged, and the merge check's figure (or that it was
    skipped)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = card_base_model(base_model)
    data = ModelCardData(base_model=hub_base, library_name="transformers", pipeline_tag="text-generation",
                         tags=["gpt2", "merge", "lora", "gpt2-toolkit"])
    if check:
        check_line = (f"Merge check: on {check['tokens']} tokens of built-in sample text the merged model's logits "
                      f"differ from base + adapter by {check['relative_logit_difference']:.3g} (max, relative to the "
                      f"largest logit; tolerance {check['tolerance']:g} for {dtype}); loss "
                      f"{check['loss_merged']:.4f} merged vs {check['loss_base_plus_adapter']:.4f} base + adapter.")
    else:
        check_line = "Merge check: skipped (`--no_verify`); the merged logits were not compared with base + adapter."
    lines = ["---", data.to_yaml(), "---", "", f"# {os.path.basename(os.path.abspath(output_dir))}", "",
             f"The LoRA adapter `{adapter}` merged into `{base_model}` ({dtype}) with `toolkit merge` (gpt2-toolkit); "
             "a plain transformers model, loadable without peft.", "", check_line, ""]
    path = os.path.join(output_dir, "README.md")
    ModelCard("\n".join(lines)).save(path)
    return path
