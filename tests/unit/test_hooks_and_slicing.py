"""The mask hooks (what a mask scales, under every GQA policy; the teacher bypass) and the slicing of every
projection by the export, on tiny in-process models."""

from __future__ import annotations

import copy

import pytest
import torch

import tiny
from maskprune.arch import get_adapter
from maskprune.cut import KeptUnits
from maskprune.export import fold_and_slice_
from maskprune.masks import MaskSet, bypass
from maskprune.structure import Structure

HEAD_DIM = 16  # tiny models: hidden 64, 4 heads


def _inputs_of(model, module, ids):
    seen = []
    h = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize(
    "kind,policy,unit,heads",
    [
        ("llama_mha", "query", (0, 2), [2]),  # MHA: a unit is one head
        ("llama_gqa", "query", (1, 0), [2]),  # row = KV group 1, unit 0 = its first query head (head 2)
        ("llama_gqa", "kv_group", (0, 1), [2, 3]),  # a unit is KV group 1 with both its query heads
    ],
)
def test_a_head_mask_scales_exactly_its_heads_columns_of_o_proj_input(kind, policy, unit, heads):
    model = tiny.make_model(kind)
    adapter = get_adapter("llama")
    s = Structure.of(model, adapter, policy)
    o = adapter.proj(adapter.layers(model)[1], "o")
    ids = torch.randint(0, tiny.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    dense = _inputs_of(model, o, ids)
    masks = MaskSet(s).attach(model)
    with torch.no_grad():
        masks.head[1, unit[0], unit[1]] = 0.25
    masked = _inputs_of(model, o, ids)
    cols = torch.tensor([h * HEAD_DIM + i for h in heads for i in range(HEAD_DIM)])
    others = torch.ones(dense.shape[-1], dtype=torch.bool)
    others[cols] = False
    assert torch.allclose(masked[..., cols], 0.25 * dense[..., cols], atol=1e-6)
    assert torch.equal(masked[..., others], dense[..., others])  # layer 0 is untouched, so its output too
    with bypass(model, masks):  # the teacher sees no mask
        assert torch.equal(_inputs_of(model, o, ids), dense)
    masks.detach()
    assert torch.equal(_inputs_of(model, o, ids), dense)


def test_an_ffn_mask_scales_exactly_its_channel_of_down_proj_input():
    model = tiny.make_model("llama_gqa")
    adapter = get_adapter("llama")
    s = Structure.of(model, adapter, "query")
    down = adapter.proj(adapter.layers(model)[0], "down")
    ids = torch.randint(0, tiny.VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    dense = _inputs_of(model, down, ids)
    masks = MaskSet(s).attach(model)
    with torch.no_grad():
        masks.ffn[0, 0, 7] = 0.0
        masks.ffn[0, 0, 9] = 0.5
    masked = _inputs_of(model, down, ids)
    assert torch.equal(masked[..., 7], torch.zeros_like(dense[..., 7]))
    assert torch.allclose(masked[..., 9], 0.5 * dense[..., 9])
    keep = [i for i in range(dense.shape[-1]) if i not in (7, 9)]
    assert torch.equal(masked[..., keep], dense[..., keep])


@pytest.mark.parametrize("kind,policy", [("llama_bias", "query"), ("llama_gqa", "kv_group"), ("llama_mha", "query")])
def test_the_export_slices_every_projection_and_folds_masks_into_o_and_down(kind, policy):
    model = tiny.make_model(kind)
    original = copy.deepcopy(model)
    adapter = get_adapter("llama")
    s = Structure.of(model, adapter, policy)
    lay = s.head
    gen = torch.Generator().manual_seed(2)
    head_masks = torch.rand(s.num_layers, lay.rows, lay.units_per_row, generator=gen) * 0.5 + 0.5
    ffn_masks = torch.rand(s.num_layers, 1, s.ffn.units_per_row, generator=gen) * 0.5 + 0.5
    kept_head = torch.stack([torch.arange(1, lay.units_per_row).expand(lay.rows, -1)] * s.num_layers)  # unit 0 cut
    kept_ffn = torch.stack(
        [torch.sort(torch.randperm(96, generator=gen)[:60]).values[None] for _ in range(s.num_layers)]
    )
    fold_and_slice_(model, adapter, lay, head_masks, ffn_masks, KeptUnits(kept_head, kept_ffn))
    for li, (new, old) in enumerate(zip(adapter.layers(model), adapter.layers(original))):
        q_keep, kv_keep = lay.kept_heads(kept_head[li])
        qr = torch.tensor([h * HEAD_DIM + i for h in q_keep for i in range(HEAD_DIM)])
        kvr = torch.tensor([h * HEAD_DIM + i for h in kv_keep for i in range(HEAD_DIM)])
        col_scale = lay.query_head_mask(head_masks[li]).repeat_interleave(HEAD_DIM)
        for role, rows in (("q", qr), ("k", kvr), ("v", kvr)):
            p_new, p_old = adapter.proj(new, role), adapter.proj(old, role)
            assert torch.equal(p_new.weight, p_old.weight[rows]), role
            if p_old.bias is not None:
                assert torch.equal(p_new.bias, p_old.bias[rows]), role
        o_new, o_old = adapter.proj(new, "o"), adapter.proj(old, "o")
        assert torch.allclose(o_new.weight, (o_old.weight * col_scale)[:, qr])
        ch = kept_ffn[li, 0]
        for role in ("gate", "up"):
            p_new, p_old = adapter.proj(new, role), adapter.proj(old, role)
            assert torch.equal(p_new.weight, p_old.weight[ch]), role
            if p_old.bias is not None:
                assert torch.equal(p_new.bias, p_old.bias[ch]), role
        d_new, d_old = adapter.proj(new, "down"), adapter.proj(old, "down")
        assert torch.allclose(d_new.weight, (d_old.weight * ffn_masks[li, 0])[:, ch])
        if d_old.bias is not None:  # an output bias is not a unit's: kept whole
            assert torch.equal(d_new.bias, d_old.bias) and torch.equal(o_new.bias, o_old.bias)
    shape = adapter.shape(model.config)
    assert shape["intermediate_size"] == 60 and shape["head_dim"] == HEAD_DIM
    assert shape["num_attention_heads"] == len(lay.kept_heads(kept_head[0])[0])
