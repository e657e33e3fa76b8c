"""`--optim muon`: Muon for the hidden weight matrices, AdamW for everything else, as one optimizer.

Muon (Keller Jordan, 2024; the optimizer of modded-nanogpt's record runs) replaces each hidden matrix's update by
its orthogonalized Nesterov momentum (a few Newton-Schulz iterations), which trains GPT-2 faster per step than AdamW;
the embeddings, the tied head and the biases / LayerNorm gains stay on AdamW, as in modded-nanogpt.
docs/benchmarks.md section 3 measures it against AdamW at a fixed CPU budget.

Why not torch.optim.Muon alone: it runs the Newton-Schulz iterations in bf16, which on CPUs without fast bf16 is
20-100x slower than fp32 (docs/benchmarks.md), so here they run in fp32 on CPU and bf16 on GPUs, as Keller's code
does. The update is Keller's (and torch's "original" one): Nesterov momentum 0.95, 5 iterations with the quintic
coefficients below, decoupled weight decay, and the step scaled by sqrt(max(1, fan_out / fan_in)). Muon has its own
learning rate (--muon_learning_rate, 0.05 as in modded-nanogpt and best in our sweep, docs/benchmarks.md); the schedule
scales it with AdamW's. fan_out is read from the layer's layout, so a weight stored as (in, out) (transformers'
Conv1D, GPT-2's layers) gets the same step as the same weight stored as (out, in) (nn.Linear, onefile_train.py).

One optimizer object holds both parts (its AdamW shares the parameter groups and the state dict), so the Trainer's
learning-rate schedule scales both and a checkpoint saves and resumes both.
"""

from __future__ import annotations

import math

import torch

from toolkit.errors import UserError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz, as in Keller Jordan's Muon and torch.optim.Muon
NS_STEPS = 5
MOMENTUM = 0.95


def check_not_sharded(training_args, fsdp: bool) -> None:
    """--optim muon needs whole weight matrices on each rank."""
    if training_args.muon and fsdp:
        raise UserError("--optim muon orthogonalizes whole weight matrices, which FSDP shards across ranks; use it "
                        "with 1 process or DDP, or drop --optim muon under FSDP")


def orthogonalize(update: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U V^T of the update's SVD U S V^T (singular values pushed towards 1) by Newton-Schulz iterations;
    bf16 on GPUs, fp32 on CPU."""
    a, b, c = NS_COEFFICIENTS
    x = update.bfloat16() if update.is_cuda else update.float()
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(update.dtype)


def hidden_matrices(model) -> list[str]:
    """Names of the 2-D weights inside the transformer blocks (GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj)."""
    embeddings = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        embeddings.add(id(model.get_output_embeddings().weight))
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.ndim == 2 and id(p) not in embeddings and ".h." in f".{name}"]


class MuonWithAdamW(torch.optim.Optimizer):
    """The last group: Muon over `muon_params`; the others: AdamW (`adamw_groups`, with their own weight decay).
    AdamW's come first, so the learning rate the Trainer logs (group 0's) is --learning_rate's, as without Muon."""

    def __init__(self, muon_params, adamw_groups, *, lr: float, muon_lr: float, weight_decay: float, betas=(0.9, 0.95),
                 eps: float = 1e-8, fused: bool | None = None, fan_out_dim: int = 0):
        # fan_out_dim: 0 for nn.Linear weights (out, in), 1 for transformers' Conv1D weights (in, out)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=fused)
        muon_group = {"params": list(muon_params), "lr": muon_lr, "weight_decay": weight_decay,
                      "fan_out_dim": fan_out_dim}
        # The same group dicts and state as the AdamW's: the schedule, state_dict and load_state_dict see one
        # optimizer.
        super().__init__([*self.adamw.param_groups, muon_group], {"lr": lr, "weight_decay": weight_decay})
        self.adamw.state = self.state

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # rebuilds the group dicts and the state: share them again
        self.adamw.param_groups = self.param_groups[:-1]
        self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        group = self.param_groups[-1]
        out_dim = group["fan_out_dim"]
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - MOMENTUM)
            update = orthogonalize(p.grad.lerp(buf, MOMENTUM))  # Nesterov
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, p.shape[out_dim] / p.shape[1 - out_dim])))
        self.adamw.step()
        return loss
