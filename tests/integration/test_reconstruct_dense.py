"""The cross-model re-fit (``--reconstruct-target dense``): exact where nothing is cut, closer to the dense
model's residual where layers and channels are cut, the residual probe right per family, and end to end through
the CLI with a stock export in parity."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import tiny
from maskprune.arch import adapter_for
from maskprune.cli import main
from maskprune.cut import KeptUnits
from maskprune.masks import MaskSet
from maskprune.passes import capture_layer_inputs
from maskprune.sequential import reconstruct_to_dense_
from maskprune.stages.shape import reshape_
from maskprune.structure import Structure


def _student(kind: str, keep_layers: list[int], keep_hidden: torch.Tensor):
    """A tiny dense model, and its copy cut to ``keep_layers`` / ``keep_hidden`` with every head and FFN channel
    kept (masks at 1 attached), its structure and kept units."""
    dense = tiny.make_model(kind, layers=3)
    adapter = adapter_for(dense)
    student = copy.deepcopy(dense)
    reshape_(student, adapter, keep_layers, keep_hidden)
    structure = Structure.of(student, adapter, "query")
    masks = MaskSet(structure, "uniform").attach(student)
    head, ffn = structure.head, structure.ffn
    kept = KeptUnits(
        torch.arange(head.units_per_row).expand(structure.num_layers, head.rows, -1).clone(),
        torch.arange(ffn.units_per_row).expand(structure.num_layers, 1, -1).clone(),
    )
    return dense, student, adapter, structure, masks, kept


def _windows(n: int = 6, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 100, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["llama_gqa", "gemma3"])
def test_nothing_cut_means_nothing_changes(kind):
    hidden = tiny.make_model(kind, layers=3).config.hidden_size
    dense, student, adapter, structure, _, kept = _student(kind, [0, 1, 2], torch.arange(hidden))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    r = reconstruct_to_dense_(
        student, dense, adapter, structure.head, kept, _windows(), keep_layers=[0, 1, 2],
        keep_hidden=torch.arange(hidden), batch_size=2, ridge=0.01,
    )  # fmt: skip
    for n, p in student.named_parameters():
        torch.testing.assert_close(p, before[n], atol=2e-5, rtol=1e-4)
    assert max(r["relative_error"]["down_after"] + r["relative_error"]["o_after"]) < 1e-6
    assert r["down_targets"] == ["residual" if kind == "llama_gqa" else "projection"] * 3  # Gemma: a norm after


def test_the_fit_closes_the_gap_a_dropped_layer_and_sliced_channels_leave():
    """Layer 1 of 3 dropped, a quarter of the channels sliced: student layer 0's down_proj learns to put its output
    where the dense residual stream is at dense layer 2's input; measured directly, the gap shrinks."""
    kind, keep_layers = "llama_gqa", [0, 2]
    hidden = tiny.make_model(kind, layers=3).config.hidden_size
    keep_hidden = torch.arange(hidden)[: hidden * 3 // 4]
    dense, student, adapter, structure, _, kept = _student(kind, keep_layers, keep_hidden)
    windows = _windows()

    def gap(model) -> float:  # |student layer 0 output - dense residual before dense layer 2|^2, summed
        out = capture_layer_inputs(model, adapter, windows, 2).run(adapter.layers(model)[0], 0)
        ref = capture_layer_inputs(dense, adapter, windows, 2)
        for li, layer in enumerate(adapter.layers(dense)[:2]):
            ref = ref.advanced(layer, li)
        return sum(float(((o - h[..., keep_hidden]) ** 2).sum()) for o, h in zip(out, ref.hidden))

    with torch.no_grad():
        before = gap(student)
        r = reconstruct_to_dense_(
            student, copy.deepcopy(dense), adapter, structure.head, kept, windows, keep_layers=keep_layers,
            keep_hidden=keep_hidden, batch_size=2, ridge=0.01,
        )  # fmt: skip
        after = gap(student)
    err = r["relative_error"]
    assert r["down_targets"] == ["residual", "residual"]
    assert all(a <= b + 1e-9 for a, b in zip(err["down_after"] + err["o_after"], err["down_before"] + err["o_before"]))
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("kind,dtype", [("llama_gqa", "fp32"), ("qwen2", "bf16"), ("gemma3", "fp32")])
def test_prune_with_the_dense_target_exports_in_parity(kind, dtype, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    dense = tiny.save_tiny(tmp_path / kind, kind)
    calib = tiny.write_calib(tmp_path / "calib.jsonl")
    out = tmp_path / "out"
    argv = ["-q", "prune", str(dense), "--method", "wanda-sp", "--sparsity", "0.4", "--no-report"]
    argv += ["--prune-axes", "heads,ffn,hidden,layers", "--reconstruct", "--reconstruct-target", "dense"]
    assert main([*argv, *tiny.small_run(calib, dtype=dtype), "--out", str(out)]) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    rec = r["reconstruction"]
    assert rec["target"] == "dense" and len(rec["down_targets"]) == r["shape"]["num_hidden_layers"]
    assert r["config"]["reconstruct_target"] == "dense"
    assert "re-fit by ridge regression to the dense model's outputs" in (out / "README.md").read_text()
    assert r["parity"]["max_abs_diff"] <= r["parity"]["tolerance"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == r["params"]["exported"] <= r["params"]["budget"]
    assert model(torch.tensor([[3, 4, 5]])).logits.isfinite().all()


def test_the_dense_target_is_refused_for_learned_masks(tmp_path, capsys):
    dense = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    argv = ["-q", "prune", str(dense), "--no-cut-first", "--reconstruct-target", "dense", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "learned masks are not re-fit" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
