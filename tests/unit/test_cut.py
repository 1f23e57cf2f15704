"""The uniform cut: budget within one unit, kept units by magnitude."""

import pytest
import torch

from maskprune.arch import FFNLayout, HeadLayout, get_adapter
from maskprune.cut import cut_mass_share, hard_masks, kept_indices, plan_cut
from maskprune.errors import MaskPruneError
from maskprune.structure import Structure


def _structure(ffn_units=96, heads=4, kv=2, policy="query", layers=3, dense=100_000):
    head = HeadLayout(
        kind="head",
        rows=kv if policy == "query" else 1,
        units_per_row=heads // kv if policy == "query" else kv,
        params_per_unit=2048,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=16,
        policy=policy,
    )
    ffn = FFNLayout(kind="ffn", rows=1, units_per_row=ffn_units, params_per_unit=192)
    return Structure(get_adapter("llama"), head, ffn, layers, dense)


@pytest.mark.parametrize("ratio", [0.95, 0.8, 0.7, 0.55])
@pytest.mark.parametrize("sigma_head", [0.0, 0.5])
def test_plan_meets_budget_within_one_unit(ratio, sigma_head):
    s = _structure()
    budget = int(s.dense_params * ratio)
    plan = plan_cut(s, sigma_head=sigma_head, budget=budget)
    unit = s.num_layers * s.ffn.params_per_unit
    assert plan.params <= budget
    assert budget - plan.params < unit
    assert plan.params == s.params_after(plan.k_head, plan.k_ffn)


def test_plan_cuts_more_heads_when_ffn_alone_cannot_reach():
    s = _structure()
    budget = int(s.params_after(0, s.ffn.units_per_row - 1)) - 10  # beyond what FFN can remove
    plan = plan_cut(s, sigma_head=0.0, budget=budget)
    assert plan.k_head == 1 and plan.params <= budget


def test_plan_rounds_kept_counts_to_multiples():
    s = _structure()
    plan = plan_cut(s, sigma_head=0.0, budget=int(s.dense_params * 0.8), ffn_multiple=8)
    assert (s.ffn.units_per_row - plan.k_ffn) % 8 == 0
    assert plan.params <= plan.budget
    assert plan.budget - plan.params < 8 * s.num_layers * s.ffn.params_per_unit


def test_unreachable_budget_is_refused_with_the_floor():
    s = _structure()
    with pytest.raises(MaskPruneError, match="at least .* parameters"):
        plan_cut(s, sigma_head=0.0, budget=s.min_params() - 1)


def test_kept_indices_keep_the_largest_and_hard_masks_zero_the_rest():
    m = torch.tensor([[[0.9, 0.1, 0.5, 0.3]], [[0.0, 1.0, 0.2, 0.6]]])  # [L=2, rows=1, U=4]
    kept = kept_indices(m, 2)
    assert kept.tolist() == [[[0, 2]], [[1, 3]]]
    hard = hard_masks(m, kept)
    assert torch.allclose(hard, torch.tensor([[[0.9, 0.0, 0.5, 0.0]], [[0.0, 1.0, 0.0, 0.6]]]))
    share = cut_mass_share(m, kept)
    assert share == pytest.approx((0.1 + 0.3 + 0.0 + 0.2) / (1.8 + 1.8))


