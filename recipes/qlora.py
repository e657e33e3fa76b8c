"""QLoRA fine-tuning of GPT-2: recipes/lora.py with the frozen base quantized by bitsandbytes.

The base is quantized to 4-bit NormalFloat (NF4) with double quantization while it loads (one tensor
at a time, never the whole model in full precision), its matmuls run in the compute dtype (bf16 on
GPUs that have it, fp32 on CPU), and LoRA adapters train on top in that dtype; paged AdamW on CUDA.
--load_in_8bit uses LLM.int8 instead. Under DDP each rank loads the whole quantized model on its own
device (device_map={"": local_rank}); under FSDP the 4-bit storage dtype is set to the model dtype.
The saved adapter is an ordinary LoRA adapter: merge it into the full-precision base with
`toolkit merge` (never into the 4-bit one). Why and how: docs/qlora_explained.md.

Data: plain text (--train_file story.txt), prompt/completion pairs (loss on the completion only) or
chat messages (jsonl with "messages"), or a datasets name (--dataset_name). Base: a Hub name or any
save_pretrained GPT-2 folder, e.g. the output of recipes/pretrain.py or recipes/onefile_train.py.

    # 1 process (CPU or one GPU)
    python recipes/qlora.py --config recipes/configs/qlora_gpt2.yaml
    python recipes/qlora.py --config recipes/configs/qlora_gpt2-medium.yaml
    python recipes/qlora.py --model_name_or_path out/pretrain --train_file ../shared/data/tinyshakespeare/input.txt \\
        --output_dir out/qlora-shakespeare --max_steps 200 --load_in_8bit
    # DDP on 2 GPUs (each rank: whole 4-bit model on its GPU)
    accelerate launch --multi_gpu --num_processes 2 recipes/qlora.py --config recipes/configs/qlora_gpt2.yaml
    # push the adapter (token from HF_TOKEN or `hf auth login`)
    python recipes/qlora.py --config recipes/configs/qlora_gpt2.yaml --push_to_hub --hub_model_id you/gpt2-qlora
    # afterwards: toolkit merge --adapter out/qlora-gpt2 --output_dir out/gpt2-merged
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
    from toolkit import distributed, lora
    from toolkit.sft_data import DataArguments, load_sft_datasets, sample_prompt
    from toolkit.tokenizer import load_tokenizer

    # 1. parse: --config YAML, then flag overrides
    model_args, lora_args, quant_args, data_args, args = finetune.parse_args(
        argv, [finetune.ModelArguments, lora.LoraArguments, lora.QuantizationArguments, DataArguments, finetune.QLoraConfig],
        {"output_dir": "out/qlora"},
    )
    push_to = finetune.check_args(model_args, args)  # base exists, output_dir not finished, push target valid
    set_seed(args.seed)

    # 2. data: text / prompt-completion / messages, with a held-out split
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    train, evaluation, fmt = load_sft_datasets(data_args, args.seed, args.dataset_text_field)
    print(f"data: {len(train)} train / {len(evaluation)} eval examples, format {fmt}")

    # 3. model: the frozen base quantized while it loads (NF4 + double quantization), LoRA on its projections
    dtype = lora.compute_dtype(quant_args.bnb_4bit_compute_dtype)
    model = lora.load_quantized_base_model(
        model_args.model_name_or_path, lora.bnb_config(quant_args, dtype, fsdp=distributed.fsdp_requested(args)), dtype,
        device_map=lora.device_map_for_this_rank(), revision=model_args.model_revision,
        trust_remote_code=args.trust_remote_code, attn_implementation=model_args.attn_implementation)
    model = lora.prepare_quantized_model(model, args)
    finetune.prepare_for_data(args, fmt, tokenizer, model.config)
    peft_config = lora.build_lora_config(lora_args, model, quantized=True)

    # 4. trainer (trl: tokenizes, adds EOS, masks prompts, packs; peft: wraps the model)
    trainer = finetune.make_trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                    processing_class=tokenizer, peft_config=peft_config)
    finetune.match_adapter_dtype(trainer.model, dtype)
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
    finetune.save_run(trainer, script="recipes/qlora.py", argv=argv, method="QLoRA", model_args=model_args,
                      lora_args=lora_args, data_args=data_args, data_format=fmt, metrics=metrics, sample=sample,
                      extra_hparams=lora.quantization_summary(quant_args, dtype))
    if push_to:
        metrics["hub_url"] = finetune.push(trainer, push_to)
    return metrics


if __name__ == "__main__":
    main()
