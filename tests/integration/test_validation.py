"""--val-every: held-out calibration windows scored along a learning or distillation run. The scores are in
metrics.jsonl, the report and the card's data; training is the same with or without them; a one-shot cut
followed by recovery is validated in its recovery phase; too little text to hold out is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from maskprune.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    return tiny.save_tiny(root / "dense", "llama_gqa"), tiny.write_calib(root / "calib.jsonl")


def _prune(dense, calib, out, *extra) -> list[str]:
    argv = ["-q", "prune", str(dense), "--sparsity", "0.3", "--steps", "6", "--batch-size", "4", "--dtype", "fp32"]
    argv += ["--no-cut-first"]  # the masked learner: its masks and metrics.jsonl
    return [*argv, *tiny.small_run(calib, calib_samples=8), "--no-report", "--out", str(out), *extra]


def test_validation_scores_the_run_and_changes_nothing_it_learns(files, tmp_path, capsys):
    dense, calib = files
    plain, val = tmp_path / "plain", tmp_path / "val"
    assert main(_prune(dense, calib, plain, "--val-every", "0")) == 0, capsys.readouterr().err
    assert main(_prune(dense, calib, val, "--val-every", "4", "--val-windows", "3")) == 0, capsys.readouterr().err
    # the same windows and the same steps: the exported weights and the masks are identical
    a, b = load_file(plain / "model.safetensors"), load_file(val / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = torch.load(plain / "masks.pt"), torch.load(val / "masks.pt")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    lines = [json.loads(x) for x in (val / "metrics.jsonl").read_text().splitlines()]
    scored = [m["step"] for m in lines if "val_ppl" in m]
    assert scored == [3, 5]  # after 4 steps and after the last (6)
    r = json.loads((val / "maskprune_report.json").read_text())
    curve = r["validation"]
    assert [c["steps"] for c in curve] == [4, 6] and curve[1]["tokens"] == 6 * 4 * 32
    for c in curve:
        assert 1.0 < c["ppl"] < 1e4 and c["kl"] >= 0.0
    assert "validation" not in json.loads((plain / "maskprune_report.json").read_text())


def test_distill_and_recovery_after_a_one_shot_cut_are_validated(files, tmp_path, capsys):
    """prune --method flap --recover-steps (it used to fail after the cut: the recovery phase kept the one-shot
    method) with validation in its recovery phase; distillation lowers the held-out KL."""
    dense, calib = files
    out = tmp_path / "rec"
    argv = _prune(dense, calib, out, "--method", "flap", "--recover-steps", "8", "--lora-lr", "0.01")
    assert main([*argv, "--val-every", "4", "--val-windows", "3"]) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    assert r["method"] == "flap" and r["recovery"]["steps"] == 8
    curve = r["recovery"]["validation"]
    assert [c["steps"] for c in curve] == [4, 8] and curve[-1]["kl"] < curve[0]["kl"]
    card = (out / "README.md").read_text()
    assert "held-out" in card


def test_bad_validation_settings_are_refused_before_any_work(files, tmp_path, capsys):
    dense, calib = files
    bad = tmp_path / "bad"
    assert main(_prune(dense, calib, bad, "--val-every", "-1")) == 2
    assert "val_every must be >= 0" in capsys.readouterr().err and not bad.exists()
    assert main(_prune(dense, calib, bad, "--val-every", "2", "--val-windows", "0")) == 2
    assert "val_windows must be >= 1" in capsys.readouterr().err and not bad.exists()
    # the tiny calibration file gives far fewer windows of 32 tokens: holding out 100000 leaves none to train on
    assert main(_prune(dense, calib, bad, "--val-every", "2", "--val-windows", "100000")) == 2
    err = capsys.readouterr().err
    assert "too few to hold out 100000 for validation" in err and "--val-windows" in err and not bad.exists()
