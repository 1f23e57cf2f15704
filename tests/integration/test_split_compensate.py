"""The split search (how the budget is divided between heads and FFN channels) and FLAP's bias
compensation, through the library and the CLI on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from maskprune.arch import get_adapter
from maskprune.cli import main
from maskprune.cut import CutPlan, candidate_splits
from maskprune.masks import MaskSet
from maskprune.split import search_split
from maskprune.structure import Structure


def test_split_search_measures_every_candidate_and_restores_the_masks():
    model = tiny.make_model("llama_gqa")
    adapter = get_adapter("llama")
    s = Structure.of(model, adapter, "query")
    masks = MaskSet(s).attach(model)
    masks.set_values_("ffn", torch.full_like(masks.ffn, 0.7))
    gen = torch.Generator().manual_seed(0)
    head_scores, ffn_scores = torch.rand(masks.head.shape, generator=gen), torch.rand(masks.ffn.shape, generator=gen)
    windows = torch.randint(0, tiny.VOCAB, (4, 16), generator=gen)
    cut_both, no_cut = CutPlan(1, 40, 0, 0), CutPlan(0, 0, 0, 0)
    r = search_split(model, masks, head_scores, ffn_scores, [cut_both, no_cut], windows, batch_size=2)
    assert r.tokens == 64 and len(r.losses) == 2
    assert r.losses[1] == pytest.approx(0.0, abs=1e-6) and r.losses[0] > 1e-4  # cutting units costs KL
    assert r.best == no_cut
    assert torch.equal(masks.ffn, torch.full_like(masks.ffn, 0.7)) and torch.equal(
        masks.head, torch.ones_like(masks.head)
    )
    d = r.to_dict()
    assert d["chosen"]["k_head"] == 0 and [c["kl"] for c in d["candidates"]] == list(r.losses)


def test_candidate_splits_all_land_on_the_budget():
    model = tiny.make_model("llama_mha")
    s = Structure.of(model, get_adapter("llama"), "query")
    budget = int(0.6 * s.dense_params)
    cands = candidate_splits(s, budget)
    assert len(cands) >= 2 and [c.k_head for c in cands] == sorted({c.k_head for c in cands})
    step = s.num_layers * s.ffn.params_per_unit
    assert all(budget - step < c.params <= budget for c in cands)


def _prune(tmp_path, kind, *flags):
    model = tiny.save_tiny(tmp_path / "m", kind)
    calib = tiny.write_calib(tmp_path / "c.jsonl")
    out = tmp_path / "o"
    argv = ["-q", "prune", str(model), "--sparsity", "0.3", *tiny.small_run(calib, calib_samples=8)]
    argv += ["--out", str(out), *flags]
    return main(argv), out


@pytest.mark.parametrize("path", [["--no-cut-first"], ["--prune-axes", "heads,ffn"]])
def test_default_learned_run_reports_the_split_it_measured(path, tmp_path, capsys):
    """Masked or cut first, on heads and FFN channels the split is measured and reported (with hidden and
    layers, the shape search's candidates carry every split instead)."""
    code, out = _prune(tmp_path, "llama_mha", "--steps", "2", "--batch-size", "2", "--no-report", *path)
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    cands = r["split_search"]["candidates"]
    assert len(cands) >= 2 and all(c["kl"] >= 0 for c in cands)
    best = min(cands, key=lambda c: (c["kl"], c["k_head"]))
    assert r["cut"]["k_head"] == best["k_head"] == r["split_search"]["chosen"]["k_head"]


def test_flap_compensation_exports_stock_biases_inside_the_budget(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    code, out = _prune(tmp_path, "llama_gqa", "--method", "flap", "--head-cut-fraction", "0.5")
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    comp = r["bias_compensation"]
    assert comp["o_proj"] and comp["down_proj"] and comp["params"] > 0
    assert r["params"]["exported"] == r["cut"]["params"] + comp["params"] <= r["params"]["budget"]
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.mlp_bias and m.config.attention_bias
    layer = m.model.layers[0]
    assert float(layer.mlp.down_proj.bias.abs().max()) > 0 and float(layer.self_attn.o_proj.bias.abs().max()) > 0
    assert float(layer.mlp.up_proj.bias.abs().max()) == 0 and float(layer.self_attn.q_proj.bias.abs().max()) == 0


def test_uncompensated_flap_stays_available(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    code, out = _prune(tmp_path, "llama_gqa", "--method", "flap", "--bias-compensation", "off")
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    assert r["bias_compensation"] is None and r["params"]["exported"] == r["cut"]["params"]
    assert not AutoModelForCausalLM.from_pretrained(out).config.mlp_bias


def test_compensation_the_architecture_cannot_hold_is_refused_before_anything_is_written(tmp_path, capsys):
    code, out = _prune(tmp_path, "qwen2", "--method", "wanda-sp", "--bias-compensation", "on")
    assert code != 0
    err = capsys.readouterr().err
    assert "no down_proj bias" in err and "--bias-compensation" in err
    assert not out.exists()


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_layerwise_scores_see_the_cut_prefix(method):
    """Layer 0 scores as in one pass (its inputs are the dense model's); a later layer's scores change once
    the layers before it are cut; the masks come back at 1."""
    from maskprune.baselines import unit_scores
    from maskprune.compensate import Parts
    from maskprune.sequential import layerwise_scores

    model = tiny.make_model("llama_gqa", layers=3)
    adapter = get_adapter("llama")
    s = Structure.of(model, adapter, "query")
    windows = torch.randint(0, tiny.VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    one_h, one_f = unit_scores(method, model, adapter, s, windows, batch_size=2)
    masks = MaskSet(s).attach(model)
    plan = CutPlan(1, 40, 0, 0)
    h, f, stats = layerwise_scores(method, model, adapter, s, masks, plan, windows, batch_size=2)
    assert h.shape == one_h.shape and f.shape == one_f.shape
    assert torch.allclose(h[0], one_h[0], rtol=1e-4) and torch.allclose(f[0], one_f[0], rtol=1e-4)
    assert not torch.allclose(f[2], one_f[2], rtol=1e-3)
    assert stats["count"] == {0: 64, 1: 64, 2: 64}
    assert torch.equal(masks.ffn, torch.ones_like(masks.ffn)) and torch.equal(masks.head, torch.ones_like(masks.head))
    # nothing cut: every layer sees the dense inputs, so the scores are the one-pass scores
    h0, f0, _ = layerwise_scores(method, model, adapter, s, masks, CutPlan(0, 0, 0, 0), windows, batch_size=2)
    assert torch.allclose(f0, one_f, rtol=1e-4) and torch.allclose(h0, one_h, rtol=1e-4)
    # with the compensation on, the cut prefix's mean contribution is added back: later scores change again
    _, fc, _ = layerwise_scores(
        method, model, adapter, s, masks, plan, windows, batch_size=2, compensate=Parts(True, True)
    )
    assert not torch.allclose(fc[2], f[2], rtol=1e-4)


def test_layerwise_calibration_is_refused_for_metrics_without_activations(tmp_path, capsys):
    code, out = _prune(tmp_path, "llama_gqa", "--method", "taylor", "--layerwise-calibration")
    assert code != 0 and "layerwise_calibration" in capsys.readouterr().err and not out.exists()
