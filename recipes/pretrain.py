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

from toolkit.errors import UserError, exit_on_user_error
from toolkit.fast_exit import exit_now


@exit_on_user_error
def main() -> None:
    from toolkit import args as arguments

    if arguments.print_cached_help("pretrain"):  # without importing transformers (seconds) once it is cached
        return
    from toolkit import distributed, peer_failures, preflight
    from toolkit.args.pretrain import DataArguments, ModelArguments, PretrainArguments

    # 1. Parse: YAML (--config) + command-line overrides over this machine's defaults (bf16 on GPUs that have it,
    #    one gloo group for CPU ranks), every option's range checked. (On CPU ranks an FSDP accelerate config must be
    #    turned into real FSDP2 before TrainingArguments sets up accelerate; a no-op everywhere else.)
    distributed.enable_cpu_fsdp2()
    model_args, data_args, training_args = arguments.parse([ModelArguments, DataArguments, PretrainArguments],
                                                           defaults=arguments.resolve_defaults("pretrain"),
                                                           recipe="pretrain")
    arguments.derive_settings(training_args)  # accumulation from --global_batch_size; the cosine's 10% floor
    distributed.check_distributed_launch(training_args)
    preflight.pretrain(model_args, data_args, training_args)  # which tokenizer; fits the memory? (toolkit/plan)
    from toolkit import cpu_allocator

    # Large tensors reused between steps, not faulted in afresh (toolkit/cpu_allocator.py). Not under FSDP: its
    # per-step all-gather buffers would leave holes in the heap and cost more than sharding saves.
    note = cpu_allocator.for_training(training_args, fsdp=distributed.fsdp_requested(training_args))
    if note and training_args.process_index == 0:
        print(f"CPU memory: {note}")

    # Heavy imports after parsing, so --help and config errors come back fast.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, default_data_collator, set_seed

    from toolkit import data, flops, presets
    from toolkit.callbacks import GracefulStopCallback, LossCurveCallback, plot_loss_curve
    from toolkit.guard import WithPosition
    from toolkit.lm_metrics import eval_bytes_per_token as eval_bytes_per_token_of
    from toolkit.model_card import write_pretrain_card
    from toolkit.run_dir import check_resume_compatible, load_pretrained_model, prepare_output_dir
    from toolkit.token_store import TokenStore
    from toolkit.tokenizer import load_tokenizer, train_bpe_tokenizer
    from toolkit.trainer import PretrainTrainer

    resume_from = prepare_output_dir(training_args.output_dir, training_args.overwrite_output_dir,
                                     training_args.resume_from_checkpoint, training_args.process_index == 0)
    # we push the final folder ourselves, once, at the end
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    if push_to_hub:
        from toolkit.hub import check_push_ready

        check_push_ready(training_args.hub_model_id, training_args.hub_token)  # fail now, not after hours of training
    if training_args.muon and distributed.fsdp_requested(training_args):
        raise UserError("--optim muon orthogonalizes whole weight matrices, which FSDP shards across ranks; use it "
                        "with 1 process or DDP, or drop --optim muon under FSDP")
    benchmark = None
    if training_args.eval_tasks:  # lm-eval on rank 0 at every evaluation; task names are checked now, not hours later
        if distributed.fsdp_requested(training_args):
            raise UserError("--eval_tasks runs lm-eval on the main process alone, which an FSDP-sharded model cannot "
                            "do; drop --eval_tasks and run `toolkit eval OUTPUT_DIR --tasks ...` on the saved model")
        from toolkit.lm_eval_tasks import BenchmarkDuringTraining

        benchmark = BenchmarkDuringTraining(training_args.eval_tasks, training_args.eval_tasks_limit,
                                            training_args.eval_tasks_include_path,
                                            training_args.per_device_eval_batch_size, bool(training_args.bf16))

    # 2. Seed: initial weights and data order depend only on --seed.
    set_seed(training_args.seed)

    # 3. Data source and tokenizer. A token store (`toolkit prepare`) brings its tokenizer and refuses another;
    #    otherwise the tokenizer is given, the model's own, the one this run trained earlier, or a new BPE on the
    #    training text.
    streaming = data_args.streaming
    if streaming and not data_args.dataset_name:
        raise UserError("--streaming needs --dataset_name (a Hub dataset); local files are read directly")
    if streaming and training_args.max_steps <= 0:
        raise UserError("--streaming needs --max_steps (a stream has no length to count epochs in)")
    store_dir = None if streaming else data.store_path(data_args)
    store = TokenStore(store_dir) if store_dir else None
    train_corpus = val_corpus = None
    if not streaming and store is None:
        train_corpus, val_corpus = data.training_corpus(data_args)
    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    saved_tokenizer = os.path.join(training_args.output_dir, "tokenizer.json")
    if tokenizer_source is None and resume_from and os.path.exists(saved_tokenizer):
        tokenizer_source = training_args.output_dir
    if tokenizer_source is None and store is not None:
        tokenizer_source = store.tokenizer_dir()
        if tokenizer_source is None:
            raise UserError(f"token store '{store.dir}' has no tokenizer/ folder; pass the --tokenizer_name it was "
                            "prepared with")
    if tokenizer_source is None:
        if streaming:
            raise UserError("--streaming needs --tokenizer_name (a BPE is trained on a full dataset, not a stream)")
        with training_args.main_process_first(desc="train tokenizer"):
            if training_args.process_index == 0:
                tokenizer = train_bpe_tokenizer(train_corpus.texts(), model_args.vocab_size)
                tokenizer.save_pretrained(training_args.output_dir)
            tokenizer_source = training_args.output_dir
    tokenizer = load_tokenizer(tokenizer_source, model_args.trust_remote_code)
    if store is not None:
        store.check_tokenizer(tokenizer, tokenizer_source)

    # 4. Model config: a preset (+ overrides) or config.json to train from scratch, or a pretrained model.
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path,
                                            trust_remote_code=model_args.trust_remote_code)
    elif model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, trust_remote_code=model_args.trust_remote_code)
    else:
        # the shape flags given, then --config_overrides over them (as toolkit/preflight.py plans it)
        overrides = {k: v for k, v in (("n_layer", model_args.n_layer), ("n_head", model_args.n_head),
                                       ("n_embd", model_args.n_embd), ("n_positions", model_args.n_positions))
                     if v is not None}
        overrides.update(presets.parse_config_overrides(model_args.config_overrides))
        if model_args.dropout is not None:
            overrides.update(resid_pdrop=model_args.dropout, embd_pdrop=model_args.dropout,
                             attn_pdrop=model_args.dropout)
        config = presets.build_gpt2_config(model_args.preset, len(tokenizer), overrides,
                                           model_args.pad_vocab_to_multiple_of,
                                           bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    presets.validate_config(config, data_args.block_size, len(tokenizer))
    config.training_block_size = data_args.block_size  # saved in config.json: `toolkit eval` scores windows of this
    if training_args.learning_rate is None:  # by width: 3e-3 suits gpt2-micro, GPT-2 124M wants 6e-4
        training_args.learning_rate = presets.default_learning_rate(config.n_embd)
    if training_args.optim_auto:  # by width too: Muon up to 256 wide, AdamW from gpt2-mini up and under FSDP
        fsdp = distributed.fsdp_requested(training_args)
        training_args.muon = presets.default_optimizer(config.n_embd) == "muon" and not fsdp
    if resume_from:
        # same model shape; the global batch may change where the data resumes by samples seen (not a stream)
        check_resume_compatible(resume_from, config, training_args, by_samples=not streaming)

    # 5. Model: weights from the checkpoint, or GPT-2 initialisation from the seed.
    if model_args.model_name_or_path:
        model = load_pretrained_model(model_args.model_name_or_path, config=config, dtype=torch.float32,
                                      attn_implementation=model_args.attn_implementation,
                                      trust_remote_code=model_args.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation=model_args.attn_implementation)
    model.config.pad_token_id = tokenizer.pad_token_id  # as the Trainer would align it, with a warning on every run
    model.generation_config.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   bos_token_id=tokenizer.eos_token_id)
    n_params = model.num_parameters()

    # 6. Data: blocks of a token store (memory-mapped shards; --train_file and the default corpus are prepared into one
    #    in the cache the first time), or a stream packed on the fly.
    if streaming:
        train_dataset, eval_dataset = data.streaming_datasets(data_args, tokenizer)
        print(f"Data: streaming {data_args.dataset_name}, blocks of {data_args.block_size} tokens")
    else:
        if store is None:
            with training_args.main_process_first(desc="prepare token store"):
                store = data.cached_store(train_corpus, val_corpus, tokenizer, data_args,
                                          progress=training_args.process_index == 0)
        global_batch = training_args.per_device_train_batch_size * training_args.world_size
        train_dataset, eval_dataset = data.block_datasets(store, data_args.block_size, global_batch)
        if training_args.process_index == 0:
            print(f"Data: {len(train_dataset):,} train and {len(eval_dataset):,} validation blocks of "
                  f"{data_args.block_size} tokens from the token store {store.dir} ({store.describe()})")

    # 7. Trainer: HF Trainer + tokens/s and MFU logging + loss-curve plot + bits per byte (the bytes of the scored
    #    validation tokens are counted once here: toolkit/lm_metrics.py).
    tokens_per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                       * training_args.world_size * data_args.block_size)
    eval_bytes_per_token, eval_tokens, eval_bytes = eval_bytes_per_token_of(eval_dataset, tokenizer)
    peak, peak_source = flops.peak_flops()
    trainer = PretrainTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if streaming else WithPosition(train_dataset, data_args.block_size),  # guard
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[LossCurveCallback(), distributed.DistributedSetupCallback()],  # logs type, world size, sharding
        flops_per_token=flops.flops_per_token_for(config, data_args.block_size),
        peak_flops=peak * training_args.world_size if peak else None,
        tokens_per_step=tokens_per_step,
        eval_bytes_per_token=eval_bytes_per_token,
        benchmark=benchmark,
    )
    if training_args.process_index == 0:
        print(f"Model: {n_params:,} parameters (n_layer={config.n_layer}, n_head={config.n_head}, "
              f"n_embd={config.n_embd}, vocab={config.vocab_size}); "
              f"{'bf16 mixed precision' if training_args.bf16 else 'fp32'}; "
              f"{'Muon + AdamW' if training_args.muon else training_args.optim}, "
              f"peak lr {training_args.learning_rate:g}; {tokens_per_step:,} tokens/step; MFU against {peak_source}")
        print(f"Eval: {eval_tokens:,} scored validation tokens, {eval_bytes:,} bytes "
              f"({eval_bytes_per_token:.3f} bytes/token) for bits per byte")

    # 8. Train (resuming restores model, optimizer, scheduler, RNG and the position in the data order).
    #    SIGINT/SIGTERM saves a checkpoint at the end of the current step and stops.
    stop = GracefulStopCallback(trainer.accelerator)
    trainer.add_callback(stop)
    with peer_failures.peer_failures_as_user_errors(trainer):  # a dead or hung rank: one line, not a traceback
        trainer.train(resume_from_checkpoint=resume_from)
    stop.exit_if_stopped(training_args)

    # 9. Evaluate (loss, perplexity, bits per byte, --eval_tasks), save a from_pretrained-ready folder with its model
    #    card (README.md) and loss curve, show a sample.
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), {})
    evaluated_at_end = last.get("step") == trainer.state.global_step  # eval_steps divides max_steps: no second pass
    metrics = {k: v for k, v in last.items() if k.startswith("eval_")} if evaluated_at_end else trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    distributed.export_full_model(trainer, training_args.output_dir, tokenizer)
    if training_args.process_index == 0:
        if not evaluated_at_end:  # LossCurveCallback drew it when training ended, before this evaluation
            plot_loss_curve(trainer.state.log_history, os.path.join(training_args.output_dir, "loss_curve.png"))
        sample = generate_sample(training_args.output_dir, training_args.sample_prompt,
                                 training_args.sample_max_new_tokens, training_args.seed)
        write_pretrain_card(training_args, model_args, data_args, config, tokenizer, n_params,
                            trainer.state.global_step, tokens_per_step, metrics, benchmark, sample, push_to_hub)
        print(f"\nModel saved to {os.path.abspath(training_args.output_dir)} (model card: README.md)")
        print(f"Eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}, "
              f"bits per byte {metrics.get('eval_bits_per_byte', float('nan')):.4f}")
        print(f"Sample: {sample!r}")

    # 10. Push the final folder (model, tokenizer, config, loss curve, model card) to the Hub.
    if push_to_hub and training_args.process_index == 0:
        from toolkit.hub import push_folder

        url = push_folder(training_args.output_dir, training_args.hub_model_id,
                          private=bool(training_args.hub_private_repo), token=training_args.hub_token)
        print(f"Pushed to {url}")
    stop.release(training_args)  # a SIGTERM during the final evaluation or save ends the run here, results saved


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
    exit_now()  # skip the interpreter's slow teardown (toolkit/fast_exit.py)
