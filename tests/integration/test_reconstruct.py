"""A reconstructed one-shot cut: the re-fit lowers every projection's output error, the export stays stock and
in parity, and the option is refused where it does not apply yet."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from maskprune.cli import main


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "gemma3", "olmo2", "phi3"])
def test_reconstruct_lowers_the_error_and_exports_in_parity(kind, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    dense = tiny.save_tiny(tmp_path / kind, kind)
    calib = tiny.write_calib(tmp_path / "calib.jsonl")
    out = tmp_path / "out"
    argv = ["-q", "prune", str(dense), "--method", "wanda-sp", "--sparsity", "0.3", "--reconstruct", "--no-report"]
    assert main([*argv, *tiny.small_run(calib, dtype="fp32"), "--out", str(out)]) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    err = r["reconstruction"]["relative_error"]
    for role in ("o", "down"):
        assert len(err[f"{role}_after"]) == r["shape"]["num_hidden_layers"]
        assert all(a <= b + 1e-9 for a, b in zip(err[f"{role}_after"], err[f"{role}_before"])), (role, err)
    assert sum(err["down_after"]) < sum(err["down_before"])
    assert r["parity"]["max_abs_diff"] <= r["parity"]["tolerance"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == r["params"]["exported"] <= r["params"]["budget"]
    assert model(torch.tensor([[3, 4, 5]])).logits.isfinite().all()


def test_reconstruct_replaces_flaps_compensation_and_is_refused_where_it_does_not_apply(tmp_path, capsys):
    dense = tiny.save_tiny(tmp_path / "m", "llama_bias")
    calib = tiny.write_calib(tmp_path / "calib.jsonl")
    out = tmp_path / "flap"
    argv = ["-q", "prune", str(dense), "--method", "flap", "--sparsity", "0.3", "--reconstruct", "--no-report"]
    assert main([*argv, *tiny.small_run(calib, dtype="fp32"), "--out", str(out)]) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    assert r["bias_compensation"] is None and r["reconstruction"]["ridge"] == 0.01
    assert main(["-q", "prune", str(dense), "--reconstruct", "--no-cut-first", "--out", str(tmp_path / "x")]) == 2
    assert "a cut made before training" in capsys.readouterr().err
    argv = ["-q", "prune", str(dense), "--method", "flap", "--reconstruct", "--bias-compensation", "on"]
    assert main([*argv, "--out", str(tmp_path / "y")]) == 2
    assert "instead of FLAP's bias compensation" in capsys.readouterr().err


def test_a_reconstructed_cut_can_be_recovered(tmp_path, capsys):
    dense = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    calib = tiny.write_calib(tmp_path / "calib.jsonl")
    out = tmp_path / "rec"
    argv = ["-q", "prune", str(dense), "--method", "flap", "--sparsity", "0.3", "--reconstruct", "--recover-steps", "3"]
    assert main([*argv, *tiny.small_run(calib, dtype="fp32"), "--no-report", "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    r = json.loads((out / "maskprune_report.json").read_text())
    assert r["reconstruction"]["relative_error"]["down_after"] and r["recovery"]["steps"] == 3
    assert r["config"]["reconstruct"] is True
