"""Pretrain a GPT-2 from scratch (or continue a pretrained one) with the Hugging Face Trainer.

One process (CPU or one GPU), the embedded corpus and a BPE trained on it, a few minutes on 2 cores:
    python recipes/pretrain.py

A corpus at scale: tokenize it once into a token store, then train from its memory-mapped shards
(docs/pretraining_at_scale.md):
    toolkit prepare corpus/ --output_dir data/store --tokenizer_name ../shared/data/gpt2-tokenizer
    python recipes/pretrain.py --token_store data/store --preset gpt2 ...

Your data, the real GPT-2 tokenizer, a YAML config with command-line overrides:
    python recipes/pretrain.py --config recipes/configs/pretrain_gpt2-mini.yaml \
        --train_file ../shared/data/tinyshakespeare/input.txt \
        --tokenizer_name ../shared/data/gpt2-tokenizer --output_dir out/shakespeare

The same file under DDP or FSDP2; only the accelerate config changes:
    accelerate launch --config_file accelerate_configs/ddp.yaml recipes/pretrain.py --preset gpt2
    accelerate launch --config_file accelerate_configs/fsdp.yaml recipes/pretrain.py --preset gpt2-xl
    torchrun --nproc_per_node 4 recipes/pretrain.py --preset gpt2

Resume an interrupted run:   python recipes/pretrain.py ... --resume_from_checkpoint auto
HellaSwag at every eval:     python recipes/pretrain.py ... --eval_tasks hellaswag --eval_tasks_limit 1000
                             (pip install -e ".[eval]")
All options:                 python recipes/pretrain.py --help

The output folder loads with from_pretrained and carries a model card (README.md) that --push_to_hub uploads.
"""

from __future__ import annotations

import os

from toolkit.errors import exit_now, exit_on_user_error


