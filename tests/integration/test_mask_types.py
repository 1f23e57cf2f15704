"""L0 and polarization masks inside the same minimax loop (paper table 3): their gates, and each
type through the whole CLI to a stock, uniform checkpoint within the budget."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from maskprune import minimax
from maskprune.arch import get_adapter
from maskprune.cli import main
from maskprune.masks import (
    L0_INIT,
    POLARIZATION_EPS,
    MaskSet,
    Structure,
    hard_concrete_mean,
    hard_concrete_sample,
    polarized,
)


def test_gates_start_at_one_and_stay_in_the_unit_interval():
    la = torch.full((1000,), L0_INIT)
    assert torch.equal(hard_concrete_mean(la), torch.ones(1000))
    x = torch.linspace(-8, 8, 1000, requires_grad=True)
    g = hard_concrete_sample(x)
    assert (g >= 0).all() and (g <= 1).all() and 0 < float((g == 0).float().mean()) < 1  # exact zeros occur
    g.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0  # reparameterised: differentiable
    theta = torch.linspace(0, 1, 11)
    p = polarized(theta, 1e-2)
    assert float(p[0]) == 0.0 and float(p[-1]) == pytest.approx(1 / 1.01) and (p.diff() > 0).all()
    assert float(polarized(torch.tensor(0.05), POLARIZATION_EPS[1])) > 0.99  # small eps polarises


def test_sparsity_penalty_pulls_only_on_the_k_smallest():
    v = torch.tensor([[0.9, 0.1, 0.5, 0.2]], requires_grad=True)
    pen = minimax.sparsity_penalty(v, 2)
    assert float(pen.detach()) == pytest.approx((0.1**2 + 0.2**2) / 4)
    pen.backward()
    assert torch.allclose(v.grad, torch.tensor([[0.0, 0.05, 0.0, 0.1]]))
    assert float(minimax.sparsity_penalty(v.detach(), 0)) == 0.0
    assert minimax.geometric_schedule(0, 5, 1e-2, 1e-4) == pytest.approx(1e-2)
    assert minimax.geometric_schedule(4, 5, 1e-2, 1e-4) == pytest.approx(1e-4)
    assert minimax.geometric_schedule(2, 5, 1e-2, 1e-4) == pytest.approx(1e-3)


def test_l0_samples_only_in_training_and_materialize_gives_the_deterministic_values():
    model = tiny.make_model("llama_gqa")
    s = Structure.of(model, get_adapter("llama"), "query")
    masks = MaskSet(s, "l0").attach(model)
    with torch.no_grad():
        masks.ffn.normal_(0.0, 2.0)
    ids = torch.randint(0, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert torch.equal(a, b)  # eval: deterministic gates
        masks.train()
        c = model(input_ids=ids).logits
        masks.eval()
        assert not torch.allclose(a, c)  # training: sampled gates
    expected = hard_concrete_mean(masks.ffn.detach().clone())
    masks.materialize_()
    assert masks.mask_type == "uniform" and torch.equal(masks.ffn.detach(), expected)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, a, atol=1e-6)  # same function after


@pytest.mark.parametrize("mask_type", ["l0", "polarization"])
def test_each_mask_type_prunes_to_a_stock_uniform_checkpoint(mask_type, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    calib = tiny.write_calib(tmp_path / "c.jsonl")
    out = tmp_path / "o"
    code = main(
        [
            "-q",
            "prune",
            str(model),
            "--mask-type",
            mask_type,
            "--sparsity",
            "0.3",
            "--steps",
            "60",
            *tiny.small_run(calib),
            "--dtype",
            "fp32",
            "--no-report",
            "--freeze-share",  # the mask-type comparison is of the learned loop (the paper's table 3)
            "1",
            "--mask-init",
            "ones",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    assert r["config"]["mask_type"] == mask_type
    assert r["params"]["budget"] - 3 * 64 * 2 < r["params"]["exported"] <= r["params"]["budget"]
    assert r["parity"]["max_abs_diff"] <= r["parity"]["tolerance"]
    soft = torch.load(out / "masks.pt")
    assert all(((m >= 0) & (m <= 1)).all() for m in soft.values())  # values, not log-alphas
    m = AutoModelForCausalLM.from_pretrained(out)
    assert len({tuple(layer.mlp.up_proj.weight.shape) for layer in m.model.layers}) == 1
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["y"] > 0  # the sparsity multiplier rose: the minimax loop ran on these gates


def test_mask_type_is_refused_with_a_baseline(tmp_path, capsys):
    code = main(["prune", "--method", "magnitude", "--mask-type", "l0", "--out", str(tmp_path / "o")])
    assert code == 2 and "applies to the learned method only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
