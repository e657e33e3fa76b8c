"""Pretrain a GPT-2 from scratch (or continue a pretrained one) with the Hugging Face Trainer.

One process (CPU or one GPU), the embedded corpus and a BPE trained on it, a few minutes on 2 cores:
    python recipes/pretrain.py

Your data, the real GPT-2 tokenizer, a YAML config with command-line overrides:
    python recipes/pretrain.py --config recipes/configs/pretrain_gpt2-mini.yaml \
        --train_file ../shared/data/tinyshakespeare/input.txt \
        --tokenizer_name ../shared/data/gpt2-tokenizer --output_dir out/shakespeare

The same file under DDP or FSDP2; only the accelerate config changes:
    accelerate launch --config_file accelerate_configs/ddp.yaml recipes/pretrain.py --preset gpt2
    accelerate launch --config_file accelerate_configs/fsdp.yaml recipes/pretrain.py --preset gpt2-xl
    torchrun --nproc_per_node 4 recipes/pretrain.py --preset gpt2

Resume an interrupted run:   python recipes/pretrain.py ... --resume_from_checkpoint auto
All options:                 python recipes/pretrain.py --help
"""

from __future__ import annotations

import math
import os

from toolkit.errors import UserError, exit_on_user_error


@exit_on_user_error
def main() -> None:
    from toolkit import args as arguments
    from toolkit import distributed
    from toolkit.args.pretrain import DataArguments, ModelArguments, PretrainArguments

    # 1. Parse: YAML (--config) + command-line overrides over this machine's defaults (bf16 on GPUs that have it,
    #    one gloo group for CPU ranks), every option's range checked. (On CPU ranks an FSDP accelerate config must be
    #    turned into real FSDP2 before TrainingArguments sets up accelerate; a no-op everywhere else.)
    distributed.enable_cpu_fsdp2()
    model_args, data_args, training_args = arguments.parse([ModelArguments, DataArguments, PretrainArguments],
                                                           defaults=arguments.resolve_defaults("pretrain"))
    arguments.derive_settings(training_args)  # accumulation from --global_batch_size; the cosine's 10% floor
    distributed.check_distributed_launch(training_args)
    if training_args.cpu_keep_freed_memory and training_args.device.type == "cpu":
        from toolkit.cpu_allocator import keep_freed_memory

        # Large tensors reused between steps, not faulted in afresh (toolkit/cpu_allocator.py). Not under FSDP: its
        # per-step all-gather buffers would leave holes in the heap and cost more than sharding saves.
        fsdp = distributed.fsdp_requested(training_args)
        note = keep_freed_memory() if not fsdp else "glibc defaults kept under FSDP (memory first)"
        if training_args.process_index == 0:
            print(f"CPU memory: {note}")

    # Heavy imports after parsing, so --help and config errors come back fast.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, default_data_collator, set_seed

    from toolkit import data, flops, presets
    from toolkit.callbacks import GracefulStopCallback, LossCurveCallback
    from toolkit.run_dir import check_resume_compatible, load_pretrained_model, prepare_output_dir
    from toolkit.tokenizer import load_tokenizer, train_bpe_tokenizer
    from toolkit.trainer import PretrainTrainer

    resume_from = prepare_output_dir(training_args.output_dir, training_args.overwrite_output_dir, training_args.resume_from_checkpoint, training_args.process_index == 0)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # we push the final folder ourselves, once, at the end
    if push_to_hub:
        from toolkit.hub import check_push_ready

        check_push_ready(training_args.hub_model_id, training_args.hub_token)  # fail now, not after hours of training

    # 2. Seed: initial weights and data order depend only on --seed.
    set_seed(training_args.seed)

    # 3. Tokenizer: given, the model's own, the one this run trained earlier, or a new BPE on the training text.
    streaming = data_args.streaming
    if streaming and not data_args.dataset_name:
        raise UserError("--streaming needs --dataset_name (a Hub dataset); local files are read directly")
    if streaming and training_args.max_steps <= 0:
        raise UserError("--streaming needs --max_steps (a stream has no length to count epochs in)")
    train_docs = val_docs = None
    if not streaming:
        train_docs = data.load_documents(data_args, "train")
        val_docs = data.load_documents(data_args, "validation")
    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    saved_tokenizer = os.path.join(training_args.output_dir, "tokenizer.json")
    if tokenizer_source is None and resume_from and os.path.exists(saved_tokenizer):
        tokenizer_source = training_args.output_dir
    if tokenizer_source is None:
        if streaming:
            raise UserError("--streaming needs --tokenizer_name (a BPE is trained on a full dataset, not a stream)")
        with training_args.main_process_first(desc="train tokenizer"):
            if training_args.process_index == 0:
                tokenizer = train_bpe_tokenizer(train_docs["text"], model_args.vocab_size)
                tokenizer.save_pretrained(training_args.output_dir)
            tokenizer_source = training_args.output_dir
    tokenizer = load_tokenizer(tokenizer_source, model_args.trust_remote_code)

    # 4. Model config: a preset (+ overrides) or config.json to train from scratch, or a pretrained model.
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    elif model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, trust_remote_code=model_args.trust_remote_code)
    else:
        overrides = presets.parse_config_overrides(model_args.config_overrides)
        overrides.update(n_layer=model_args.n_layer, n_head=model_args.n_head, n_embd=model_args.n_embd, n_positions=model_args.n_positions)
        if model_args.dropout is not None:
            overrides.update(resid_pdrop=model_args.dropout, embd_pdrop=model_args.dropout, attn_pdrop=model_args.dropout)
        config = presets.build_gpt2_config(model_args.preset, len(tokenizer), overrides, model_args.pad_vocab_to_multiple_of,
                                           bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    presets.validate_config(config, data_args.block_size, len(tokenizer))
    if training_args.learning_rate is None:  # by width: 3e-3 suits gpt2-micro, GPT-2 124M wants 6e-4
        training_args.learning_rate = presets.default_learning_rate(config.n_embd)
    if resume_from:
        check_resume_compatible(resume_from, config, training_args)  # same model shape, same global batch

    # 5. Model: weights from the checkpoint, or GPT-2 initialisation from the seed.
    if model_args.model_name_or_path:
        model = load_pretrained_model(model_args.model_name_or_path, config=config, dtype=torch.float32,
                                      attn_implementation=model_args.attn_implementation,
                                      trust_remote_code=model_args.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=model_args.attn_implementation)
    model.config.pad_token_id = tokenizer.pad_token_id  # as the Trainer would align it, with a warning on every run
    model.generation_config.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   bos_token_id=tokenizer.eos_token_id)
    n_params = model.num_parameters()

    # 6. Data: EOS-separated documents packed into blocks (cached), or a stream packed on the fly.
    if streaming:
        train_dataset, eval_dataset = data.streaming_datasets(data_args, tokenizer)
        print(f"Data: streaming {data_args.dataset_name}, blocks of {data_args.block_size} tokens")
    else:
        with training_args.main_process_first(desc="tokenize and pack"):
            packed = data.packed_blocks(train_docs, val_docs, tokenizer, data_args)
        global_batch = training_args.per_device_train_batch_size * training_args.world_size
        if len(packed.train) < global_batch:
            raise UserError(f"the training data has {len(packed.train)} blocks of {data_args.block_size} tokens, fewer than one "
                            f"batch ({global_batch}); add data, or lower --block_size or --per_device_train_batch_size")
        train_dataset, eval_dataset = data.BlockDataset(packed.train), data.BlockDataset(packed.validation)
        if training_args.process_index == 0:
            print(f"Data: {packed.describe()} (cache: {packed.cache_dir})")

    # 7. Trainer: HF Trainer + tokens/s and MFU logging + loss-curve plot.
    tokens_per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size * data_args.block_size
    peak, peak_source = flops.peak_flops()
    trainer = PretrainTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[LossCurveCallback(), distributed.DistributedSetupCallback()],  # logs type, world size, sharding
        flops_per_token=flops.flops_per_token_for(config, data_args.block_size),
        peak_flops=peak * training_args.world_size if peak else None,
        tokens_per_step=tokens_per_step,
    )
    if training_args.process_index == 0:
        print(f"Model: {n_params:,} parameters (n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, "
              f"vocab={config.vocab_size}); {'bf16 mixed precision' if training_args.bf16 else 'fp32'}; peak lr {training_args.learning_rate:g}; "
              f"{tokens_per_step:,} tokens/step; MFU against {peak_source}")

    # 8. Train (resuming restores model, optimizer, scheduler, RNG and the position in the data order).
    #    SIGINT/SIGTERM saves a checkpoint at the end of the current step and stops.
    stop = GracefulStopCallback(trainer.accelerator)
    trainer.add_callback(stop)
    with distributed.peer_failures_as_user_errors(trainer):  # a dead or hung rank: one line, not a traceback
        trainer.train(resume_from_checkpoint=resume_from)
    stop.exit_if_stopped(training_args)

    # 9. Evaluate, save a from_pretrained-ready folder, show a sample.
    metrics = trainer.evaluate()
    metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    distributed.export_full_model(trainer, training_args.output_dir, tokenizer)
    if training_args.process_index == 0:
        sample = generate_sample(training_args.output_dir, training_args.sample_prompt, training_args.sample_max_new_tokens, training_args.seed)
        print(f"\nModel saved to {os.path.abspath(training_args.output_dir)}")
        print(f"Eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}")
        print(f"Sample: {sample!r}")

    # 10. Push the final folder (model, tokenizer, config, loss curve) to the Hub.
    if push_to_hub and training_args.process_index == 0:
        from toolkit.hub import push_folder

        url = push_folder(training_args.output_dir, training_args.hub_model_id, private=bool(training_args.hub_private_repo), token=training_args.hub_token)
        print(f"Pushed to {url}")


def generate_sample(model_dir: str, prompt: str, max_new_tokens: int, seed: int) -> str:
    """Load the saved folder exactly as a user would and sample a continuation (top-k 50)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids if prompt else torch.tensor([[tokenizer.eos_token_id]])
    torch.manual_seed(seed)
    with torch.no_grad():
        # min_new_tokens: the full length even when the model would end the document at once (the default corpus
        # has short ones; a sample of "\n" then EOS shows nothing): EOS is not sampled before that length.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=True, top_k=50, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


if __name__ == "__main__":
    main()
