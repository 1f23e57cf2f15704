"""FLAP's bias compensation: the pure parts (the bias of the cut columns, the parameters it adds)."""

from __future__ import annotations

import pytest
import torch

import tiny
from maskprune.arch import get_adapter
from maskprune.compensate import Parts, bias_delta, compensation_parts, extra_params
from maskprune.cut import CutPlan
from maskprune.errors import MaskPruneError
from maskprune.structure import Structure


def test_bias_delta_is_the_mean_output_of_the_cut_columns():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mean = torch.tensor([0.5, -1.0, 2.0])
    # columns 0 and 2 kept: only column 1 is cut -> W[:, 1] * mean[1]
    assert torch.equal(bias_delta(w, mean, torch.tensor([0, 2])), torch.tensor([-2.0, -5.0]))
    # nothing kept: the whole product; everything kept: zero
    assert torch.allclose(bias_delta(w, mean, torch.tensor([], dtype=torch.long)), w @ mean)
    assert torch.equal(bias_delta(w, mean, torch.arange(3)), torch.zeros(2))


def test_parts_follow_the_mode_the_method_and_the_architecture():
    llama, qwen2 = get_adapter("llama"), get_adapter("qwen2")
    both = CutPlan(k_head=1, k_ffn=10, params=0, budget=0)
    ffn_only = CutPlan(k_head=0, k_ffn=10, params=0, budget=0)
    assert compensation_parts("auto", "flap", llama, both) == Parts(True, True)
    assert compensation_parts("auto", "flap", llama, ffn_only) == Parts(False, True)  # no head cut: no o bias
    assert compensation_parts("auto", "wanda-sp", llama, both) == Parts(False, False)  # auto: FLAP only
    assert compensation_parts("on", "wanda-sp", llama, both) == Parts(True, True)
    assert compensation_parts("off", "flap", llama, both) == Parts(False, False)
    assert compensation_parts("auto", "flap", qwen2, both) == Parts(False, False)  # nothing it can hold
    with pytest.raises(MaskPruneError, match="no down_proj bias"):
        compensation_parts("on", "flap", qwen2, ffn_only)


@pytest.mark.parametrize("kind,policy", [("llama_gqa", "query"), ("llama_mha", "query"), ("llama_gqa", "kv_group")])
def test_extra_params_count_every_bias_the_stock_config_adds(kind, policy):
    model = tiny.make_model(kind)
    adapter = get_adapter("llama")
    s = Structure.of(model, adapter, policy)
    plan = CutPlan(k_head=1, k_ffn=7, params=0, budget=0)
    n_q, n_kv = {("llama_gqa", "query"): (2, 2), ("llama_mha", "query"): (3, 3), ("llama_gqa", "kv_group"): (2, 1)}[
        (kind, policy)
    ]
    hidden, d, layers = 64, s.head.head_dim, s.num_layers
    assert extra_params(s, model.config, adapter, Parts(False, True), plan) == layers * (2 * (96 - 7) + hidden)
    assert extra_params(s, model.config, adapter, Parts(True, False), plan) == layers * ((n_q + 2 * n_kv) * d + hidden)
    model.config.mlp_bias = True  # biases the dense model has already cost nothing extra
    assert extra_params(s, model.config, adapter, Parts(False, True), plan) == 0
