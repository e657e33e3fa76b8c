"""Fine-tuning data: load it, tell its format, hold out an eval split, and give GPT-2 a chat template.

Three formats, told apart by their columns exactly as trl's SFTTrainer tells them apart (trl does the
tokenizing, EOS, completion masks and packing; this module only gets the data to it):

  text                 a "text" column (or --dataset_text_field): language modelling on every token.
                       A .txt file is split into examples by paragraph (blank lines) by default.
  prompt + completion  "prompt" and "completion" columns: loss on the completion only.
  messages             a "messages" column of {"role", "content"} turns (or ShareGPT "conversations"):
                       rendered with the tokenizer's chat template.

Files are read with `datasets` builders named by the file-type table of toolkit/data/files.py: trl takes whole
rows (prompt/completion/messages), and a .txt file splits into examples (--text_sample_by).

trl appends EOS to every text / completion; chat examples get it from the template below, which
ends every assistant turn with EOS. Without it a chat-tuned GPT-2 never learns to stop (open-r1#604).
"""

from __future__ import annotations

import os

from toolkit.data.files import FILE_TYPES
from toolkit.errors import UserError

# GPT-2 ships no chat template. This one is plain text ("User: ...\nAssistant: ...") so the base
# model's knowledge of English carries over, and EOS closes each assistant turn so generation stops
# there. The {% generation %} markers let trl's --assistant_only_loss mask everything else.
# "Assistant:" (with add_generation_prompt) is a token-prefix of "Assistant: <reply>", so prompt +
# completion tokenizes consistently (GPT-2's pre-tokenizer splits ":" from " reply").
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- 'Assistant:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}"
    "{%- elif messages and messages[-1]['role'] != 'assistant' %}{{- eos_token }}{%- endif %}"
)

FORMATS = ("text", "prompt-completion", "messages")


EMBEDDED_CORPUS = "the embedded Python documentation corpus"


def data_source(args) -> str:
    """A short description for logs and the model card."""
    if args.dataset_name:
        return args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")
    return os.path.basename(args.train_file) if args.train_file else EMBEDDED_CORPUS


def _load(args):
    from datasets import Dataset, DatasetDict, load_dataset

    if args.dataset_name and args.train_file:
        raise UserError("both --dataset_name and --train_file were given; pass one data source")
    if not args.dataset_name and not args.train_file:
        from toolkit.data.corpus import embedded_documents

        if args.validation_file:
            raise UserError("--validation_file goes with --train_file; pass the training data too")
        print(f"data: no --train_file or --dataset_name given: fine-tuning on {EMBEDDED_CORPUS} (plain text)")
        return DatasetDict({"train": Dataset.from_dict({"text": embedded_documents()})})
    if args.train_file:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        exts = set()
        for split, path in files.items():
            if not os.path.isfile(path):
                raise UserError(f"--{'train' if split == 'train' else 'validation'}_file '{path}' does not exist; "
                                "pass an existing file")
            exts.add(os.path.splitext(path)[1].lower())
        builders = {FILE_TYPES.get(ext) for ext in exts}
        if None in builders or len(builders) != 1:
            raise UserError(
                f"cannot read {' and '.join(sorted(exts))} files; use .txt (plain text), .jsonl/.json, .csv or "
                f".parquet, the same kind for --train_file and --validation_file"
            )
        builder = builders.pop()
        kwargs = {"sample_by": args.text_sample_by} if builder == "text" else {}
        try:
            return load_dataset(builder, data_files=files, **kwargs)
        except Exception as err:  # datasets raises many types for unreadable files
            raise UserError(f"could not read {args.train_file} as {builder} ({type(err).__name__}: {err}); "
                            "check the file format") from None
    try:
        data = load_dataset(args.dataset_name, args.dataset_config_name)
    except (OSError, ValueError, ConnectionError) as err:
        raise UserError(
            f"could not load dataset '{args.dataset_name}' ({type(err).__name__}); pass a local dataset folder, "
            f"a Hub dataset reachable from this machine, or --train_file"
        ) from None
    if not isinstance(data, DatasetDict) or args.dataset_train_split not in data:
        splits = list(data) if isinstance(data, DatasetDict) else []
        raise UserError(f"dataset '{args.dataset_name}' has no split '{args.dataset_train_split}' "
                        f"(it has: {', '.join(splits)}); pass --dataset_train_split")
    if args.validation_file:
        raise UserError("--validation_file goes with --train_file; with --dataset_name use --dataset_test_split")
    out = {"train": data[args.dataset_train_split]}
    if args.dataset_test_split in data:
        out["validation"] = data[args.dataset_test_split]
    return DatasetDict(out)


