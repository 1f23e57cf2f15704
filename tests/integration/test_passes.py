"""The seam where a pass over the model runs (maskprune.passes): every decoder layer gets the arguments the model
itself passes it (Gemma 3's per-type masks and rotary embeddings, SmolLM3's NoPE layers), and a streamed pass
computes what the resident one does."""

from __future__ import annotations

import pytest
import torch

import tiny
from maskprune.arch import adapter_for
from maskprune.baselines import unit_scores
from maskprune.cut import CutPlan
from maskprune.masks import MaskSet
from maskprune.passes import Execution, capture_layer_inputs
from maskprune.sequential import layerwise_scores, reconstruct_layerwise_
from maskprune.structure import Structure

FAMILIES = ["gemma3", "gemma2", "smollm3", "granite", "llama_gqa", "qwen2", "olmo2", "phi3"]


def mixed(kind: str, layers: int = 6):
    """A tiny model of ``kind`` with every kind of layer its family has: 6 layers give Gemma 3 five sliding layers
    and a global one (rope base 10k vs 1M), SmolLM3 a NoPE layer; a sliding window shorter than the windows makes
    the sliding layers' masks differ from the global ones."""
    model = tiny.make_model(kind, layers=layers)
    if hasattr(model.config, "sliding_window") and kind.startswith("gemma"):
        model.config.sliding_window = 6
    adapter = adapter_for(model)
    adapter.unfuse_(model)
    return model, adapter


def test_the_tiny_gemma3_has_both_layer_types_with_their_own_rope():
    model, _ = mixed("gemma3")
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    thetas = {v["rope_theta"] for v in model.config.rope_parameters.values()}
    assert len(thetas) == 2


