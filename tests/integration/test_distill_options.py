"""Distillation options (issue 4's ablations): distillation off (the LM cross-entropy alone, no teacher
forward; settings that need a teacher refused) and the scale-free layer MSE."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from maskprune import learner as learner_mod
from maskprune.cli import main
from maskprune.losses import distillation_loss, layer_mse


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
    code = main(
        [
            "-q",
            "prune",
            str(model),
            "--no-distill",
            "--no-cut-first",
            "--sparsity",
            "0.3",
            "--steps",
            "20",
            *tiny.small_run(calib),
            "--dtype",
            "fp32",
            "--no-report",
            "--out",
            str(out),
        ]
    )
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


def test_teacher_normalised_layer_mse_is_scale_free_and_raw_is_the_plain_sum():
    torch.manual_seed(0)
    t = [torch.randn(2, 3, 8), 300 * torch.randn(2, 3, 8)]  # the second layer: massive activations
    s = [x + 0.1 * torch.randn_like(x) for x in t]
    raw = layer_mse(s, t, norm="none")
    assert torch.allclose(raw, sum(((a - b) ** 2).mean() for a, b in zip(s, t)))
    rel = layer_mse(s, t, norm="teacher")
    assert torch.allclose(rel, sum(((a - b) ** 2).mean() / (b**2).mean() for a, b in zip(s, t)))
    # scaling every hidden state by 100 multiplies the raw term by 1e4 and leaves the normalised one
    assert torch.allclose(layer_mse([100 * x for x in s], [100 * x for x in t], norm="teacher"), rel, rtol=1e-4)
    assert torch.allclose(layer_mse([100 * x for x in s], [100 * x for x in t], norm="none"), 1e4 * raw, rtol=1e-4)
    sg = [x.clone().requires_grad_() for x in s]
    layer_mse(sg, [x.requires_grad_() for x in t], norm="teacher").backward()
    assert t[0].grad is None and sg[0].grad is not None  # the teacher's scale is a constant


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_distillation_learning_rate_follows_its_schedule(schedule, tmp_path, capsys):
    """The default's recovery (cut first) logs the adapters' rate each step: lora_lr throughout, or half a cosine
    from it to 0 at the last step."""
    from maskprune.mask_optim import cosine_factor

    model = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    calib = tiny.write_calib(tmp_path / "c.jsonl")
    out, steps = tmp_path / "o", 6
    argv = ["-q", "prune", str(model), "--sparsity", "0.3", "--steps", str(steps), "--lora-lr", "2e-3"]
    argv += ["--lora-lr-schedule", schedule, "--no-report", "--out", str(out)]
    assert main([*argv, *tiny.small_run(calib, evaluate=False, dtype="fp32")]) == 0, capsys.readouterr().err
    metrics = [json.loads(x) for x in (out / "recovery_metrics.jsonl").read_text().splitlines()]
    expected = [2e-3 * (cosine_factor(t, steps) if schedule == "cosine" else 1.0) for t in range(steps)]
    assert [m["lr_lora"] for m in metrics] == pytest.approx(expected)
    assert json.loads((out / "maskprune_report.json").read_text())["config"]["lora_lr_schedule"] == schedule