def test_cut_mass_is_exactly_zero_when_the_cut_masks_are():
    """Summed directly over the cut units: no rounding residue from total minus kept (9e-8 on some CPUs)."""
    m = torch.rand(30, 1, 1536, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.9
    kept = kept_indices(m, 1000)
    assert cut_mass_share(hard_masks(m, kept), kept) == 0.0


def test_candidate_shapes_share_the_removal_and_stay_above_the_budget():
    from maskprune.cut import candidate_shapes

    def hidden_params(layers):
        return 1000 + 50 * layers

    kw = dict(removed=20_000, num_layers=10, hidden=64, layer_params=3_000, hidden_params=hidden_params)
    only = candidate_shapes(**kw, axes=("heads", "ffn"))
    assert [(c.drop_layers, c.hidden) for c in only] == [(0, 64)]
    both = candidate_shapes(**kw, axes=("ffn", "hidden", "layers"), hidden_multiple=4)
    assert (0, 64) in [(c.drop_layers, c.hidden) for c in both]
    for c in both:
        assert c.layer_share + c.hidden_share <= 1.0
        removed = c.drop_layers * 3_000 + (64 - c.hidden) * hidden_params(10 - c.drop_layers)
        assert removed <= 20_000 and c.hidden % 4 == 0
    assert max(c.drop_layers for c in both) == 6  # all of it: 20000 // 3000
    assert min(c.hidden for c in both) == 52  # 20000 // 1500 = 13 channels, rounded to keep 52
    assert len({(c.drop_layers, c.hidden) for c in both}) == len(both)


def test_best_layer_subsequence_keeps_the_pattern_or_the_top_scores():
    from maskprune.cut import best_layer_subsequence

    scores = [5.0, 1.0, 4.0, 2.0, 3.0, 0.5]
    flat = [()] * 6
    assert best_layer_subsequence(scores, flat, [()] * 4) == [0, 2, 3, 4]  # no pattern: the top four
    gemma = ["s", "s", "f", "s", "s", "f"]  # every third layer global, as such a family derives it
    assert best_layer_subsequence(scores, gemma, ["s", "s", "f"]) == [0, 1, 2]  # 5 + 1 + 4 beats 5 + 3 + 0.5
    assert best_layer_subsequence([0.0, 9.0, 0.0, 8.0, 9.5, 0.0], gemma, ["s", "s", "f"]) == [1, 4, 5]
    assert best_layer_subsequence(scores, gemma, ["f", "f", "f"]) is None


def test_only_shapes_the_family_config_accepts_are_planned():
    """Llama's and Gemma's configs refuse a hidden size that is not a multiple of the head count (even with an
    explicit head_dim): such a checkpoint neither saves nor loads, so the cut must never choose it."""
    from transformers import LlamaConfig, Qwen2Config

    from maskprune.cut import candidate_shapes, feasible_plans
    from maskprune.structure import _head_cuts
    from maskprune.surgery import config_accepts

    llama = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96)
    assert config_accepts(llama, hidden_size=48) and not config_accepts(llama, hidden_size=50)
    assert not config_accepts(llama, num_attention_heads=3, num_key_value_heads=3, head_dim=16)
    qwen = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96)
    assert config_accepts(qwen, num_attention_heads=3, num_key_value_heads=3, head_dim=16)

    mha = HeadLayout(
        kind="head",
        rows=1,
        units_per_row=4,
        params_per_unit=2048,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
    )
    assert [mha.heads_after(k) for k in range(4)] == [(4, 4), (3, 3), (2, 2), (1, 1)]
    assert _head_cuts(llama, mha) == (0, 2, 3)  # 3 heads do not divide 64
    assert _head_cuts(qwen, mha) is None
    gqa = _structure(heads=4, kv=2, policy="kv_group")
    assert gqa.head.heads_after(1) == (2, 1)
    s = _structure(heads=4, kv=4)
    s = Structure(s.adapter, mha, s.ffn, s.num_layers, s.dense_params, _head_cuts(llama, mha))
    plans = feasible_plans(s, 80_000)
    assert plans and 1 not in [p.k_head for p in plans]

    shapes = candidate_shapes(
        removed=20_000,
        num_layers=10,
        hidden=576,
        layer_params=3_000,
        hidden_params=lambda layers: 100,
        axes=("ffn", "hidden"),
        hidden_multiple=8,
        hidden_ok=lambda width: width % 9 == 0,
    )
    assert shapes and all(c.hidden % 72 == 0 for c in shapes)  # 8-multiples of 9 heads
