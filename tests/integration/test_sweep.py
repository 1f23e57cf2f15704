"""``maskprune sweep`` end to end on tiny models: one stock checkpoint per size, the dense model's work shared, the
table, the figure and the page; the target's choice and its exit status; a sweep cut off between sizes or inside one
resumes without losing or redoing a finished size. And the shared store itself: a run that reads it reports what a
run that computes everything reports."""

from __future__ import annotations

import json

import pytest
import torch
from test_zeroshot import write_all_formats

import maskprune
import tiny
from maskprune.cli import main


def _sweep_argv(dense, calib, out, *extra) -> list[str]:
    argv = ["-q", "sweep", str(dense), "--sparsity", "0.2,0.4", "--steps", "1", "--table-seq-len", "32", "--limit"]
    return [*argv, "3", "--tasks", "", "--out", str(out), "--no-report", *tiny.small_run(calib), *extra]


def test_a_sweep_writes_every_size_shares_the_dense_work_and_picks(tiny_dir, calib, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MASKPRUNE_TEACHER_CACHE", str(tmp_path / "cache" / "teacher-topk"))
    data = write_all_formats(tmp_path / "data")
    out = tmp_path / "sweep"
    argv = _sweep_argv(tiny_dir, calib, out, "--max-ppl-ratio", "1000")
    argv[argv.index("--tasks") + 1] = "piqa"
    argv[argv.index("--no-report")] = "--report"
    assert main([*argv, "--data-dir", str(data), "--teacher-topk", "8"]) == 0, capsys.readouterr().err
    record = json.loads((out / "sweep.json").read_text())
    sizes = record["sizes"]
    assert [r["label"] for r in sizes] == ["sparsity-0.20", "sparsity-0.40"]  # largest first
    assert record["chosen"] == "sparsity-0.40"  # the smallest that meets a loose target
    assert record["dense"]["params"] > sizes[0]["params"] > sizes[1]["params"]
    for row in sizes:
        report = json.loads((out / row["label"] / "maskprune_report.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(out / row["label"])  # a stock checkpoint
        assert sum(p.numel() for p in model.parameters()) == report["params"]["exported"] == row["params"]
        assert report["roundtrip"]["max_abs_diff"] <= report["roundtrip"]["tolerance"]
        assert row["ppl_32"] > 1.0 and 0.0 <= row["piqa_acc"] <= 1.0 and row["minutes"] > 0
        # a size's run evaluates its final model only: the table measures it (no eval_between by default)
        ppl = report["perplexity"]
        assert ppl["exported"] and ppl["after_cut"] is None and ppl["before_recovery"] is None
        assert not {"eval_after_cut", "eval_exported"} & set(report["seconds"]["prune"])
    first = json.loads((out / "sparsity-0.20" / "maskprune_report.json").read_text())["shared"]
    second = json.loads((out / "sparsity-0.40" / "maskprune_report.json").read_text())["shared"]
    assert "reference_and_layer_skip_kl" in first["computed"] and "dense_perplexity" in first["computed"]
    assert {"reference_and_layer_skip_kl", "dense_statistics", "dense_perplexity"} <= set(second["read"])
    assert not second["computed"]
    teacher = [  # the teacher's top-k: the second size draws the first size's windows and reads them
        json.loads((out / label / "maskprune_report.json").read_text())["recovery"]["teacher_topk_windows"]
        for label in ("sparsity-0.20", "sparsity-0.40")
    ]
    assert teacher[0]["training"]["computed"] > 0 and teacher[0]["training"]["read"] == 0
    assert teacher[1]["training"]["read"] == teacher[0]["training"]["computed"]
    assert teacher[1]["training"]["computed"] == 0 and teacher[1]["training"]["mass"] > 0
    page = (out / "index.html").read_text()
    assert "data:image/png;base64," in page and "Chosen: sparsity-0.40" in page
    assert (out / "sweep.png").stat().st_size > 10_000 and "sparsity-0.20/report/index.html" in page
    table = (out / "sweep.md").read_text()
    assert table.splitlines()[2].startswith("| dense |") and "| chosen |" in table


def test_no_size_meets_the_target_exit_1_and_finished_sizes_are_kept(tiny_dir, calib, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    assert main(_sweep_argv(tiny_dir, calib, out, "--sparsity", "0.3")) == 0, capsys.readouterr().err
    report = out / "sparsity-0.30" / "maskprune_report.json"
    stamp = report.stat().st_mtime_ns
    capsys.readouterr()
    assert main(_sweep_argv(tiny_dir, calib, out)) == 2  # an earlier sweep there: --resume or another folder
    assert "--resume" in capsys.readouterr().err
    argv = _sweep_argv(tiny_dir, calib, out, "--sparsity", "0.3,0.45", "--resume", "--max-ppl-ratio", "0.5")
    assert main(argv) == 1
    said = capsys.readouterr().out
    assert "No size meets the target." in said and said.count("misses: ppl@32") == 2
    assert report.stat().st_mtime_ns == stamp  # kept, not run again
    record = json.loads((out / "sweep.json").read_text())
    assert record["chosen"] is None and [r["label"] for r in record["sizes"]] == ["sparsity-0.30", "sparsity-0.45"]
    other = _sweep_argv(tiny_dir, calib, out, "--sparsity", "0.3", "--resume", "--seed", "7")
    assert main(other) == 2 and "other options" in capsys.readouterr().err  # never keeps another run's size
    # a sweep copied elsewhere (new paths, new file times) and resumed there measures no size again
    import shutil

    import maskprune.sweeps as sweeps

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    monkeypatch.setattr(sweeps, "_measure", lambda *a, **k: pytest.fail("measured again"))
    loose = _sweep_argv(tiny_dir, calib, moved, "--sparsity", "0.3,0.45", "--resume", "--max-ppl-ratio", "1000")
    assert main(loose) == 0, capsys.readouterr().err
    again = json.loads((moved / "sweep.json").read_text())
    assert again["chosen"] == "sparsity-0.45"
    assert [r["ppl_32"] for r in again["sizes"]] == [r["ppl_32"] for r in record["sizes"]]


def test_a_size_cut_off_after_its_cut_resumes_from_it(tiny_dir, calib, tmp_path, monkeypatch):
    import maskprune.recipes as recipes

    calls = {"cut": 0, "recovery": 0}
    real_cut, real_setup = recipes._cut_stage, recipes.setup

    def counted_cut(*a, **k):
        calls["cut"] += 1
        return real_cut(*a, **k)

    def setup_that_dies_once(cfg, progress):
        if cfg.has_teacher:
            calls["recovery"] += 1
            if calls["recovery"] == 1:
                raise KeyboardInterrupt  # the process stops between the cut and its distillation
        return real_setup(cfg, progress)

    monkeypatch.setattr(recipes, "_cut_stage", counted_cut)
    monkeypatch.setattr(recipes, "setup", setup_that_dies_once)
    out = tmp_path / "sweep"
    kw = dict(out=out, sparsity=[0.3], steps=1, table_seq_len=32, tasks=(), limit=2, progress=False, report=False)
    kw.update(seq_len=32, calib_samples=16, calib=str(calib), eval_seq_len=64, eval_max_windows=2)
    with pytest.raises(KeyboardInterrupt):
        maskprune.sweep(str(tiny_dir), **kw)
    assert (out / "sparsity-0.30.cut" / "cut_stage.json").is_file() and not (out / "sparsity-0.30").exists()
    record = maskprune.sweep(str(tiny_dir), resume=True, **kw)
    assert calls == {"cut": 1, "recovery": 2}  # the finished cut was reused
    assert [r["label"] for r in record["sizes"]] == ["sparsity-0.30"] and record["chosen"] is None
    assert (out / "sparsity-0.30" / "maskprune_report.json").is_file()
    assert not (out / "sparsity-0.30.cut").exists()


def test_a_run_that_reads_the_shared_work_reports_what_computing_it_gives(calib, tmp_path, capsys):
    dense = tiny.save_tiny(tmp_path / "g3", "gemma3", tied=True)
    tiny.make_model("gemma3", tied=True, layers=6).save_pretrained(dense)  # global and sliding layers, a depth to cut

    def run(name: str, *extra: str) -> dict:
        out = tmp_path / name
        argv = ["-q", "prune", str(dense), "--sparsity", "0.3", "--steps", "1", "--no-report", "--out", str(out)]
        assert main([*argv, *tiny.small_run(calib), *extra]) == 0, capsys.readouterr().err
        return json.loads((out / "maskprune_report.json").read_text())

    store = ["--shared-cache", str(tmp_path / "shared")]
    plain, first, second = run("plain"), run("first", *store), run("second", *store)
    assert "shared" not in plain and not first["shared"]["read"]
    facts = {"dense_perplexity", "reference_and_layer_skip_kl", "dense_statistics"}
    assert set(second["shared"]["read"]) == facts
    def ppl(r: dict) -> dict:
        return {k: v["ppl"] for k, v in r["perplexity"].items() if isinstance(v, dict)}

    for r in (first, second):
        assert ppl(r) == ppl(plain) and len(ppl(plain)) >= 4
        assert r["shape_search"]["candidates"] == plain["shape_search"]["candidates"]
        assert r["shape_search"]["layer_skip_kl"] == plain["shape_search"]["layer_skip_kl"]
    a = torch.load(tmp_path / "plain" / "masks.pt", weights_only=True)
    b = torch.load(tmp_path / "second" / "masks.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_without_eval_between_a_run_skips_only_the_evaluations_between_its_stages(tiny_dir, calib, tmp_path, capsys):
    def run(name: str, *extra: str) -> dict:
        out = tmp_path / name
        argv = ["-q", "prune", str(tiny_dir), "--sparsity", "0.3", "--steps", "2", "--no-report", "--out", str(out)]
        assert main([*argv, *tiny.small_run(calib), *extra]) == 0, capsys.readouterr().err
        return json.loads((out / "maskprune_report.json").read_text())

    plain, lean = run("plain"), run("lean", "--no-eval-between")
    assert plain["perplexity"]["after_cut"] and plain["perplexity"]["before_recovery"]
    assert lean["perplexity"]["after_cut"] is None and lean["perplexity"]["before_recovery"] is None
    for key in ("dense", "exported"):  # what is measured is measured the same way
        assert lean["perplexity"][key]["ppl"] == pytest.approx(plain["perplexity"][key]["ppl"], rel=1e-5)
    assert {"eval_after_cut", "eval_exported"} <= set(plain["seconds"]["prune"])
    assert not {"eval_after_cut", "eval_exported"} & set(lean["seconds"]["prune"])
    assert "eval_exported" in lean["seconds"]["recovery"]
    card = (tmp_path / "lean" / "README.md").read_text()  # the card shows what ran
    assert "before recovery |" not in card and "not evaluated before the recovery" in card
    assert "before recovery |" in (tmp_path / "plain" / "README.md").read_text()


def test_a_size_the_model_cannot_take_is_refused_before_any_size_runs(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(_sweep_argv(tiny_dir, calib, out, "--sparsity", "0.2,0.97")) == 2
    err = capsys.readouterr().err
    assert "no candidate shape meets the parameter budget" in err and "sparsity 0.97" in err
    assert not out.exists()  # nothing half-written: the first size did not run
    assert main(_sweep_argv(tiny_dir, calib, out, "--min-accuracy-share", "0.9")) == 2  # --tasks '': unmeasurable
    assert "needs zero-shot tasks" in capsys.readouterr().err and not out.exists()
    assert main(_sweep_argv(tiny_dir, calib, out, "--ppl-tokens", "16")) == 2  # less than one 32-token window
    assert "less than one window" in capsys.readouterr().err and not out.exists()
