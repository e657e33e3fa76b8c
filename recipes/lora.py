"""LoRA fine-tuning of GPT-2 with trl's SFTTrainer and a peft LoraConfig.

The base stays frozen in full precision; only low-rank updates of its projections (c_attn, c_proj,
c_fc: GPT-2's Conv1D layers) are trained and saved: an adapter folder of a few MB with its
tokenizer, a model card and the eval loss / perplexity before and after. recipes/qlora.py is this
recipe with the base loaded in 4-bit.

Data: plain text (--train_file story.txt), prompt/completion pairs (loss on the completion only) or
chat messages (jsonl with "messages"), or a datasets name (--dataset_name). Base: a Hub name or any
save_pretrained GPT-2 folder, e.g. the output of recipes/pretrain.py or recipes/onefile_train.py.

    # 1 process (CPU or one GPU)
    python recipes/lora.py --config recipes/configs/lora_gpt2.yaml
    python recipes/lora.py --model_name_or_path out/pretrain --train_file ../shared/data/tinyshakespeare/input.txt \\
        --output_dir out/lora-shakespeare --max_steps 200 --lora_r 16 --lora_target_modules attention
    # DDP on 2 GPUs
    accelerate launch --multi_gpu --num_processes 2 recipes/lora.py --config recipes/configs/lora_gpt2.yaml
    # push the adapter (token from HF_TOKEN or `hf auth login`)
    python recipes/lora.py --config recipes/configs/lora_gpt2.yaml --push_to_hub --hub_model_id you/gpt2-lora
    # afterwards: toolkit merge --adapter out/lora-gpt2 --output_dir out/gpt2-merged
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without install

from toolkit.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    from transformers import set_seed

    from toolkit import finetune
    from toolkit import lora
    from toolkit.sft_data import DataArguments, load_sft_datasets, sample_prompt
    from toolkit.tokenizer import load_tokenizer

    # 1. parse: --config YAML, then flag overrides
    model_args, lora_args, data_args, args = finetune.parse_args(
        argv, [finetune.ModelArguments, lora.LoraArguments, DataArguments, finetune.FinetuneConfig], {"output_dir": "out/lora"}
    )
    push_to = finetune.check_args(model_args, args)  # base exists, output_dir not finished, push target valid
    set_seed(args.seed)

    # 2. data: text / prompt-completion / messages, with a held-out split
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    train, evaluation, fmt = load_sft_datasets(data_args, args.seed, args.dataset_text_field)
    print(f"data: {len(train)} train / {len(evaluation)} eval examples, format {fmt}")

    # 3. model: the frozen base in full precision, LoRA on its projections
    model = lora.load_base_model(model_args.model_name_or_path, revision=model_args.model_revision,
                                 trust_remote_code=args.trust_remote_code, attn_implementation=model_args.attn_implementation)
    finetune.prepare_for_data(args, fmt, tokenizer, model.config)
    peft_config = lora.build_lora_config(lora_args, model, quantized=False)

    # 4. trainer (trl: tokenizes, adds EOS, masks prompts, packs; peft: wraps the model)
    trainer = finetune.make_trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                    processing_class=tokenizer, peft_config=peft_config)
    print(lora.trainable_parameters_line(trainer.model))

    # 5. eval before, train, eval after, a sample
    metrics = finetune.evaluate(trainer, "before")
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)  # SIGTERM: save, stop
    finetune.exit_if_stopped(trainer, args)
    metrics.update(finetune.evaluate(trainer, "after"), train_loss=result.training_loss,
                   train_runtime_s=result.metrics["train_runtime"], train_steps=result.global_step, **finetune.peak_memory())
    prompt = args.sample_prompt or sample_prompt(evaluation[0], fmt, tokenizer, args.dataset_text_field)
    sample = finetune.generate_sample(trainer.model, tokenizer, prompt, args.sample_max_new_tokens)

    # 6. save adapter + tokenizer + card + metrics, 7. push
    finetune.save_run(trainer, script="recipes/lora.py", argv=argv, method="LoRA", model_args=model_args,
                      lora_args=lora_args, data_args=data_args, data_format=fmt, metrics=metrics, sample=sample)
    if push_to:
        metrics["hub_url"] = finetune.push(trainer, push_to)
    return metrics


if __name__ == "__main__":
    main()
