"""--optim muon (toolkit/muon.py): the orthogonalized update, which parameters get it, and one optimizer object that
checkpoints and resumes both its parts exactly."""

from __future__ import annotations

import pytest
import torch


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_orthogonalized_update_has_singular_values_near_one_and_ignores_layout():
    from toolkit.muon import orthogonalize

    torch.manual_seed(0)
    for shape in [(32, 96), (96, 32), (64, 64)]:
        g = torch.randn(shape) * 1e-3  # the scale does not matter; a square Gaussian matrix is badly conditioned
        s = torch.linalg.svdvals(orthogonalize(g))
        assert 0.45 < s.min() and s.max() < 1.6, (shape, s.min(), s.max())  # Keller's quintic: S' ~ U(0.5, 1.5)
        # transformers' Conv1D stores (in, out), nn.Linear (out, in): the same update either way
        torch.testing.assert_close(orthogonalize(g.T), orthogonalize(g).T, atol=1e-6, rtol=0)


def test_hidden_matrices_go_to_muon_embeddings_and_gains_to_adamw():
    from toolkit.muon import hidden_matrices

    names = hidden_matrices(_tiny_gpt2())
    assert len(names) == 2 * 4 and all(n.startswith("transformer.h.") and n.endswith(".weight") for n in names)
    assert {n.split(".", 3)[3] for n in names} == {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                                  "mlp.c_proj.weight"}


def _optimizer(model):
    from toolkit.muon import MuonWithAdamW, hidden_matrices

    hidden = set(hidden_matrices(model))
    named = list(model.named_parameters())
    return MuonWithAdamW([p for n, p in named if n in hidden],
                         [{"params": [p for n, p in named if n not in hidden], "weight_decay": 0.1}],
                         lr=1e-2, muon_lr=0.05, weight_decay=0.1, fan_out_dim=1)


def _steps(model, optimizer, n, start):
    for step in range(start, start + n):
        ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(step))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_one_state_dict_resumes_both_parts_exactly_and_the_schedule_reaches_both():
    full, model = _tiny_gpt2(), _tiny_gpt2()
    opt_full = _optimizer(full)
    _steps(full, opt_full, 6, 0)

    opt = _optimizer(model)
    _steps(model, opt, 3, 0)
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}
    assert len(saved["optimizer"]["state"]) == sum(1 for p in model.parameters())  # Muon momentum + AdamW moments
    resumed = _tiny_gpt2()
    resumed.load_state_dict(saved["model"])
    opt2 = _optimizer(resumed)
    opt2.load_state_dict(saved["optimizer"])
    _steps(resumed, opt2, 3, 3)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

    # a learning-rate schedule sets every group, the AdamW's included
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 0.5)
    scheduler.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([5e-3, 0.025])  # AdamW's first: the logged lr
    assert opt2.adamw.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_the_step_does_not_depend_on_the_weight_layout():
    """GPT-2's Conv1D stores (in, out), nn.Linear (out, in): the same weight and gradient get the same step, and the
    wide layer's step is sqrt(fan_out / fan_in) = sqrt(3) times larger than a square one's (Keller's scaling)."""
    from toolkit.muon import MuonWithAdamW

    torch.manual_seed(0)
    weight, grad = torch.randn(96, 32), torch.randn(96, 32)
    linear, conv1d = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.T.clone())
    linear.grad, conv1d.grad = grad.clone(), grad.T.clone()
    for p, out_dim in ((linear, 0), (conv1d, 1)):
        gain = torch.nn.Parameter(torch.ones(3))  # AdamW's part, not under test here
        MuonWithAdamW([p], [{"params": [gain]}], lr=1e-3, muon_lr=0.05, weight_decay=0.0, fan_out_dim=out_dim).step()
    torch.testing.assert_close(conv1d.detach().T, linear.detach(), atol=1e-6, rtol=0)
    from toolkit.muon import orthogonalize

    step = (weight - linear.detach()).norm() / orthogonalize(grad).norm()  # the iterations ignore the update's scale
    assert float(step) == pytest.approx(0.05 * 3**0.5, rel=1e-5)
