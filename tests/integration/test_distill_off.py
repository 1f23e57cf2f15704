"""Distillation off (issue 4's ablation): the loss is the LM cross-entropy alone and no teacher
forward runs; settings that need a teacher are refused."""

from __future__ import annotations

import json

import pytest
import torch

from maskprune import learner as learner_mod
from maskprune.cli import main
from maskprune.losses import distillation_loss

import tiny


def test_without_a_teacher_the_loss_is_the_next_token_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    terms = distillation_loss(logits, None, labels=labels)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
    expected = -logp.gather(-1, labels[:, 1:, None]).mean()
    assert set(terms) == {"ce", "loss"}
    assert torch.allclose(terms["loss"], expected, atol=1e-6)
    with pytest.raises(ValueError, match="needs labels"):
        distillation_loss(logits, None)


def test_no_distill_prunes_without_ever_running_the_teacher(tmp_path, capsys, monkeypatch):
    def no_teacher(*a, **k):
        raise AssertionError("the teacher forward ran with --no-distill")

    monkeypatch.setattr(learner_mod, "bypass", no_teacher)
    model = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    calib = tiny.write_calib(tmp_path / "c.jsonl")
    out = tmp_path / "o"
    code = main(["-q", "prune", str(model), "--no-distill", "--sparsity", "0.3", "--steps", "20",
                 "--seq-len", "32", "--calib-samples", "16", "--calib", str(calib), "--eval-seq-len", "64",
                 "--eval-max-windows", "2", "--dtype", "fp32", "--no-report", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "kl" not in metrics[0] and metrics[0]["ce"] == pytest.approx(metrics[0]["loss"])
    r = json.loads((out / "maskprune_report.json").read_text())
    assert r["config"]["distill"] is False and r["params"]["exported"] <= r["params"]["budget"]


def test_no_distill_refuses_teacher_terms(tmp_path, capsys):
    code = main(["prune", "--no-distill", "--alpha", "1.0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "distill is off" in err and "--alpha" in err
    assert not (tmp_path / "o").exists()
