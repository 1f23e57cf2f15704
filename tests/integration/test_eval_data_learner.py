"""Perplexity by hand, data packing, and a short learner run that reaches the budget uniformly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tiny
from maskprune.arch import get_adapter
from maskprune.config import load_config
from maskprune.cut import plan_cut
from maskprune.data import iter_texts, pack_windows, wikitext2_test_text
from maskprune.errors import MaskPruneError
from maskprune.evaluate import perplexity, tokenize_windows
from maskprune.learner import Learner
from maskprune.masks import MaskSet
from maskprune.structure import Structure


class _NoSplit(torch.nn.Module):
    """A causal LM whose head cannot be separated from its decoder: perplexity takes full logits."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kw):
        return self.inner(**kw)


@pytest.mark.parametrize("wrap,chunk", [(False, 7), (False, 4096), (True, 1024)])
def test_perplexity_is_exp_mean_token_nll_over_windows(wrap, chunk):
    inner = tiny.make_model("llama_gqa")
    model = _NoSplit(inner) if wrap else inner
    tok = tiny.make_tokenizer()
    windows, bos = tokenize_windows(tiny.TEXT, tok, 16)
    n_tokens = len(tok(tiny.TEXT)["input_ids"])
    assert windows.shape == (n_tokens // 16, 16)  # remainder dropped
    res = perplexity(model, windows, batch_size=3, max_windows=5, progress=False, chunk_tokens=chunk)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows[:5]:
            logits = inner(input_ids=w[None]).logits[0]
            nll += float(F.cross_entropy(logits[:-1], w[1:], reduction="sum"))
            count += 15
    assert res.tokens_scored == count and res.windows == 5 and res.total_windows == windows.shape[0]
    assert math.isclose(res.ppl, math.exp(nll / count), rel_tol=1e-5)
    assert bos == "none added"


def test_shipped_wikitext_matches_the_hf_loader_layout():
    text = wikitext2_test_text("default")
    rows = text.split("\n\n")
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n")  # rows "", " = Robert Boulter = \n", ""
    assert len(text) > 1_200_000 and rows[0] == ""


def test_pack_windows_and_errors(tmp_path):
    tok = tiny.make_tokenizer()
    w = pack_windows(iter([tiny.TEXT, "", tiny.TEXT]), tok, seq_len=20, num_windows=4)
    assert w.shape == (4, 20) and w.dtype == torch.long
    with pytest.raises(MaskPruneError, match="shorter than one window"):
        pack_windows(iter(["hi"]), tok, seq_len=64, num_windows=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    with pytest.raises(MaskPruneError, match="no string field 'text'"):
        list(iter_texts(str(bad)))
    txt = tmp_path / "a.txt"
    txt.write_text("para one\nline\n\npara two\n")
    assert list(iter_texts(str(txt))) == ["para one\nline\n", "para two\n"]
    assert next(iter_texts("default")).startswith("Beginners BBQ Class")


@pytest.mark.parametrize("kind,policy", [("llama_gqa", "query"), ("qwen2", "kv_group"), ("llama_mha", "query")])
def test_short_learner_run_tracks_the_budget_and_cuts_uniformly(kind, policy):
    torch.manual_seed(0)
    model = tiny.make_model(kind, layers=3)
    adapter = get_adapter(model.config.model_type)
    structure = Structure.of(model, adapter, policy)
    cfg = load_config(
        overrides=dict(
            steps=120,
            batch_size=4,
            dtype="fp32",
            lora=False,
            sparsity=0.3,
            eta1=0.5,
            gqa_policy=policy,
            freeze_share=1.0,
        )
    )  # the minimax loop to the end
    budget = cfg.budget_for(structure.dense_params)
    masks = MaskSet(structure).attach(model)
    windows = torch.randint(0, tiny.VOCAB, (16, 24), generator=torch.Generator().manual_seed(0))
    seen = []
    state = Learner(model, masks, windows, cfg, budget, on_step=seen.append).run()
    assert len(seen) == 120 and state.step == 120
    last = seen[-1]
    assert abs(last["size_ratio"] - last["target_ratio"]) < 0.05  # the multipliers track the budget
    assert state.y > 0
    plan = plan_cut(structure, sigma_head=state.sigma["head"], budget=budget)
    assert plan.params <= budget
    assert (masks.head.detach() >= 0).all() and (masks.ffn.detach() <= 1).all()
    # the masks of the units the cut removes have been driven down
    from maskprune.cut import cut_mass_share, kept_indices

    assert cut_mass_share(masks.ffn, kept_indices(masks.ffn, plan.k_ffn)) < 0.15


def test_learner_under_autocast_skips_peft_input_casts_without_changing_the_forward():
    """peft casts each LoRA input to the adapter's fp32 dtype; under autocast that copy is cast straight back,
    so the learner turns it off: the student's logits must be the same bits either way."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from maskprune.arch import ROLES
    from maskprune.learner import attach_lora

    torch.manual_seed(0)
    base = tiny.make_model("llama_gqa", layers=2).to(torch.bfloat16)
    adapter = get_adapter(base.config.model_type)
    structure = Structure.of(base, adapter, "query")
    model = attach_lora(base, adapter, ROLES, rank=4, alpha=8.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    masks = MaskSet(structure).attach(model)
    windows = torch.randint(0, tiny.VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.lora_A["default"].weight.dtype == torch.float32 for m in layers)

    def logits() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=windows[:2]).logits

    with_cast = logits()
    cfg = load_config(overrides=dict(steps=2, batch_size=2, dtype="bf16", sparsity=0.3))
    learner = Learner(model, masks, windows, cfg, cfg.budget_for(structure.dense_params))
    assert not any(m.cast_input_dtype_enabled for m in layers)
    assert torch.equal(logits(), with_cast)
    learner.run()  # and learning runs with LoRA inputs in bf16 (fp32 adapter weights, cast by autocast)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in layers)
    fp32_cfg = load_config(overrides=dict(steps=1, batch_size=2, dtype="fp32", sparsity=0.3))
    for m in layers:
        m.cast_input_dtype_enabled = True
    Learner(model, masks, windows, fp32_cfg, fp32_cfg.budget_for(structure.dense_params))
    assert all(m.cast_input_dtype_enabled for m in layers)  # without autocast peft's cast is needed and kept


@pytest.mark.parametrize(
    "kind,policy,mask_type",
    [("llama_gqa", "query", "uniform"), ("qwen2", "kv_group", "uniform"), ("llama_mha", "query", "l0")],
)
def test_frozen_selection_is_the_planned_cut_and_only_lora_learns_after(kind, policy, mask_type):
    from maskprune.learner import attach_lora

    torch.manual_seed(0)
    model = tiny.make_model(kind, layers=3)
    adapter = get_adapter(model.config.model_type)
    structure = Structure.of(model, adapter, policy)
    cfg = load_config(
        overrides=dict(
            steps=30,
            batch_size=4,
            dtype="fp32",
            sparsity=0.3,
            gqa_policy=policy,
            freeze_share=0.5,
            warmup_share=0.3,
            mask_type=mask_type,
        )
    )
    budget = cfg.budget_for(structure.dense_params)
    model = attach_lora(model, adapter, cfg.lora_targets, rank=4, alpha=8.0)
    masks = MaskSet(structure, mask_type).attach(model)
    windows = torch.randint(0, tiny.VOCAB, (16, 24), generator=torch.Generator().manual_seed(0))
    seen, snap = [], {}

    def on_step(m):
        seen.append(m)
        if m["step"] == 15:  # the first step after the freeze
            snap["masks"] = {k: p.detach().clone() for k, p in masks.by_kind().items()}
            snap["lora"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}

    learner = Learner(model, masks, windows, cfg, budget, on_step=on_step)
    state = learner.run()
    assert state.frozen_at == 15 and [m["frozen"] for m in seen] == [False] * 15 + [True] * 15
    plan = plan_cut(structure, sigma_head=state.sigma["head"], budget=budget)
    assert plan.params <= budget
    for kind, k in (("head", plan.k_head), ("ffn", plan.k_ffn)):
        p = masks.by_kind()[kind].detach()
        assert ((p == 0).sum(-1) == k).all(), kind  # exactly the planned count in every row
        assert (p[p > 0] <= 1).all()
        assert torch.equal(p, snap["masks"][kind])  # unchanged after the freeze
        assert not masks.by_kind()[kind].requires_grad
    lora_now = {n: p.detach() for n, p in model.named_parameters() if "lora_B" in n}
    assert any(not torch.equal(lora_now[n], snap["lora"][n]) for n in lora_now)  # LoRA still learns
    assert all(m["lr_mask"] == 0.0 for m in seen[15:]) and seen[0]["lr_mask"] == cfg.resolved_mask_lr()


def test_cut_ramp_brings_the_cut_mass_to_zero_by_the_freeze():
    torch.manual_seed(0)
    model = tiny.make_model("llama_gqa", layers=2)
    adapter = get_adapter(model.config.model_type)
    structure = Structure.of(model, adapter, "query")
    cfg = load_config(
        overrides=dict(
            steps=20, batch_size=4, dtype="fp32", sparsity=0.3, lora=False, warmup_share=0.25, freeze_share=0.75
        )
    )
    masks = MaskSet(structure).attach(model)
    windows = torch.randint(0, tiny.VOCAB, (16, 24), generator=torch.Generator().manual_seed(0))
    learner = Learner(model, masks, windows, cfg, cfg.budget_for(structure.dense_params))
    assert [learner.cut_ramp_cap(t) for t in (0, 3)] == [None, None]
    assert [learner.cut_ramp_cap(t) for t in (4, 5, 14, 20)] == [1.0, 0.9, 0.0, 0.0]
    seen = []
    learner.on_step = seen.append
    for _ in range(15):  # up to and including the last step before the freeze
        learner.step()
    from maskprune.cut import cut_mass_share, kept_indices

    k = learner._plan().k_ffn
    assert k > 0 and cut_mass_share(masks.ffn, kept_indices(masks.ffn, k)) == 0.0
    assert load_config(overrides={"recipe": "paper"}).cut_ramp is False
