"""Distillation from the teacher's cached top-k (--teacher-topk): computed once, reused, no teacher in memory."""

from __future__ import annotations

import json
import logging

import pytest

import tiny
from maskprune.cli import main


def _run(tiny_dir, calib, out, *extra):
    argv = ["prune", str(tiny_dir), "--sparsity", "0.3", "--steps", "3", "--no-report", "--out", str(out)]
    return main([*argv, *tiny.small_run(calib, evaluate=False), *extra])


def test_the_default_recipe_distils_from_the_cached_top_k_and_reuses_it(
    tiny_dir, calib, tmp_path, monkeypatch, caplog, capsys
):
    import maskprune.stages.teacher as teacher_stage

    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="maskprune")
    assert _run(tiny_dir, calib, tmp_path / "a", "--teacher-topk", "16", "--val-every", "3") == 0, capsys.readouterr()
    r = json.loads((tmp_path / "a" / "maskprune_report.json").read_text())
    rec = r["recovery"]
    assert rec["teacher_topk"] == 16 and rec["steps"] == 3
    assert "computed and cached" in caplog.text
    assert rec["validation"] and all(m["kl"] >= 0 for m in rec["validation"])  # the top-k KL on held-out windows
    caches = [p for p in (tmp_path / "cache" / "teacher-topk").iterdir() if p.is_dir()]
    assert len(caches) == 2  # the training windows and the held-out ones

    def no_teacher(*_a, **_k):
        raise AssertionError("the teacher was loaded although its top-k is cached")

    monkeypatch.setattr(teacher_stage, "load_teacher", no_teacher)
    caplog.clear()
    argv = ("--teacher-topk", "16", "--val-every", "3", "--seed", "1")
    assert _run(tiny_dir, calib, tmp_path / "b", *argv) == 0, capsys.readouterr()
    assert "read from the cache" in caplog.text and "computed and cached" not in caplog.text
    assert len([p for p in (tmp_path / "cache" / "teacher-topk").iterdir() if p.is_dir()]) == 2


def test_top_k_with_the_whole_vocabulary_trains_as_the_full_kl(tiny_dir, calib, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path / "cache"))
    assert _run(tiny_dir, calib, tmp_path / "full", "--dtype", "fp32") == 0, capsys.readouterr()
    assert _run(tiny_dir, calib, tmp_path / "topk", "--dtype", "fp32", "--teacher-topk", str(tiny.VOCAB)) == 0
    full = [json.loads(x) for x in (tmp_path / "full" / "recovery_metrics.jsonl").read_text().splitlines()]
    topk = [json.loads(x) for x in (tmp_path / "topk" / "recovery_metrics.jsonl").read_text().splitlines()]
    for a, b in zip(full, topk):  # the cache keeps log-probabilities in fp16: the same loss within its rounding
        assert b["kl"] == pytest.approx(a["kl"], rel=2e-3, abs=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--teacher-topk", "-1"], "teacher_topk must be >= 0"),
        (["--teacher-topk", "8", "--alpha", "0.5"], "needs its hidden"),
        (["--teacher-topk", "8", "--no-cut-first"], "teacher_topk applies to distillation"),
    ],
)
def test_top_k_is_refused_where_it_cannot_apply(tiny_dir, calib, tmp_path, capsys, extra, message):
    assert _run(tiny_dir, calib, tmp_path / "x", *extra) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()
