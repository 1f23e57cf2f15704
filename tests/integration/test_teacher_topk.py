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


def _windows(out, k=16):
    """The report's teacher top-k windows (read, computed), its mass checked: a share of the teacher's probability
    (the tiny models' near-uniform teachers put about k / 256 of it in their top k)."""
    got = json.loads((out / "maskprune_report.json").read_text())["recovery"]["teacher_topk_windows"]
    for part in got.values():
        assert 0.5 * k / 256 < part.pop("mass") <= 1.0
    return got


def test_the_default_recipe_distils_from_the_cached_top_k_and_reuses_it(
    tiny_dir, calib, tmp_path, monkeypatch, caplog, capsys
):
    """The cache holds the windows a run draws, no others; a run of another size with the same seed (a sweep's
    next size) reads every window and never loads the teacher; another seed computes only the windows it adds."""
    import maskprune.stages.teacher as teacher_stage
    from maskprune.learner import window_batch

    monkeypatch.setenv("MASKPRUNE_TEACHER_CACHE", str(tmp_path / "cache" / "teacher-topk"))
    caplog.set_level(logging.INFO, logger="maskprune")
    argv = ("--teacher-topk", "16", "--val-every", "3", "--batch-size", "2")
    assert _run(tiny_dir, calib, tmp_path / "a", *argv) == 0, capsys.readouterr()
    r = json.loads((tmp_path / "a" / "maskprune_report.json").read_text())
    rec = r["recovery"]
    assert rec["teacher_topk"] == 16 and rec["steps"] == 3
    assert rec["validation"] and all(m["kl"] >= 0 for m in rec["validation"])  # the top-k KL on held-out windows
    card = (tmp_path / "a" / "README.md").read_text()
    assert "KL to the dense model's top 16 tokens and the mass of the rest" in card
    drawn = {i for t in range(3) for i in window_batch(16, 2, 0, t).tolist()}  # 16 windows, batch 2, seed 0
    assert len(drawn) == 6  # 3 steps of 2 windows of one epoch: 6 of the 16, not all
    (folder,) = [p for p in (tmp_path / "cache" / "teacher-topk").iterdir() if p.is_dir()]
    val = _windows(tmp_path / "a")["held_out"]["computed"]
    assert _windows(tmp_path / "a")["training"] == {"read": 0, "computed": 6}
    assert len(list(folder.glob("*.safetensors"))) == 6 + val

    def no_teacher(*_a, **_k):
        raise AssertionError("the teacher was loaded although its top-k is cached")

    monkeypatch.setattr(teacher_stage, "load_teacher", no_teacher)
    assert _run(tiny_dir, calib, tmp_path / "b", *argv, "--sparsity", "0.5") == 0, capsys.readouterr()
    assert _windows(tmp_path / "b") == {
        "training": {"read": 6, "computed": 0},
        "held_out": {"read": val, "computed": 0},
    }
    monkeypatch.undo()
    monkeypatch.setenv("MASKPRUNE_TEACHER_CACHE", str(tmp_path / "cache" / "teacher-topk"))
    assert _run(tiny_dir, calib, tmp_path / "c", *argv, "--seed", "1") == 0, capsys.readouterr()
    again = {i for t in range(3) for i in window_batch(16, 2, 1, t).tolist()}
    assert _windows(tmp_path / "c")["training"] == {"read": len(again & drawn), "computed": len(again - drawn)}
    assert len(list(folder.glob("*.safetensors"))) == len(drawn | again) + val


def test_top_k_with_the_whole_vocabulary_trains_as_the_full_kl(tiny_dir, calib, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MASKPRUNE_TEACHER_CACHE", str(tmp_path / "cache" / "teacher-topk"))
    assert _run(tiny_dir, calib, tmp_path / "full", "--dtype", "fp32", "--teacher-topk", "0") == 0, capsys.readouterr()
    assert _run(tiny_dir, calib, tmp_path / "topk", "--dtype", "fp32", "--teacher-topk", str(tiny.VOCAB)) == 0
    whole = json.loads((tmp_path / "topk" / "maskprune_report.json").read_text())["recovery"]["teacher_topk_windows"]
    assert whole["training"]["mass"] == pytest.approx(1.0, abs=1e-12)  # the whole vocabulary: no tail
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


def test_streamed_the_windows_the_steps_draw_are_computed_before_them(
    tiny_dir, calib, tmp_path, monkeypatch, capsys, caplog
):
    """--streaming on: one pass of the teacher over the windows the steps will draw (and the held-out ones) before
    the first step, then the steps read them: the same windows as a resident run, the same top-k rows."""
    from safetensors.torch import load_file

    from maskprune.learner import window_batch

    rows = {}
    caplog.set_level(logging.INFO, logger="maskprune")
    for mode in ("on", "off"):
        caplog.clear()
        monkeypatch.setenv("MASKPRUNE_TEACHER_CACHE", str(tmp_path / f"cache-{mode}" / "teacher-topk"))
        argv = ("--teacher-topk", "16", "--batch-size", "2", "--dtype", "fp32", "--streaming", mode)
        assert _run(tiny_dir, calib, tmp_path / mode, *argv) == 0, capsys.readouterr()
        assert _windows(tmp_path / mode)["training"] == {"read": 0, "computed": 6}
        before = "of the training windows: 0 windows read from the cache, 6 computed" in caplog.text
        assert before == (mode == "on")  # computed before the steps (streamed) or as the steps draw them
        (folder,) = (tmp_path / f"cache-{mode}" / "teacher-topk").iterdir()
        rows[mode] = {p.name: load_file(p) for p in folder.glob("*.safetensors")}
    assert rows["on"].keys() == rows["off"].keys()
    assert len({i for t in range(3) for i in window_batch(16, 2, 0, t).tolist()}) == 6
    for name, t in rows["on"].items():
        assert (t["index"] == rows["off"][name]["index"]).float().mean() > 0.99  # ties may order differently
        assert (t["tail"] - rows["off"][name]["tail"]).abs().max() < 1e-4


def test_an_unset_top_k_takes_the_default_where_logits_alone_are_distilled(monkeypatch):
    import maskprune.config as config
    from maskprune.config import distill_overrides, load_config

    monkeypatch.setattr(config, "DEFAULT_TEACHER_TOPK", 64)

    def distill(**options):
        return load_config(None, distill_overrides({"model": "x", "teacher": "y", **options}))

    assert load_config(None, {"sparsity": 0.2}).resolved_teacher_topk() == 64  # the default recipe: cut, then distil
    assert distill().resolved_teacher_topk() == 64  # maskprune distill
    assert load_config(None, {"sparsity": 0.2, "cut_first": False}).resolved_teacher_topk() == 0  # masks learned
    assert distill(alpha=0.5).resolved_teacher_topk() == 0  # the layer MSE needs the teacher's hidden states
    assert load_config(None, {"sparsity": 0.2, "teacher_topk": 0}).resolved_teacher_topk() == 0  # asked for