def detect_format(columns: list[str], text_field: str = "text") -> str:
    if "messages" in columns or "conversations" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if text_field in columns:
        return "text"
    raise UserError(
        f"the data has columns {', '.join(columns)}; expected '{text_field}' (plain text), 'prompt' + 'completion' "
        f"(loss on the completion), or 'messages' (chat turns with role/content); rename the columns or pass "
        f"--dataset_text_field"
    )


def load_sft_datasets(args, seed: int, text_field: str = "text"):
    """(train, eval, format): eval is the validation file / test split, else a seeded hold-out of train."""
    data = _load(args)
    if "conversations" in data["train"].column_names and "messages" not in data["train"].column_names:
        # ShareGPT -> messages here, not in trl: trl renames the keys but keeps ShareGPT's roles ("human", "gpt"),
        # which a chat template does not know as the user and the assistant (replies then get no EOS, no loss mask)
        data = data.map(lambda ex: {"messages": _messages(ex)}, remove_columns=["conversations"])
    train = data["train"]
    fmt = detect_format(train.column_names, text_field)
    if fmt == "text":  # paragraph splitting leaves empty rows between blank lines
        data = data.filter(lambda ex: bool(ex[text_field] and ex[text_field].strip()))
        train = data["train"]
    if "validation" in data:
        evaluation = data["validation"]
    else:
        if len(train) < 2:
            raise UserError(
                f"the training data has {len(train)} example(s), too few to hold one out for eval; "
                f"pass --validation_file, or for a .txt file --text_sample_by paragraph or line"
            )
        n_eval = max(1, int(len(train) * args.validation_split_percentage / 100))
        split = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, evaluation = split["train"], split["test"]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    if len(train) == 0 or len(evaluation) == 0:
        raise UserError("the training or held-out data is empty after loading; check the file and --max_*_samples")
    return train, evaluation, fmt


def ensure_chat_template(tokenizer) -> bool:
    """Give the tokenizer DEFAULT_CHAT_TEMPLATE if it has none; True when it was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def _messages(example) -> list[dict]:
    """The chat turns of an example as role/content messages; ShareGPT's from/value turns (human, gpt) converted."""
    if "messages" in example:
        return list(example["messages"])
    turns = []
    for turn in example["conversations"]:
        role = turn.get("role") or turn.get("from")
        turns.append({"role": SHAREGPT_ROLES.get(role, role), "content": turn.get("content", turn.get("value"))})
    return turns


def sample_prompt(example: dict, fmt: str, tokenizer, text_field: str = "text", n_tokens: int = 16) -> str:
    """The prompt for the generated sample: the start of an eval text, its prompt, or its chat context."""
    if fmt == "text":
        ids = tokenizer(example[text_field])["input_ids"][:n_tokens]
        return tokenizer.decode(ids)
    if fmt == "prompt-completion":
        prompt = example["prompt"]
        if isinstance(prompt, str):
            return prompt
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    turns = _messages(example)
    last_assistant = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=len(turns))
    return tokenizer.apply_chat_template(turns[:last_assistant], tokenize=False, add_generation_prompt=True)
