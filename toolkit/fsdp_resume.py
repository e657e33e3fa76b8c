"""Resume under FSDP2 from a checkpoint written without FSDP (one process or DDP): the run that grows onto more ranks.

The Trainer reads FSDP checkpoints only in the layout FSDP wrote them (`pytorch_model_fsdp_0/`, `optimizer_0/`), so
a one-process or DDP checkpoint (model.safetensors, optimizer.pt) fails under FSDP. Here the full tensors are read on
every rank and torch.distributed.checkpoint's `set_model_state_dict` / `set_optimizer_state_dict` keep each rank's
shard. The plain optimizer state is keyed by parameter index; the resumed run builds its optimizer from the same
parameters in the same groups and order (the Trainer's create_optimizer), so the index of each state is the position
of its parameter in this optimizer's groups, and it is re-keyed by the parameter's name. The other way (FSDP shards
into a run without FSDP) stays refused by toolkit.run_dir.check_resume_batch.
"""

from __future__ import annotations

import os

import torch

from toolkit.errors import UserError


def is_plain_checkpoint(checkpoint: str) -> bool:
    """Full weights (model.safetensors) and no FSDP shards: written by one process or DDP."""
    names = os.listdir(checkpoint)
    return "model.safetensors" in names and not any(n.startswith(("pytorch_model_fsdp", "optimizer_")) for n in names)


def plain_optimizer_as_full(saved: dict, optimizer, model) -> dict:
    """A plain optimizer state dict (keyed by parameter index) keyed by parameter name instead, as
    set_optimizer_state_dict(full_state_dict=True) takes it, for an optimizer over the same parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    if len(saved["param_groups"]) != len(optimizer.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved["param_groups"], optimizer.param_groups)):
        raise UserError("the checkpoint's optimizer has other parameter groups than this run's (another --optim or "
                        "model?); resume with the options of the run that wrote it")
    full = {"state": {}, "param_groups": []}
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups):
        fqns = [names[id(p)] for p in group["params"]]
        for fqn, index in zip(fqns, saved_group["params"]):
            if index in saved["state"]:
                full["state"][fqn] = saved["state"][index]
        full["param_groups"].append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": fqns})
    return full


class PlainCheckpointIntoFSDP:
    """Trainer mixin (PretrainTrainer): under FSDP, a plain checkpoint's weights, optimizer and schedule are loaded
    into the sharded model; everything else goes to the Trainer. Put it before the Trainer class in the bases."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not (self.is_fsdp_enabled and is_plain_checkpoint(resume_from_checkpoint)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        weights = load_file(os.path.join(resume_from_checkpoint, "model.safetensors"))
        # strict=False: save_pretrained stores a tied weight once (lm_head.weight is transformer.wte.weight)
        set_model_state_dict(model if model is not None else self.model_wrapped, weights,
                             options=StateDictOptions(full_state_dict=True, strict=False))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or not (self.is_fsdp_enabled and is_plain_checkpoint(checkpoint)):
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper holds torch's
        saved = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model_wrapped, optimizer, plain_optimizer_as_full(saved, optimizer, self.model),
                                 options=StateDictOptions(full_state_dict=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))