@exit_on_user_error
def main() -> None:
    from toolkit import args as arguments

    if arguments.print_cached_help("pretrain"):  # without importing transformers (seconds) once it is cached
        return
    from toolkit import distributed, preflight
    from toolkit.args.pretrain import DataArguments, ModelArguments, PretrainArguments

    # 1. Parse: YAML (--config) + command-line overrides over this machine's defaults (bf16 on GPUs that have it,
    #    one gloo group for CPU ranks), every option's range checked.
    model_args, data_args, training_args = arguments.parse([ModelArguments, DataArguments, PretrainArguments],
                                                           defaults=arguments.resolve_defaults("pretrain"),
                                                           recipe="pretrain")
    arguments.derive_settings(training_args)  # accumulation from --global_batch_size; the cosine's 10% floor
    arguments.resolve_model_shape(model_args)  # shape flags without --preset: GPT-2's shape and vocabulary
    distributed.setup(training_args)  # DDP or FSDP2 as the accelerate config says; a launch that is not one: refused
    preflight.pretrain(model_args, data_args, training_args)  # which tokenizer; fits the memory? (toolkit/plan)
    from toolkit import cpu_allocator

    # Large tensors reused between steps, not faulted in afresh (toolkit/cpu_allocator.py). Not under FSDP: its
    # per-step all-gather buffers would leave holes in the heap and cost more than sharding saves.
    note = cpu_allocator.for_training(training_args, fsdp=distributed.fsdp_requested(training_args))
    if note and training_args.process_index == 0:
        print(f"CPU memory: {note}")

    # Heavy imports after parsing, so --help and config errors come back fast.
    import torch
    from transformers import AutoModelForCausalLM, default_data_collator, set_seed

    from toolkit import distributed_report, flops, guard, hub, lm_eval_tasks, lm_metrics, muon, presets
    from toolkit.callbacks import GracefulStopCallback, LossCurveCallback
    from toolkit.data.pretrain import pretrain_data
    from toolkit.model_loading import load_model
    from toolkit.run_dir import check_resume_compatible, export_full_model, prepare_output_dir
    from toolkit.trainer import PretrainTrainer

    resume_from = prepare_output_dir(training_args.output_dir, training_args.overwrite_output_dir,
                                     training_args.resume_from_checkpoint, training_args.process_index == 0)
    push_to_hub = hub.take_push_to_hub(training_args)  # the final folder is pushed once, at the end (step 10)
    fsdp = distributed.fsdp_requested(training_args)
    muon.check_not_sharded(training_args, fsdp)
    benchmark = lm_eval_tasks.benchmark_during_training(training_args, fsdp)  # --eval_tasks: lm-eval at every eval

    # 2. Seed: initial weights and data order depend only on --seed.
    set_seed(training_args.seed)

    # 3. Data source and tokenizer (toolkit/data/pretrain.py): the given tokenizer, the model's, this run's earlier
    #    one, a token store's own (a store refuses any other), or a new BPE trained on the text.
    data = pretrain_data(model_args, data_args, training_args, resume_from)
    tokenizer = data.tokenizer

    # 4. Model config: a preset (+ overrides) or config.json to train from scratch, or a pretrained model's.
    config = presets.pretrain_config(model_args, tokenizer, data_args.block_size)
    presets.fill_width_defaults(training_args, config.n_embd, fsdp)  # learning rate and optimizer by model width
    if resume_from:
        # same model shape; the global batch may change where the data resumes by samples seen (not a stream)
        check_resume_compatible(resume_from, config, training_args, by_samples=not data_args.streaming)

    # 5. Model: weights from the checkpoint, or GPT-2 initialisation from the seed.
    if model_args.model_name_or_path:
        model = load_model(model_args.model_name_or_path, config=config, dtype=torch.float32,
                           attn_implementation=model_args.attn_implementation,
                           trust_remote_code=model_args.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation=model_args.attn_implementation)
    model.config.pad_token_id = tokenizer.pad_token_id  # as the Trainer would align it, with a warning on every run
    model.generation_config.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   bos_token_id=tokenizer.eos_token_id)
    n_params = model.num_parameters()

    # 6. Data: blocks of a token store (given, or prepared into the cache the first time), or a stream packed live.
    train_dataset, eval_dataset, description = data.datasets()
    if training_args.process_index == 0:
        print(f"Data: {description}")

    # 7. Trainer: HF Trainer + tokens/s and MFU logging + loss-curve plot + bits per byte (the bytes of the scored
    #    validation tokens are counted once here: toolkit/lm_metrics.py).
    tokens_per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                       * training_args.world_size * data_args.block_size)
    eval_stats = lm_metrics.eval_bytes_per_token(eval_dataset, tokenizer)  # (bytes per token, tokens, bytes)
    peak, peak_source = flops.peak_flops()
    if not data_args.streaming:  # the non-finite-loss guard names the blocks of a bad batch
        train_dataset = guard.WithPosition(train_dataset, data_args.block_size)
    trainer = PretrainTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=default_data_collator, processing_class=tokenizer, benchmark=benchmark,
        callbacks=[LossCurveCallback(), distributed_report.DistributedSetupCallback()],  # type, world size, sharding
        flops_per_token=flops.flops_per_token_for(config, data_args.block_size), tokens_per_step=tokens_per_step,
        peak_flops=peak * training_args.world_size if peak else None, eval_bytes_per_token=eval_stats[0],
    )
    if training_args.process_index == 0:
        describe(training_args, config, n_params, tokens_per_step, peak_source, eval_stats)

    # 8. Train (resuming restores model, optimizer, scheduler, RNG and the position in the data order).
    #    SIGINT/SIGTERM saves a checkpoint at the end of the current step and stops.
    stop = GracefulStopCallback(trainer.accelerator)
    trainer.add_callback(stop)
    with distributed.peer_failures_as_user_errors(trainer):  # a dead or hung rank: one line, not a traceback
        trainer.train(resume_from_checkpoint=resume_from)
    stop.exit_if_stopped(training_args)

    # 9. Evaluate (loss, perplexity, bits per byte, --eval_tasks), save a from_pretrained-ready folder with its model
    #    card (README.md) and loss curve, show a sample.
    metrics = final_metrics(trainer)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    export_full_model(trainer, training_args.output_dir, tokenizer)
    if training_args.process_index == 0:
        report(training_args, model_args, data_args, config, tokenizer, n_params, trainer.state.global_step,
               tokens_per_step, metrics, benchmark, push_to_hub)

    # 10. Push the final folder (model, tokenizer, config, loss curve, model card) to the Hub.
    if push_to_hub and training_args.process_index == 0:
        url = hub.push_folder(training_args.output_dir, training_args.hub_model_id,
                              private=bool(training_args.hub_private_repo), token=training_args.hub_token)
        print(f"Pushed to {url}")
    stop.release(training_args)  # a SIGTERM during the final evaluation or save ends the run here, results saved


