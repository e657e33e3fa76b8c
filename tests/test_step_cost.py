"""What a training step computes, counted: a cost that comes back (an extra LM-head pass, trl's per-token metrics)
fails here before it shows up as a slower benchmark."""

from __future__ import annotations

import pytest
import torch


def _lora_trainer(tiny_model_dir, text_file, tmp_path, **config):
    from toolkit import finetune, lora, model_loading
    from toolkit.args.finetune import DataArguments, FinetuneConfig, LoraArguments
    from toolkit.data.sft import load_sft_datasets
    from toolkit.tokenizer import load_tokenizer

    args = FinetuneConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_length=32, **config)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    train, evaluation, fmt = load_sft_datasets(DataArguments(train_file=str(text_file)), seed=0)
    model = model_loading.load_model(str(tiny_model_dir))
    finetune.prepare_for_data(args, fmt, tokenizer, model.config)
    return finetune.make_trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                 processing_class=tokenizer,
                                 peft_config=lora.build_lora_config(LoraArguments(lora_r=2), model, quantized=False))


def _count_head_work(trainer, monkeypatch) -> dict:
    """One training step (forward + backward); how often the LM head ran as a module and trl's chunked head ran."""
    import trl.trainer.utils as trl_utils

    counts = {"lm_head": 0, "trl_chunked_forward": 0, "trl_chunked_backward": 0}
    head = trainer.model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda *_: counts.__setitem__("lm_head", counts["lm_head"] + 1))
    chunked = trl_utils._ChunkedLogProbFunction
    forward, backward = chunked.forward, chunked.backward

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return staticmethod(wrapper)

    monkeypatch.setattr(chunked, "forward", counted("trl_chunked_forward", forward))
    monkeypatch.setattr(chunked, "backward", counted("trl_chunked_backward", backward))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    try:
        loss = trainer.training_step(trainer.model, dict(batch))
    finally:
        handle.remove()
    counts["loss"] = float(loss)
    counts["input_ids"] = batch["input_ids"]
    return counts


def test_fine_tuning_step_runs_the_lm_head_once_and_no_trl_metrics_by_default(
        tmp_path, tiny_model_dir, small_text_file, monkeypatch):
    default = _count_head_work(_lora_trainer(tiny_model_dir, small_text_file, tmp_path), monkeypatch)
    assert (default["lm_head"], default["trl_chunked_forward"], default["trl_chunked_backward"]) == (1, 0, 0)

    # --token_metrics: trl's fused head (it projects again in the backward pass to save the logits' memory) and its
    # entropy / top-1 accuracy in the logs; the loss is the same number either way
    torch.manual_seed(0)
    trainer = _lora_trainer(tiny_model_dir, small_text_file, tmp_path, token_metrics=True)
    metrics = _count_head_work(trainer, monkeypatch)
    assert metrics["trl_chunked_forward"] == 1 and metrics["trl_chunked_backward"] == 1 and metrics["lm_head"] == 0
    assert trainer._metrics["train"]["mean_token_accuracy"] and trainer._metrics["train"]["entropy"]
    assert torch.equal(metrics["input_ids"], default["input_ids"])
    assert metrics["loss"] == pytest.approx(default["loss"], rel=1e-5)
