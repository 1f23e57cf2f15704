"""docs/method.md invariants 1-4 on tiny in-process models of every supported family."""

from __future__ import annotations

import pytest
import torch

import tiny
from maskprune.arch import ROLES, get_adapter
from maskprune.cut import plan_cut, select_units
from maskprune.export import fold_and_slice_, harden_, masked_logits, save_and_verify
from maskprune.learner import attach_lora
from maskprune.masks import MaskSet, bypass
from maskprune.structure import Structure

CASES = [
    ("llama_mha", False, "query"),
    ("llama_mha", True, "kv_group"),
    ("llama_gqa", False, "query"),
    ("llama_gqa", True, "kv_group"),
    ("llama_bias", False, "query"),
    ("llama_bias", False, "kv_group"),
    ("mistral", False, "query"),
    ("qwen2", True, "query"),
    ("qwen2", False, "kv_group"),
    ("qwen3", False, "kv_group"),
    ("gemma2", True, "query"),
    ("gemma2", True, "kv_group"),
    ("gemma3", True, "query"),
    ("granite", False, "query"),
    ("granite", True, "kv_group"),
    ("smollm3", True, "query"),
    ("smollm3", False, "kv_group"),
    ("olmo2", False, "query"),
    ("olmo2", True, "kv_group"),
    ("phi3", False, "query"),
    ("phi3", True, "kv_group"),
]


def _wrap(model, policy, lora=True):
    adapter = get_adapter(model.config.model_type)
    adapter.unfuse_(model)  # fused families (Phi-3) are run through their parts
    structure = Structure.of(model, adapter, policy)
    if lora:
        model = attach_lora(model, adapter, ROLES, rank=4, alpha=8)
    masks = MaskSet(structure).attach(model)
    return model, masks, structure, adapter


def _ids(n=2, t=12, seed=1):
    return torch.randint(0, tiny.VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,tied,policy", CASES)
def test_all_ones_masks_and_zero_lora_reproduce_the_original(kind, tied, policy):
    original = tiny.make_model(kind, tied=tied)
    ids = _ids()
    with torch.no_grad():
        ref = original(input_ids=ids).logits
    model, masks, _, _ = _wrap(tiny.make_model(kind, tied=tied), policy)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.equal(out, ref) or torch.allclose(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,tied,policy", CASES)
def test_export_reloads_stock_with_the_same_logits_and_uniform_shape(kind, tied, policy, tmp_path):
    from transformers import AutoModelForCausalLM

    model, masks, structure, adapter = _wrap(tiny.make_model(kind, tied=tied), policy)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # learned-looking state: masks in [0, 1], non-zero LoRA
        masks.head.copy_(torch.rand(masks.head.shape, generator=gen))
        masks.ffn.copy_(torch.rand(masks.ffn.shape, generator=gen))
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    budget = int(structure.dense_params * 0.8)
    plan = plan_cut(structure, sigma_head=0.5, budget=budget)
    kept = select_units(masks.head, masks.ffn, plan)
    soft_head, soft_ffn = masks.head.detach().clone(), masks.ffn.detach().clone()
    harden_(masks, kept)
    ids = _ids()
    reference = masked_logits(model, ids)
    with bypass(model, masks), torch.no_grad():
        teacher = model(input_ids=ids).logits
    assert not torch.allclose(teacher, reference, atol=1e-3)  # masks and LoRA change the function

    masks.detach()
    base = model.merge_and_unload()
    fold_and_slice_(base, adapter, structure.head, soft_head, soft_ffn, kept)
    adapter.fuse_(base)
    parity = save_and_verify(base, None, tmp_path, ids, reference, tolerance=1e-5)
    assert parity.max_abs_diff <= 1e-5 * max(1.0, parity.ref_max_abs)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__module__.startswith("transformers.")  # stock class, no code of ours
    cfg = reloaded.config
    assert cfg.head_dim == structure.head.head_dim
    assert cfg.intermediate_size == structure.ffn.units_per_row - plan.k_ffn
    fused = kind == "phi3"
    ffn_name, q_name = ("gate_up_proj.weight", "qkv_proj.weight") if fused else ("gate_proj.weight", "q_proj.weight")
    shapes = {tuple(p.shape) for n, p in reloaded.named_parameters() if ".layers." in n and ffn_name in n}
    assert len(shapes) == 1  # invariant 3: every layer the same shape
    q_shapes = {tuple(p.shape) for n, p in reloaded.named_parameters() if q_name in n}
    q_rows = (cfg.num_attention_heads + (2 * cfg.num_key_value_heads if fused else 0)) * cfg.head_dim
    assert q_shapes == {(q_rows, cfg.hidden_size)}
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    n_params = sum(p.numel() for p in reloaded.parameters())
    assert n_params == plan.params <= budget  # invariant 4
    assert budget - n_params < structure.num_layers * structure.ffn.params_per_unit
    if tied:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("policy", ["query", "kv_group"])
def test_gqa_policies_cut_what_they_promise(policy, tmp_path):
    model, masks, structure, adapter = _wrap(tiny.make_model("llama_gqa"), policy, lora=False)
    plan = plan_cut(structure, sigma_head=0.5, budget=int(structure.dense_params * 0.85))
    kept = select_units(masks.head, masks.ffn, plan)
    masks.detach()
    fold_and_slice_(model, adapter, structure.head, masks.head.detach(), masks.ffn.detach(), kept)
    if policy == "query":  # 4 query heads in 2 groups -> 1 per group, both KV heads stay
        assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    else:  # a whole KV group goes with its 2 query heads
        assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)


def test_masks_hook_the_lora_wrapper_so_the_lora_path_is_masked_too():
    model, masks, _, adapter = _wrap(tiny.make_model("llama_gqa"), "query")
    layer = adapter.layers(model)[0]
    down = adapter.proj(layer, "down")
    assert hasattr(down, "lora_A")  # the hook site is peft's wrapper, not base_layer
    with torch.no_grad():
        for n, p in down.named_parameters():
            if "lora_" in n:
                p.fill_(0.3)
        masks.ffn[0].zero_()
    seen = {}
    adapter.mlp(layer).register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        model(input_ids=_ids())
    assert torch.count_nonzero(seen["out"]) == 0  # base and LoRA paths both silenced


def test_bypass_is_the_unmasked_teacher_without_a_copy():
    original = tiny.make_model("qwen2")
    ids = _ids()
    with torch.no_grad():
        ref = original(input_ids=ids).logits
    n_before = sum(p.numel() for p in original.parameters())
    model, masks, _, _ = _wrap(tiny.make_model("qwen2"), "query")
    with torch.no_grad():
        masks.head.mul_(0.3)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
        with bypass(model, masks):
            teacher = model(input_ids=ids).logits
        student = model(input_ids=ids).logits
    assert torch.allclose(teacher, ref, atol=1e-6)
    assert not torch.allclose(student, ref, atol=1e-3)
    assert masks.enabled
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert base_params == n_before  # one set of weights
