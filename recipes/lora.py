"""LoRA fine-tuning of GPT-2 with trl's SFTTrainer and a peft LoraConfig; with --load_in_4bit, QLoRA.

The base stays frozen, in full precision or (--load_in_4bit, what recipes/qlora.py turns on) quantized to 4-bit
NF4 by bitsandbytes while it loads; only low-rank updates of its projections (c_attn, c_proj, c_fc: GPT-2's
Conv1D layers) are trained and saved: an adapter folder of a few MB with its tokenizer, a model card and the eval
loss / perplexity before and after.

Data: plain text (--train_file story.txt), prompt/completion pairs (loss on the completion only) or chat messages
(jsonl with "messages" or ShareGPT "conversations"), or a datasets name (--dataset_name); with none, the embedded
corpus. Base: a Hub name or any save_pretrained GPT-2 folder; with none, out/pretrain (what
`python recipes/pretrain.py` writes) if it exists, else the Hub's gpt2.

    # 1 process (CPU or one GPU)
    python recipes/lora.py                                   # out/pretrain (or gpt2) on the embedded corpus
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

import sys

from toolkit.errors import exit_now, exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None, recipe: str = "lora") -> dict:
    from toolkit import args as arguments

    if arguments.print_cached_help(recipe, argv):  # without importing transformers (seconds) when it is cached
        return {}
    from toolkit import distributed
    from toolkit.args.finetune import (
        DataArguments,
        FinetuneConfig,
        LoraArguments,
        ModelArguments,
        QuantizationArguments,
    )

    # 1. parse: --config YAML, then flag overrides, over this recipe's defaults on this machine (bf16 on GPUs that
    #    have it; qlora: 4-bit base, checkpointing, paged AdamW on CUDA); then check everything before any work
    model_args, lora_args, quant_args, data_args, training_args = arguments.parse(
        [ModelArguments, LoraArguments, QuantizationArguments, DataArguments, FinetuneConfig], argv,
        defaults=arguments.resolve_defaults(recipe), recipe=recipe)
    arguments.derive_settings(training_args)
    distributed.setup(training_args)  # DDP or FSDP2 as the accelerate config says; a launch that is not one: refused

    from transformers import set_seed

    from toolkit import cpu_allocator, finetune, lora, model_loading, preflight
    from toolkit.data.sft import load_sft_datasets, sample_prompt
    from toolkit.tokenizer import load_tokenizer

    quantized = quant_args.load_in_4bit or quant_args.load_in_8bit
    push_to = finetune.check_args(model_args, training_args)  # a base, output_dir not finished, push target valid
    preflight.finetune(model_args, lora_args, quant_args, training_args, push_to)  # fits the memory? (toolkit/plan)
    set_seed(training_args.seed)

    # 2. data: text / prompt-completion / messages, with a held-out split
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    train, evaluation, fmt = load_sft_datasets(data_args, training_args.seed, training_args.dataset_text_field)
    print(f"data: {len(train)} train / {len(evaluation)} eval examples, format {fmt}")

    # 3. model: the frozen base, in full precision or quantized while it loads (NF4 + double quantization); LoRA
    #    on its projections
    if quantized:
        dtype = lora.compute_dtype(quant_args.bnb_4bit_compute_dtype)
        bnb = lora.bnb_config(quant_args, dtype, fsdp=distributed.fsdp_requested(training_args))
        model = model_loading.load_quantized_model(
            model_args.model_name_or_path, bnb, dtype, device_map=lora.device_map_for_this_rank(),
            revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation)
        model = lora.prepare_quantized_model(model, training_args)
    else:
        model = model_loading.load_model(model_args.model_name_or_path, revision=model_args.model_revision,
                                         trust_remote_code=training_args.trust_remote_code,
                                         attn_implementation=model_args.attn_implementation)
    # On CPU, once the base has loaded: training steps reuse their large tensors instead of faulting them in afresh
    # (toolkit/cpu_allocator.py; lora.py's default, qlora.py's with --cpu_keep_freed_memory true)
    note = cpu_allocator.for_training(training_args, fsdp=distributed.fsdp_requested(training_args))
    if note and training_args.process_index == 0:
        print(f"CPU memory: {note}")
    finetune.prepare_for_data(training_args, fmt, tokenizer, model.config)
    peft_config = lora.build_lora_config(lora_args, model, quantized=quantized)

    # 4. trainer (trl: tokenizes, adds EOS, masks prompts, packs; peft: wraps the model)
    trainer = finetune.make_trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                                    processing_class=tokenizer, peft_config=peft_config)
    if quantized:
        finetune.match_adapter_dtype(trainer.model, dtype)
    print(lora.trainable_parameters_line(trainer.model))

    # 5. eval before, train, eval after, a sample
    metrics = finetune.evaluate(trainer, "before")
    with distributed.peer_failures_as_user_errors(trainer):  # a dead or hung rank: one line, not a traceback
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)  # SIGTERM: save, stop
    trainer.graceful_stop.exit_if_stopped(training_args)
    metrics.update(finetune.evaluate(trainer, "after"), train_loss=result.training_loss,
                   train_runtime_s=result.metrics["train_runtime"], train_steps=result.global_step,
                   **finetune.peak_memory())
    prompt = training_args.sample_prompt or sample_prompt(evaluation[0], fmt, tokenizer,
                                                          training_args.dataset_text_field)
    sample = finetune.generate_sample(trainer.model, tokenizer, prompt, training_args.sample_max_new_tokens)

    # 6. save adapter + tokenizer + card + metrics, 7. push
    finetune.save_run(trainer, script=f"recipes/{recipe}.py", argv=sys.argv[1:] if argv is None else argv,
                      method="QLoRA" if quantized else "LoRA", model_args=model_args, lora_args=lora_args,
                      data_args=data_args, data_format=fmt, metrics=metrics, sample=sample,
                      extra_hparams=lora.quantization_summary(quant_args, dtype) if quantized else None)
    if push_to:
        metrics["hub_url"] = finetune.push(trainer, push_to)
    trainer.graceful_stop.release(training_args)  # a SIGTERM after training ends the run here, results saved
    return metrics


if __name__ == "__main__":
    main()
    exit_now()  # skip the interpreter's slow teardown (toolkit/errors.py)