def final_metrics(trainer) -> dict:
    """The trained model's eval metrics: the last evaluation's when it ran at the last step (eval_steps divides
    max_steps: no second pass), else a new evaluation, and the loss curve drawn again with it (LossCurveCallback
    drew it when training ended, before this evaluation)."""
    from toolkit.callbacks import plot_loss_curve

    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), {})
    if last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    metrics = trainer.evaluate()
    if trainer.args.process_index == 0:
        plot_loss_curve(trainer.state.log_history, os.path.join(trainer.args.output_dir, "loss_curve.png"))
    return metrics


def describe(training_args, config, n_params: int, tokens_per_step: int, peak_source: str, eval_stats) -> None:
    """Rank 0, before training: the model, precision, optimizer and step size; what the evaluation scores."""
    print(f"Model: {n_params:,} parameters (n_layer={config.n_layer}, n_head={config.n_head}, "
          f"n_embd={config.n_embd}, vocab={config.vocab_size}); "
          f"{'bf16 mixed precision' if training_args.bf16 else 'fp32'}; "
          f"{'Muon + AdamW' if training_args.muon else training_args.optim}, "
          f"peak lr {training_args.learning_rate:g}; {tokens_per_step:,} tokens/step; MFU against {peak_source}")
    bytes_per_token, eval_tokens, eval_bytes = eval_stats
    print(f"Eval: {eval_tokens:,} scored validation tokens, {eval_bytes:,} bytes "
          f"({bytes_per_token:.3f} bytes/token) for bits per byte")


def report(training_args, model_args, data_args, config, tokenizer, n_params: int, steps: int, tokens_per_step: int,
           metrics: dict, benchmark, push_to_hub: bool) -> None:
    """Rank 0, the folder saved: a sample from it, its model card (README.md), the results on the console."""
    from toolkit.model_card import write_pretrain_card

    sample = generate_sample(training_args.output_dir, training_args.sample_prompt,
                             training_args.sample_max_new_tokens, training_args.seed)
    write_pretrain_card(training_args, model_args, data_args, config, tokenizer, n_params, steps, tokens_per_step,
                        metrics, benchmark, sample, push_to_hub)
    print(f"\nModel saved to {os.path.abspath(training_args.output_dir)} (model card: README.md)")
    print(f"Eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}, "
          f"bits per byte {metrics.get('eval_bits_per_byte', float('nan')):.4f}")
    print(f"Sample: {sample!r}")


def generate_sample(model_dir: str, prompt: str, max_new_tokens: int, seed: int) -> str:
    """Load the saved folder exactly as a user would (bf16 on a GPU, fp32 on CPU) and sample a continuation (top-k 50).
    The full length even when the model would end the document at once (the default corpus has short documents; a
    sample of "\n" then EOS would show nothing)."""
    from toolkit.generate import continuation
    from toolkit.inference import load_for_inference

    loaded = load_for_inference(model_dir)
    return prompt + continuation(loaded.model, loaded.tokenizer, prompt, max_new_tokens, temperature=1.0, top_k=50,
                                 seed=seed, min_new_tokens=max_new_tokens)


if __name__ == "__main__":
    main()
    exit_now()  # skip the interpreter's slow teardown (toolkit/errors.py)
