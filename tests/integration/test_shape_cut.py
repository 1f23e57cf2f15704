"""Hidden-width and depth cuts: on a tiny model of every supported family the sliced stock checkpoint computes
what the uncut model emulating the cut computes (tied heads tied, per-layer config lists consistent); the shape
search runs end to end through the CLI; the options are refused where they do not apply."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import tiny
from maskprune.arch import count_parameters, get_adapter
from maskprune.axis_scores import hidden_channel_params, layer_params
from maskprune.cli import main
from maskprune.surgery import cut_parity, drop_layers_, emulated_cut, slice_hidden_

FAMILIES = [
    "llama_gqa",
    "llama_bias",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "granite",
    "smollm3",
    "olmo2",
    "phi3",
]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", FAMILIES)
def test_depth_and_hidden_cuts_export_stock_in_parity(kind, tied, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny.make_model(kind, tied=tied, layers=4)
    adapter = get_adapter(model.config.model_type)
    adapter.unfuse_(model)
    probe = torch.randint(0, tiny.VOCAB, (2, 24))
    keep_hidden = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:40]
    keep_layers = [0, 2, 3]
    ran: list[int] = []  # the projections that compute, by layer: a dropped layer does not run at all
    watch = [
        adapter.proj(layer, "q").register_forward_pre_hook(lambda *_a, i=i: ran.append(i))
        for i, layer in enumerate(adapter.layers(model))
    ]
    with torch.no_grad():
        dense = model(input_ids=probe).logits.float()
        with emulated_cut(model, adapter, keep_layers=keep_layers, keep_hidden=keep_hidden):
            ran.clear()
            reference = model(input_ids=probe).logits.float()
            assert sorted(set(ran)) == keep_layers
    for h in watch:
        h.remove()
    assert "forward" not in adapter.layers(model)[1].__dict__  # the dropped layer's forward is its class's again
    assert (dense - reference).abs().max() > 0.1  # the emulation changes the function: the check below can fail
    cut = copy.deepcopy(model)
    drop_layers_(cut, adapter, keep_layers)
    slice_hidden_(cut, adapter, keep_hidden)
    assert cut_parity(reference, cut, probe) < 1e-5
    adapter.fuse_(cut)
    cut.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert cut_parity(reference, reloaded, probe) < 1e-5
    cfg = reloaded.config
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (40, 3)
    for key, value in cfg.to_dict().items():  # every per-layer list kept consistent
        if isinstance(value, list) and key in ("layer_types", "no_rope_layers"):
            assert len(value) == 3, key
    if tied:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    # the accounting the shape search plans with
    fresh = tiny.make_model(kind, tied=tied, layers=4)
    get_adapter(fresh.config.model_type).unfuse_(fresh)
    assert count_parameters(model) - count_parameters(reloaded) == (
        layer_params(fresh, adapter) + 24 * hidden_channel_params(fresh, adapter, 3)
    )


def test_the_depth_cut_keeps_the_pattern_engines_derive():
    from maskprune.surgery import canonical_layer_pattern, layer_pattern

    model = tiny.make_model("gemma3", layers=12)  # sliding x5, global, sliding x5, global
    assert canonical_layer_pattern(model.config, 6) == layer_pattern(model.config)[:6]
    assert canonical_layer_pattern(tiny.make_model("llama_gqa").config, 1) is None
    smol = tiny.make_model("smollm3", layers=8)
    assert [p[-1] for p in canonical_layer_pattern(smol.config, 4)] == [1, 1, 1, 0]  # every 4th layer NoPE


def test_gemma_layer_pattern_follows_the_kept_layers():
    model = tiny.make_model("gemma3", layers=6)
    model.config.layer_types = ["sliding_attention", "full_attention"] * 3
    adapter = get_adapter(model.config.model_type)
    drop_layers_(model, adapter, [1, 2, 5])
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert [layer.self_attn.layer_idx for layer in adapter.layers(model)] == [0, 1, 2]


@pytest.mark.parametrize("kind", ["llama_gqa", "gemma3", "phi3"])
def test_the_shape_search_cuts_hidden_and_depth_through_the_cli(kind, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    import maskprune.stages.shape as stage

    real = stage.candidate_shapes

    def forced(**kw):  # only shapes that cut the hidden width and a layer: the export must carry both
        return [c for c in real(**kw) if c.drop_layers and c.hidden < 64] or pytest.fail("no such shape")

    monkeypatch.setattr(stage, "candidate_shapes", forced)
    dense = tiny.save_tiny(tmp_path / kind, kind, tied=kind == "gemma3")
    # four layers, so a layer can go at this sparsity
    m = tiny.make_model(kind, tied=kind == "gemma3", layers=4)
    m.save_pretrained(dense)
    calib = tiny.write_calib(tmp_path / "calib.jsonl")
    out = tmp_path / "out"
    argv = ["-q", "prune", str(dense), "--method", "wanda-sp", "--sparsity", "0.45", "--split-search", "--reconstruct"]
    argv += ["--prune-axes", "heads,ffn,hidden,layers", "--hidden-multiple", "4", "--out", str(out)]
    argv += [] if kind == "llama_gqa" else ["--no-report"]  # the figures once
    assert main([*argv, *tiny.small_run(calib)]) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    shape = r["shape_search"]
    assert shape["hidden_size"] < 64 and len(shape["kept_layers"]) < 4 and shape["parity_max_rel_logit_diff"] < 1e-4
    assert r["shape"]["hidden_size"] == shape["hidden_size"] and r["shape"]["dense"]["hidden_size"] == 64
    chosen = min((c for c in shape["candidates"] if c["kl"] is not None), key=lambda c: c["kl"])
    assert (chosen["hidden_size"], chosen["layers"]) == (shape["hidden_size"], len(shape["kept_layers"]))
    assert all(c["nll"] > 0.0 for c in shape["candidates"] if c["kl"] is not None)  # recorded, not ranked on
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == r["params"]["exported"] <= r["params"]["budget"]
    assert r["params"]["dense"] == count_parameters(m) and r["parity"]["max_abs_diff"] <= r["parity"]["tolerance"]
    assert model.config.hidden_size == shape["hidden_size"]
    card = (out / "README.md").read_text()
    assert (
        f"| hidden_size | 64 | {shape['hidden_size']} |" in card
        and f"| layers | 4 | {len(shape['kept_layers'])} " in card
    )
    if kind == "llama_gqa":
        assert "Shape search: " in (out / "report" / "index.html").read_text()


def test_prune_axes_are_checked(tiny_dir, tmp_path, capsys):
    base = ["-q", "prune", str(tiny_dir), "--out", str(tmp_path / "x")]
    assert main([*base, "--prune-axes", "heads,ffn,hidden", "--no-cut-first"]) == 2  # the masked path
    assert "a cut made before training" in capsys.readouterr().err
    assert main([*base, "--prune-axes", "heads,ffn,hidden", "--freeze-share", "0.5"]) == 2  # a learned selection
    assert "a cut made before training" in capsys.readouterr().err
    assert main([*base, "--method", "wanda-sp", "--prune-axes", "heads,hidden"]) == 2
    assert "include ffn" in capsys.readouterr().err
    assert main([*base, "--method", "wanda-sp", "--prune-axes", "heads,ffn,width"]) == 2
    assert "prune_axes must be among" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cut_first_distils_the_sliced_model(tiny_dir, calib, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cf"
    argv = ["-q", "prune", str(tiny_dir), "--cut-first", "--reconstruct", "--steps", "3", "--sparsity", "0.3"]
    argv += ["--prune-axes", "heads,ffn,hidden", "--keep-hidden", "56"]  # a fixed shape, then the recovery
    assert main([*argv, *tiny.small_run(calib), "--no-report", "--out", str(out)]) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    # the default recipe's selection (the wanda-sp prior in one pass, the measured split), cut, re-fit, then
    # every step on the sliced model
    assert r["config"]["method"] == "wanda-sp" and r["calibration"] == "one-pass"
    assert r["shape_search"]["candidates"][0]["k_head"] is not None  # the split measured with the shape
    assert r["config"]["cut_samples"] == r["config"]["prior_samples"]  # the cut scored as the masked path's prior
    assert r["recovery"]["steps"] == 3 and r["reconstruction"]["relative_error"]["down_after"]
    assert r["shape"]["hidden_size"] == 56
    assert r["perplexity"]["before_recovery"] is not None
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == r["params"]["exported"] <= r["params"]["budget"]
    assert not (tmp_path / "cf.cut").exists()


def test_zero_steps_is_the_default_recipes_cut_alone(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "cut"
    argv = ["-q", "prune", str(tiny_dir), "--steps", "0", "--sparsity", "0.3", "--prune-axes", "heads,ffn,hidden"]
    argv += ["--keep-hidden", "56", "--no-report"]
    assert main([*argv, *tiny.small_run(calib, evaluate=False), "--out", str(out)]) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    assert r["config"]["method"] == "wanda-sp" and r["shape"]["hidden_size"] == 56  # cut and shaped
    assert r["reconstruction"]["relative_error"]["down_after"] is not None  # and re-fit
    assert not r.get("recovery") and not (out / "recovery_metrics.jsonl").exists()  # nothing distilled
    assert r["params"]["exported"] <= r["params"]["budget"]
    # where the run learns or distils on the masked model, 0 steps would train nothing: refused, nothing written
    assert main(["-q", "prune", str(tiny_dir), "--steps", "0", "--no-cut-first", "--out", str(tmp_path / "x")]) == 2
    assert "steps must be >= 1, found 0" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cut_first_is_refused_where_the_selection_is_learned(tiny_dir, tmp_path, capsys):
    base = ["-q", "prune", str(tiny_dir), "--cut-first", "--out", str(tmp_path / "x")]
    for extra in (["--recipe", "paper"], ["--freeze-share", "0.5"], ["--method", "flap"]):
        assert main([*base, *extra]) == 2
        assert "cut_first distils the sliced model" in capsys.readouterr().err
    assert main([*base, "--recover-steps", "5"]) == 2
    assert "drop --recover-steps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_narrower_student_needs_equal_widths_only_for_the_layer_mse(tmp_path):
    from maskprune.errors import MaskPruneError
    from maskprune.stages.teacher import check_teacher

    teacher = tiny.make_model("llama_gqa", layers=4)
    student = copy.deepcopy(teacher)
    adapter = get_adapter("llama")
    drop_layers_(student, adapter, [0, 1, 3])
    slice_hidden_(student, adapter, torch.arange(48))
    tok = tiny.make_tokenizer()
    check_teacher(adapter, student, tok, teacher, tok)  # logits only: fine
    with pytest.raises(MaskPruneError, match="layer-wise MSE"):
        check_teacher(adapter, student, tok, teacher, tok, layerwise=True)
    with pytest.raises(MaskPruneError, match="hidden_size: student 64 > teacher 48"):
        check_teacher(adapter, teacher, tok, student, tok)


def test_a_fixed_shape_is_cut_and_an_impossible_one_refused(tiny_dir, calib, tmp_path, capsys):
    base = ["-q", "prune", str(tiny_dir), "--method", "wanda-sp", "--prune-axes", "heads,ffn,hidden,layers"]
    base += [*tiny.small_run(calib, evaluate=False), "--no-report", "--sparsity", "0.4"]
    assert main([*base, "--keep-hidden", "40", "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    r = json.loads((tmp_path / "a" / "maskprune_report.json").read_text())
    assert r["shape"]["hidden_size"] == 40 and [c["hidden_size"] for c in r["shape_search"]["candidates"]] == [40]
    kv = ["--gqa-policy", "kv_group", "--split-search", "--keep-layers", "1", "--out", str(tmp_path / "kv")]
    assert main([*base, "--sparsity", "0.5", *kv]) == 0, capsys.readouterr().err  # the other GQA policy
    r = json.loads((tmp_path / "kv" / "maskprune_report.json").read_text())
    assert r["shape"]["num_hidden_layers"] == 1 and r["shape"]["gqa_policy"] == "kv_group"
    assert main([*base, "--keep-hidden", "48", "--keep-layers", "1", "--out", str(tmp_path / "b")]) == 2
    assert "removes more than the budget" in capsys.readouterr().err
    assert main([*base, "--keep-layers", "1", "--prune-axes", "heads,ffn", "--out", str(tmp_path / "c")]) == 2
    assert "keep_layers must be a positive count with layers in prune_axes" in capsys.readouterr().err
    assert main([*base, "--keep-hidden", "42", "--out", str(tmp_path / "d")]) == 2  # Llama: 4 heads must divide it
    assert "LlamaConfig refuses hidden_size 42" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "bcd")


def test_shape_trials_distil_the_finalists_and_pick_by_kl_after(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["-q", "prune", str(tiny_dir), "--method", "wanda-sp", "--prune-axes", "heads,ffn,hidden,layers"]
    argv += ["--shape-trial-steps", "2", "--shape-finalists", "2", "--sparsity", "0.3", "--no-report"]
    assert main([*argv, *tiny.small_run(calib, evaluate=False), "--out", str(out)]) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    tried = [c for c in r["shape_search"]["candidates"] if "trial_kl" in c]
    assert len(tried) == 2 and all(c["trial_kl"] > 0 for c in tried)
    won = min(tried, key=lambda c: c["trial_kl"])
    assert (won["hidden_size"], won["layers"]) == (r["shape"]["hidden_size"], r["shape"]["num_hidden_layers"])


def test_fit_to_measures_the_kl_and_the_texts_nll_in_one_forward():
    from maskprune.axis_scores import fit_to, kl_to, teacher_logits

    model = tiny.make_model("llama_gqa", layers=2)
    windows = torch.randint(0, tiny.VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    reference = teacher_logits(model, windows, 2, None)
    kl, nll = fit_to(model, windows, reference, 2, direction="teacher_student", autocast=None)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    assert nll == pytest.approx(float(expected), rel=1e-5) and abs(kl) < 1e-2  # its own (bf16-stored) logits
    elsewhere = teacher_logits(model, windows.flip(0), 2, None)  # another window's distributions
    assert kl_to(model, windows, elsewhere, 2, direction="teacher_student", autocast=None) > kl + 1e-3
    assert fit_to(model, windows, reference, 2, direction="teacher_student", autocast=None, nll=False)[1] is None


def test_the_axis_scores_find_a_dead_layer_and_a_loud_channel():
    from maskprune.axis_scores import hidden_channel_scores, layer_skip_kl, teacher_logits

    model = tiny.make_model("llama_gqa", layers=4)
    adapter = get_adapter("llama")
    windows = torch.randint(0, tiny.VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # layer 2 writes nothing to the residual: skipping it changes nothing
        for role in ("o", "down"):
            adapter.proj(adapter.layers(model)[2], role).weight.zero_()
        adapter.embedding(model).weight[:, 5] *= 30.0  # channel 5 dominates the residual stream
    reference = teacher_logits(model, windows, 2, None)
    kl = layer_skip_kl(model, adapter, windows, reference, 2)
    assert int(kl.argmin()) == 2 and float(kl[2]) < 1e-6 < float(kl[0])
    scores, energies = hidden_channel_scores(model, adapter, windows, 2)
    assert int(scores.argmax()) == 5 and len(energies) == 2 * 4 + 1  # two norms per layer, the final one


def test_the_norm_rescale_restores_a_stream_whose_cut_channels_were_empty():
    """Channels that carry nothing are free to cut, except that a norm over the kept ones divides by a larger
    RMS; the rescale by rms(kept) / rms(all) of the calibration input undoes exactly that."""
    from maskprune.axis_scores import hidden_channel_scores
    from maskprune.surgery import rescale_norms_

    model = tiny.make_model("llama_gqa", layers=2)
    adapter = get_adapter("llama")
    cut = torch.arange(40, 64)
    with torch.no_grad():  # nothing ever writes to channels 40..63 of the residual stream
        adapter.embedding(model).weight[:, cut] = 0
        for layer in adapter.layers(model):
            for role in ("o", "down"):
                adapter.proj(layer, role).weight[cut] = 0
    windows = torch.randint(0, tiny.VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    keep = torch.arange(40)
    _, energies = hidden_channel_scores(model, adapter, windows, 2)
    with torch.no_grad():
        dense = model(input_ids=windows).logits
        with emulated_cut(model, adapter, keep_hidden=keep):
            plain = model(input_ids=windows).logits
        rescale_norms_(model, adapter, energies, keep)
        with emulated_cut(model, adapter, keep_hidden=keep):
            rescaled = model(input_ids=windows).logits
    assert (plain - dense).abs().max() > 0.05  # the norms over fewer channels changed the function
    assert (rescaled - dense).abs().max() < 1e-3 * dense.abs().max()


def test_the_search_offers_only_shapes_the_config_accepts(tmp_path, capsys):
    """Llama refuses hidden_size % num_attention_heads != 0 (even with head_dim set): with 3 heads of 16 a width
    of 40 or 44 (multiples of --hidden-multiple 4) would neither save nor load, so the search skips it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = tmp_path / "llama3h"
    cfg = tiny.config_for("llama_mha", layers=3)
    cfg = LlamaConfig(**{**cfg.to_dict(), "hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 3})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dense)
    tiny.make_tokenizer().save_pretrained(dense)
    calib = tiny.write_calib(tmp_path / "calib.jsonl")
    out = tmp_path / "out"
    argv = ["-q", "prune", str(dense), "--method", "wanda-sp", "--sparsity", "0.4", "--split-search", "--no-report"]
    argv += ["--prune-axes", "heads,ffn,hidden", "--hidden-multiple", "4", "--out", str(out)]
    assert main([*argv, *tiny.small_run(calib, evaluate=False)]) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    rows = r["shape_search"]["candidates"]
    assert {c["hidden_size"] for c in rows} >= {48, 36} and all(c["hidden_size"] % 3 == 0 for c in rows)
    assert all(c["hidden_size"] % (3 - c["k_head"]) == 0 for c in rows if c["k_head"] is not None)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size % model.config.num_attention_heads == 0


@pytest.mark.parametrize("kind", ["llama_gqa", "gemma3", "qwen2", "phi3"])
@pytest.mark.parametrize("method", ["wanda-sp", "flap", "magnitude", "taylor"])
def test_a_candidate_ranked_without_a_copy_scores_and_measures_as_its_sliced_copy(kind, method):
    """The shape search emulates each candidate on the dense model (norms rescaled, layers passed through, channels
    zeroed, scores over the kept channels) instead of copying it: the same unit scores, parameter counts and KL
    as the copy cut to the shape."""
    from maskprune.arch import adapter_for
    from maskprune.axis_scores import fit_to, hidden_channel_scores, teacher_logits
    from maskprune.baselines import unit_scores
    from maskprune.cut import hard_masks, kept_indices
    from maskprune.masks import MaskSet
    from maskprune.stages.shape import emulated_shape, meta_twin, reduced_structure, reshape_
    from maskprune.structure import Structure

    model = tiny.make_model(kind, layers=6)
    ad = adapter_for(model)
    ad.unfuse_(model)
    win = torch.randint(0, tiny.VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    reference = teacher_logits(model, win, 2, None)
    channels, energies = hidden_channel_scores(model, ad, win, 2)
    keep_hidden = torch.sort(channels, descending=True).indices[:48].sort().values
    keep_layers = [0, 2, 3, 5]
    dense = Structure.of(model, ad, "query")

    copy_ = copy.deepcopy(model)
    reshape_(copy_, ad, keep_layers, keep_hidden, energies)
    s = Structure.of(copy_, ad, "query")
    assert reduced_structure(meta_twin(model, ad), ad, keep_layers, keep_hidden, "query") == s
    head_c, ffn_c = unit_scores(method, copy_, ad, s, win, batch_size=2)
    kh, kf = 1, 30
    masks = MaskSet(s).attach(copy_)
    masks.set_values_("head", hard_masks(torch.ones_like(head_c), kept_indices(head_c, kh)))
    masks.set_values_("ffn", hard_masks(torch.ones_like(ffn_c), kept_indices(ffn_c, kf)))
    kl_c, nll_c = fit_to(copy_, win, reference, 2, direction="teacher_student", autocast=None)
    masks.detach()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with emulated_shape(model, ad, keep_layers, keep_hidden, energies):
        head_e, ffn_e = unit_scores(method, model, ad, dense, win, batch_size=2, hidden=keep_hidden)
        torch.testing.assert_close(head_e[keep_layers], head_c, rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(ffn_e[keep_layers], ffn_c, rtol=2e-4, atol=1e-6)
        masks = MaskSet(dense).attach(model)
        masks.set_values_("head", hard_masks(torch.ones_like(head_e), kept_indices(head_e, kh)))
        masks.set_values_("ffn", hard_masks(torch.ones_like(ffn_e), kept_indices(ffn_e, kf)))
        kl_e, nll_e = fit_to(model, win, reference, 2, direction="teacher_student", autocast=None)
        masks.detach()
    assert kl_e == pytest.approx(kl_c, rel=1e-4, abs=1e-7) and nll_e == pytest.approx(nll_c, rel=1e-5)
    for k, v in model.state_dict().items():  # the dense model is given back unchanged
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["llama_gqa", "gemma3"])
def test_the_model_ranked_is_the_model_cut(kind, tmp_path, capsys, monkeypatch):
    """Scored once: the shape search scores every candidate's units from one pass over the dense model on the cut's
    windows, and the cut keeps the winner's units. So the exported model (no re-fit) is the model the winning row
    measured: its KL to the dense model on the ranking windows is the row's, and no second scoring pass runs."""
    from transformers import AutoModelForCausalLM

    import maskprune.stages.run as run_stage
    from maskprune.axis_scores import kl_to, teacher_logits

    seen = {}
    real = run_stage.search_shape

    def spy(ctx):
        seen["windows"] = ctx.windows[: ctx.cfg.split_search_samples].clone()
        return real(ctx)

    monkeypatch.setattr(run_stage, "search_shape", spy)
    src = tmp_path / "src"
    tiny.make_model(kind, layers=4).save_pretrained(src)
    tiny.make_tokenizer().save_pretrained(src)
    calib = tiny.write_calib(tmp_path / "calib.jsonl")
    out = tmp_path / "out"
    argv = ["-q", "prune", str(src), "--steps", "0", "--sparsity", "0.3", "--no-reconstruct", "--dtype", "fp32"]
    argv += ["--shape-screen-samples", "0", "--no-report", "--out", str(out), *tiny.small_run(calib, evaluate=False)]
    assert main(argv) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    row = min((c for c in r["shape_search"]["candidates"] if c["kl"] is not None), key=lambda c: c["kl"])
    dense, cut = AutoModelForCausalLM.from_pretrained(src), AutoModelForCausalLM.from_pretrained(out)
    reference = teacher_logits(dense, seen["windows"], 1, None)
    kl = kl_to(cut, seen["windows"], reference, 1, direction="teacher_student", autocast=None)
    assert kl == pytest.approx(row["kl"], rel=1e-4, abs=1e-7)
    assert "score" not in r["seconds"]  # the cut took the ranked units: no scoring pass of its own


def test_the_screen_measures_fully_only_what_can_win(tiny_dir, calib, tmp_path, capsys):
    """The screening pass measures every split on the first window; the splits within the margin of the lowest are
    measured on every window and rank, the others are left out (kl null). The choice is the unscreened one."""
    reports = []
    for screen in ("0", "1"):
        out = tmp_path / screen
        argv = ["-q", "prune", str(tiny_dir), "--steps", "0", "--sparsity", "0.4", "--no-reconstruct", "--no-report"]
        argv += ["--shape-screen-samples", screen, "--shape-screen-margin", "1.2", "--out", str(out)]
        assert main([*argv, *tiny.small_run(calib, evaluate=False)]) == 0, capsys.readouterr().err
        reports.append(json.loads((out / "maskprune_report.json").read_text())["shape_search"])
    full, screened = reports
    assert (screened["hidden_size"], screened["kept_layers"]) == (full["hidden_size"], full["kept_layers"])
    rows = [c for c in screened["candidates"] if c["k_head"] is not None]
    low = min(c["screen_kl"] for c in rows)
    assert any(c["kl"] is None for c in rows), "nothing screened out: the test shows nothing"
    for row, ref in zip(screened["candidates"], full["candidates"]):
        if row["k_head"] is None:
            continue
        assert (row["kl"] is None) == (row["screen_kl"] > 1.2 * low)
        if row["kl"] is not None:
            assert row["windows"] == 4 and row["kl"] == pytest.approx(ref["kl"], rel=1e-5, abs=1e-7)
