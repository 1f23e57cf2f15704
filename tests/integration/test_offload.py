"""Weights that wait on disk (maskprune.offload): a model built with only its small parameters in memory computes
what the loaded model computes, holds one slot at a time in a forward, keeps a change made while held, refuses to
misread one made while it waited, and a streamed cut writes a stock checkpoint and leaves no scratch behind."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tiny
from maskprune.arch import adapter_for
from maskprune.errors import MaskPruneError
from maskprune.export import save_streamed
from maskprune.offload import DiskWeights, held


def _saved(tmp_path, kind: str, tied: bool):
    model = tiny.make_model(kind, tied=tied, layers=3)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    return model, folder


def _build(folder, model, scratch):
    return DiskWeights.build(
        AutoConfig.from_pretrained(folder),
        folder,
        adapter_for(model),
        device="cpu",
        dtype=torch.float32,
        scratch=scratch,
    )


@pytest.mark.parametrize(
    ("kind", "tied"), [("llama_gqa", False), ("gemma3", True), ("smollm3", False), ("qwen2", True)]
)
def test_a_model_on_disk_computes_what_the_loaded_model_does_one_slot_at_a_time(kind, tied, tmp_path):
    model, folder = _saved(tmp_path, kind, tied)
    lazy, store = _build(folder, model, tmp_path / "scratch")
    assert all(p.is_meta for p in lazy.parameters() if p.dim() >= 2)  # no matrix read yet
    assert not any(p.is_meta for p in lazy.parameters() if p.dim() < 2)
    most = []

    def count(*_):
        most.append(sum(s.holders > 0 for s in store.slots))

    handles = [m.register_forward_pre_hook(count) for m in adapter_for(lazy).layers(lazy)]  # after the read
    ids = torch.randint(0, tiny.VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(lazy(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    for h in handles:
        h.remove()
    assert max(most) == 1  # only the layer computing (the embedding let go before the first layer ran)
    assert all(s.holders == 0 for s in store.slots) and all(p.is_meta for p in lazy.parameters() if p.dim() >= 2)
    assert lazy.num_parameters() == model.num_parameters()
    store.close()
    assert not (tmp_path / "scratch").exists()


def test_a_change_made_while_held_is_kept_and_one_made_while_on_disk_is_refused(tmp_path):
    model, folder = _saved(tmp_path, "llama_gqa", False)
    lazy, store = _build(folder, model, tmp_path / "scratch")
    layer = adapter_for(lazy).layers(lazy)[1]
    with held(layer):
        layer.mlp.down_proj.weight.mul_(2.0)  # in place
        layer.self_attn.o_proj.weight = torch.nn.Parameter(layer.self_attn.o_proj.weight[:, :32].clone())  # replaced
        layer.self_attn.o_proj.in_features = 32
    assert store.spills == 1 and layer.mlp.down_proj.weight.is_meta
    with held(layer):
        ref = model.model.layers[1]
        torch.testing.assert_close(layer.mlp.down_proj.weight, 2.0 * ref.mlp.down_proj.weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.self_attn.o_proj.weight, ref.self_attn.o_proj.weight[:, :32], rtol=0, atol=0)
    untouched = adapter_for(lazy).layers(lazy)[2]
    gate = untouched.mlp.gate_proj
    gate.weight = torch.nn.Parameter(gate.weight[:10])  # sliced while it waits on disk: a meta tensor of 10 rows
    with pytest.raises(MaskPruneError, match="changed while its weights waited on disk"):
        with held(untouched):
            pass
    store.close()


def test_a_forward_stopped_by_an_exception_lets_go_of_its_layer(tmp_path):
    """The re-fit stops a layer's forward at the input it needs (an exception from a hook): the layer it read must
    be let go all the same (it was not: every re-fit layer of an 8B model stayed in memory, 0.9 GB each)."""
    model, folder = _saved(tmp_path, "llama_gqa", False)
    lazy, store = _build(folder, model, tmp_path / "scratch")
    layer = adapter_for(lazy).layers(lazy)[1]

    class Stop(Exception):
        pass

    def stop(_m, _args):
        raise Stop

    handle = layer.mlp.down_proj.register_forward_pre_hook(stop)
    hidden = torch.randn(2, 12, 64)
    with held(layer):
        for _ in range(3):
            with pytest.raises(Stop):
                layer(hidden, position_embeddings=lazy.model.rotary_emb(hidden, torch.arange(12)[None]))
    handle.remove()
    assert all(s.holders == 0 for s in store.slots) and layer.mlp.down_proj.weight.is_meta
    store.close()


def test_a_streamed_save_is_a_stock_sharded_checkpoint(tmp_path):
    model, folder = _saved(tmp_path, "gemma3", True)
    lazy, store = _build(folder, model, tmp_path / "scratch")
    out = tmp_path / "out"
    save_streamed(lazy, out, shard_bytes=20_000)  # several shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as save_pretrained does
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, tiny.VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    store.close()


def test_the_streamed_cut_leaves_no_scratch_and_its_export_loads_stock(calib, tmp_path, monkeypatch, capsys):
    from maskprune.cli import main

    model, folder = _saved(tmp_path, "llama_gqa", False)
    tiny.make_tokenizer().save_pretrained(folder)
    scratch = tmp_path / "offload"
    monkeypatch.setenv("MASKPRUNE_OFFLOAD_DIR", str(scratch))
    out = tmp_path / "cut"
    argv = ["-q", "prune", str(folder), "--steps", "0", "--sparsity", "0.3", "--dtype", "fp32", "--no-report"]
    argv += ["--streaming", "on", "--out", str(out), *tiny.small_run(calib, evaluate=False)]
    assert main(argv) == 0, capsys.readouterr().err
    assert scratch.is_dir() and not any(scratch.iterdir())
    report = json.loads((out / "maskprune_report.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.num_parameters() == report["params"]["exported"]
    assert report["roundtrip"]["max_abs_diff"] <= report["roundtrip"]["tolerance"]