def _plain_forward_inputs(model, adapter, windows, batch_size):
    """``{layer: [(hidden, kwargs) per batch]}`` as a plain forward of the model passes them."""
    seen: dict[int, list] = {}

    def pre(i):
        def fn(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(i, []).append((h.clone(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        return fn

    handles = [lay.register_forward_pre_hook(pre(i), with_kwargs=True) for i, lay in enumerate(adapter.layers(model))]
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[i : i + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or a == b


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_layer_is_fed_what_a_plain_forward_feeds_it(kind):
    model, adapter = mixed(kind)
    windows = torch.randint(0, tiny.VOCAB, (5, 16))
    seen = _plain_forward_inputs(model, adapter, windows, 2)
    inputs = capture_layer_inputs(model, adapter, windows, 2)
    for li, layer in enumerate(adapter.layers(model)):
        calls = inputs.calls(li)
        assert len(calls) == len(seen[li]) == 3
        for (args, kwargs), (h, ref) in zip(calls, seen[li]):
            assert torch.equal(args[0], h), f"layer {li}: hidden states"
            assert set(kwargs) == set(ref), f"layer {li}: argument names"
            for name, value in ref.items():
                assert _same(kwargs[name], value), f"{kind} layer {li}: {name} differs from the model's own"
        with torch.no_grad():
            inputs.advance_(layer, li)


def test_gemma3_global_and_sliding_layers_get_different_rope_and_masks():
    """The bug the seam must not inherit: layer 0's arguments replayed into every layer."""
    model, adapter = mixed("gemma3")
    inputs = capture_layer_inputs(model, adapter, torch.randint(0, tiny.VOCAB, (2, 16)), 2)
    types = model.config.layer_types
    glob, slid = types.index("full_attention"), types.index("sliding_attention")
    (_, kw_g), (_, kw_s) = inputs.calls(glob)[0], inputs.calls(slid)[0]
    assert not torch.equal(kw_g["position_embeddings"][0], kw_s["position_embeddings"][0])
    assert isinstance(kw_s["attention_mask"], torch.Tensor)  # the window of 6 masks what a causal mask keeps
    assert not _same(kw_g["attention_mask"], kw_s["attention_mask"])


@pytest.mark.parametrize("kind", FAMILIES)
def test_streamed_logits_equal_the_models_own(kind):
    model, adapter = mixed(kind)
    windows = torch.randint(0, tiny.VOCAB, (5, 16))
    with torch.no_grad():
        ref = torch.cat([model(input_ids=windows[i : i + 2], use_cache=False).logits for i in range(0, 5, 2)])
    for ex in (Execution(torch.device("cpu")), Execution(torch.device("cpu"), streamed=True)):
        got = torch.cat([logits for _, logits in ex.logits(model, adapter, windows, 2)])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5, msg=f"{ex.name} {kind}")


@pytest.mark.parametrize("kind", ["gemma3", "smollm3", "llama_gqa"])
def test_every_layer_skip_in_one_streamed_pass_equals_one_pass_per_skip(kind):
    """The streamed layer importance shares the dense prefix and visits each layer once; the resident one runs the
    model once per skipped layer: the same KLs, on every layer type."""
    from maskprune.axis_scores import layer_skip_kl, reference_and_layer_skip_kl, teacher_logits

    model, adapter = mixed(kind)
    windows = torch.randint(0, tiny.VOCAB, (5, 24))
    reference = teacher_logits(model, windows, 2, None)
    cpu = torch.device("cpu")
    one_each = layer_skip_kl(model, adapter, windows, reference, 2, execution=Execution(cpu))
    together = layer_skip_kl(model, adapter, windows, reference, 2, execution=Execution(cpu, streamed=True))
    torch.testing.assert_close(together, one_each, rtol=1e-6, atol=1e-8)
    assert one_each.argmax() == 0  # the tiny models' first layer matters most: the scores are not all alike
    for streamed in (False, True):  # the dense logits from the same pass: the skips' shared prefix, then the head
        own, kls = reference_and_layer_skip_kl(model, adapter, windows, 2, execution=Execution(cpu, streamed=streamed))
        assert len(own) == len(reference)
        for mine, theirs in zip(own, reference):
            assert mine.dtype == theirs.dtype == torch.bfloat16
            torch.testing.assert_close(mine.float(), theirs.float(), rtol=0, atol=0)
        torch.testing.assert_close(kls, one_each, rtol=1e-6, atol=1e-8)


def test_streamed_forward_runs_the_hooks_a_resident_forward_runs():
    from maskprune.axis_scores import hidden_channel_scores

    model, adapter = mixed("gemma3")
    windows = torch.randint(0, tiny.VOCAB, (4, 16))
    scores_r, energies_r = hidden_channel_scores(model, adapter, windows, 2)
    scores_s, energies_s = hidden_channel_scores(
        model, adapter, windows, 2, execution=Execution(torch.device("cpu"), streamed=True)
    )
    torch.testing.assert_close(scores_s, scores_r)
    for a, b in zip(energies_s, energies_r):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_layerwise_scores_with_nothing_cut_are_the_one_pass_scores_on_every_layer_type(method):
    """With nothing cut, each layer's inputs in the layer-by-layer pass are the dense model's, so its scores must be
    the one-pass scores, the global layer's included (wrong rotary or mask there changes them)."""
    model, adapter = mixed("gemma3")
    s = Structure.of(model, adapter, "query")
    windows = torch.randint(0, tiny.VOCAB, (4, 16))
    head, ffn = unit_scores(method, model, adapter, s, windows, batch_size=2)
    masks = MaskSet(s).attach(model)
    try:
        for ex in (Execution(torch.device("cpu")), Execution(torch.device("cpu"), streamed=True)):
            lh, lf, _ = layerwise_scores(
                method, model, adapter, s, masks, CutPlan(0, 0, s.dense_params, s.dense_params), windows,
                batch_size=2, execution=ex,
            )  # fmt: skip
            torch.testing.assert_close(lh, head, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lf, ffn, rtol=1e-5, atol=1e-6)
    finally:
        masks.detach()


def _wanda_cut(model, adapter):
    """``(structure, windows, kept units, attached hard masks)``: a Wanda-sp cut of ``model`` to 1 head unit a row and
    40 FFN channels a layer, on 4 random windows of 16 tokens."""
    from maskprune.cut import KeptUnits, hard_masks, kept_indices

    s = Structure.of(model, adapter, "query")
    windows = torch.randint(0, tiny.VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    head, ffn = unit_scores("wanda-sp", model, adapter, s, windows, batch_size=2)
    kept = KeptUnits(kept_indices(head, 1), kept_indices(ffn, 40))
    masks = MaskSet(s).attach(model)
    masks.set_values_("head", hard_masks(torch.ones_like(head), kept.head))
    masks.set_values_("ffn", hard_masks(torch.ones_like(ffn), kept.ffn))
    return s, windows, kept, masks


def test_streamed_and_resident_refit_give_the_same_weights():
    results = []
    for streamed in (False, True):
        model, adapter = mixed("gemma3")
        s, windows, kept, masks = _wanda_cut(model, adapter)
        ex = Execution(torch.device("cpu"), streamed=streamed)
        reconstruct_layerwise_(model, adapter, s.head, kept, windows, batch_size=2, ridge=1e-3, execution=ex)
        masks.detach()
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_plan_knows_from_the_config_which_families_the_refit_runs_a_third_time(kind):
    """The plan's guess from the module tree (a post-FFN norm) agrees with the re-fit's probe on the weights."""
    from maskprune.sequential import _output_scale
    from maskprune.stages.plan import _ffn_output_normed

    model, adapter = mixed(kind)
    windows = torch.randint(0, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_layer_inputs(model, adapter, windows, 2)
    layer = adapter.layers(model)[0]
    with torch.no_grad():
        scale = _output_scale(layer, adapter.proj(layer, "down"), inputs.calls(0)[0])
    assert _ffn_output_normed(model) == (scale is None)
    if kind == "granite":  # down_proj's output reaches the residual times residual_multiplier
        assert scale == pytest.approx(model.config.residual_multiplier, rel=1e-4)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("kind", ["llama_gqa", "granite", "gemma3"])
def test_the_refit_computes_a_layers_attention_once_and_runs_it_twice_where_down_proj_writes_its_output(
    kind, streamed, monkeypatch
):
    """The re-fit keeps o_proj's input from its first pass and replays the attention from it (through the re-fit
    o_proj) in the later passes: the queries are computed once a layer. Where down_proj's output is added to the
    layer's output (Llama; Granite, times its residual multiplier; not Gemma 3, whose FFN output is normed), the
    layer runs twice, not three times: the next layer's inputs are the down_proj pass's outputs plus
    c (W'_K - W_K) a_K. The weights and errors equal those of computing everything again (MERGE_BYTES 0)."""
    import maskprune.sequential as sq

    results, runs, queries = [], [], []
    for merge in (0, 1 << 30):
        monkeypatch.setattr(sq, "MERGE_BYTES", merge)
        model, adapter = mixed(kind)
        s, windows, kept, masks = _wanda_cut(model, adapter)
        calls = [0, 0]

        def count(k):
            return lambda *_: calls.__setitem__(k, calls[k] + 1)

        handles = [layer.register_forward_pre_hook(count(0)) for layer in adapter.layers(model)]
        handles += [adapter.proj(layer, "q").register_forward_pre_hook(count(1)) for layer in adapter.layers(model)]
        ex = Execution(torch.device("cpu"), streamed=streamed)
        account = reconstruct_layerwise_(model, adapter, s.head, kept, windows, batch_size=2, ridge=1e-3, execution=ex)
        for h in handles:
            h.remove()
        masks.detach()
        runs.append(calls[0])
        queries.append(calls[1])
        results.append(({k: v.clone() for k, v in model.state_dict().items()}, account["relative_error"]))
    for name in results[0][0]:
        # fp32 rounding of the carried states, amplified by fits on 64 tokens: ~1e-4 of the weights
        torch.testing.assert_close(results[1][0][name], results[0][0][name], rtol=1e-3, atol=5e-4, msg=name)
    for key, values in results[0][1].items():
        assert results[1][1][key] == pytest.approx(values, rel=1e-4, abs=1e-9), key
    if kind == "gemma3":  # no rounding where no layer is carried on: the replayed attention is exactly the computed
        for name in results[0][0]:
            assert torch.equal(results[1][0][name], results[0][0][name]), name
    layers, batches = len(adapter.layers(model)), 2
    # the probes: one batch, the layer run 4 times (as is, with its attention replayed, and twice for down_proj's
    # scale), the queries 3 times; each layer is also called once per batch while the first layer's inputs are
    # captured (its forward replaced by a recorder, no queries)
    assert runs[0] == (1 + 3) * layers * batches + 4
    assert queries[0] == 3 * layers * batches + 3
    assert runs[1] == (1 + (3 if kind == "gemma3" else 2)) * layers * batches + 4
    assert queries[1] == layers * batches + 3


@pytest.mark.parametrize("kind", ["gemma3", "llama_gqa"])
def test_the_default_cut_streamed_and_resident_agree_through_the_cli(kind, calib, tmp_path, capsys):
    """The default recipe's cut (shape search over heads, FFN, hidden width and depth; scores; re-fit; export) in
    fp32, with ``--streaming on`` and ``off``: the same shape, kept units, re-fit weights and export."""
    import json

    from maskprune.cli import main

    src = tmp_path / "src"
    model, _ = mixed(kind)
    model.save_pretrained(src)
    tiny.make_tokenizer().save_pretrained(src)
    reports, weights = [], []
    for mode in ("off", "on"):
        out = tmp_path / mode
        argv = ["-q", "prune", str(src), "--steps", "0", "--sparsity", "0.3", "--dtype", "fp32", "--no-report"]
        argv += ["--streaming", mode, "--out", str(out), *tiny.small_run(calib, evaluate=True)]
        assert main(argv) == 0, capsys.readouterr().err
        reports.append(json.loads((out / "maskprune_report.json").read_text()))
        weights.append(_checkpoint_tensors(out))
    resident, streamed = reports
    assert streamed["config"]["streaming"] == "on" and resident["config"]["streaming"] == "off"
    assert streamed["shape"] == resident["shape"]
    assert streamed["shape_search"]["kept_layers"] == resident["shape_search"]["kept_layers"]
    for a, b in zip(streamed["shape_search"]["candidates"], resident["shape_search"]["candidates"]):
        assert (a["kl"] is None) == (b["kl"] is None)  # the same splits screened out
        for key in ("kl", "screen_kl"):
            if b.get(key) is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7)
    assert streamed["perplexity"]["exported"]["ppl"] == pytest.approx(resident["perplexity"]["exported"]["ppl"], 1e-5)
    assert set(weights[0]) == set(weights[1])
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-6, msg=name)


def _checkpoint_tensors(folder) -> dict:
    """Every tensor of a safetensors checkpoint folder, one file or sharded."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
