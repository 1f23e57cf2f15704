"""``compile``: the learning step's compiled forward gives the eager forward's logits and gradients.

Whole trajectories are not compared: at the start the distillation loss is ~0, its gradients are rounding
noise, and Adam's first steps (about lr * sign(grad)) turn any reordering of a floating-point sum into a
different path. The forward and backward at a state away from that point are the well-posed comparison.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from maskprune.arch import get_adapter
from maskprune.config import load_config
from maskprune.errors import MaskPruneError
from maskprune.learner import Learner, attach_lora
from maskprune.losses import distillation_loss
from maskprune.masks import MaskSet, bypass
from maskprune.structure import Structure


def _learner() -> Learner:
    torch.manual_seed(0)
    model = tiny.make_model("llama_gqa", layers=2)
    adapter = get_adapter(model.config.model_type)
    structure = Structure.of(model, adapter, "query")
    cfg = load_config(overrides=dict(steps=4, batch_size=2, dtype="fp32", sparsity=0.3, compile=True))
    model = attach_lora(model, adapter, cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    masks = MaskSet(structure).attach(model)
    windows = torch.randint(0, tiny.VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    return Learner(model, masks, windows, cfg, cfg.budget_for(structure.dense_params))


def _loss_and_grads(lrn: Learner, forward, batch: torch.Tensor):
    params = [p for p in lrn.model.parameters() if p.requires_grad] + list(lrn.masks.parameters())
    for p in params:
        p.grad = None
    with torch.no_grad(), bypass(lrn.model, lrn.masks):
        teacher = forward(input_ids=batch, use_cache=False).logits
    student = forward(input_ids=batch, use_cache=False).logits
    loss = distillation_loss(student, teacher, alpha=0.0, labels=batch)["loss"]
    loss.backward()
    return teacher, student, loss.detach(), [p.grad.clone() for p in params]


def test_compiled_forward_and_backward_match_eager():
    torch._dynamo.reset()
    lrn = _learner()
    assert lrn.model is not lrn._forward  # the model itself stays eager for cut, export and evaluation
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from masks = 1, LoRA = 0, where the loss and its gradients vanish
        for p in lrn.masks.parameters():
            p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
        for n, p in lrn.model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    batch = lrn.windows[:2]
    t_e, s_e, l_e, g_e = _loss_and_grads(lrn, lrn.model, batch)
    t_c, s_c, l_c, g_c = _loss_and_grads(lrn, lrn._forward, batch)
    assert float(l_e) > 1e-3  # a real loss, not the noise floor
    torch.testing.assert_close(t_c, t_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_c, s_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l_c, l_e, rtol=1e-4, atol=1e-6)
    assert len(g_c) == len(g_e) > 2
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_compiled_learner_steps_and_reaches_finite_state():
    lrn = _learner()
    for _ in range(4):
        m = lrn.step()
    assert lrn.state.step == 4 and m["loss"] == m["loss"]  # finite, not NaN


def test_compile_refuses_several_processes(monkeypatch):
    from maskprune import distributed as D

    monkeypatch.setattr(D, "world", lambda: 2)
    with pytest.raises(MaskPruneError, match="one process only"):
        _learner()
