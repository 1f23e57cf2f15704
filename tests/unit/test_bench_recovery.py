"""bench/recovery.py's scheduling: the tasks chosen and ranked by --only (with what they need), the step counts
bought by CPU minutes, and an interrupted run continued with --resume instead of started over."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def recovery():
    spec = importlib.util.spec_from_file_location("bench_recovery", ROOT / "bench" / "recovery.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_recovery"] = mod
    spec.loader.exec_module(mod)
    return mod


TIMING = {
    "learn_step_s": {"s20": 4.5, "s50": 4.5},
    "distill_step_s": {"default-s20": 4.2, "flap-s20": 4.2, "default-s50": 3.2, "flap-s50": 3.3},
    "prune_s": {"default-s20": 600, "flap-s20": 170, "default-s50": 630, "flap-s50": 120},
}


def _args(work: Path) -> argparse.Namespace:
    return argparse.Namespace(
        model="m", data_dir="d", work=str(work), sparsities=[0.2, 0.5], seeds=[0, 1], minutes=[5.0, 60.0],
        threads=1, eval_batch=8, eval_limit=None, prune_steps=120, calib_samples=256, date="x", include=[],
    )  # fmt: skip


def test_only_picks_ranks_and_pulls_in_dependencies(recovery, tmp_path):
    tasks = recovery.plan(_args(tmp_path), TIMING)
    chosen = recovery.select(tasks, ["distill-flap-s50-seed0-60min", "eval-split-s20-seed1-inbudget"])
    ranks = {t.name: t.priority for t in chosen}
    assert ranks == {
        "distill-flap-s50-seed0-60min": 0,
        "prune-flap-s50-seed0": 0,
        "eval-split-s20-seed1-inbudget": 1,
        "distill-split-s20-seed1-inbudget": 1,
        "prune-split-s20-seed1": 1,
    }
    assert recovery.select(tasks, None) == tasks
    (d,) = [t for t in chosen if t.name.startswith("distill-flap")]
    assert d.cmd[d.cmd.index("--steps") + 1] == str(round(60 * 60 / 3.3))  # 60 minutes at 3.3 s a step
    assert d.cmd[d.cmd.index("--calib-samples") + 1] == str(4 * round(60 * 60 / 3.3))  # one pass, no window twice


def test_the_in_budget_arms_spend_the_default_runs_minutes(recovery, tmp_path):
    """split: the 40 learning steps it gives up, as recovery steps; flap: the default prune's minutes beyond
    FLAP's, as recovery steps; both summarised at the default run's total minutes."""
    tasks = {t.name: t for t in recovery.plan(_args(tmp_path), TIMING)}
    steps = {
        k: int(t.cmd[t.cmd.index("--steps") + 1])
        for k, t in tasks.items()
        if k.startswith("distill") and k.endswith("inbudget")
    }
    assert steps["distill-split-s50-seed0-inbudget"] == round(40 * 4.5 / 3.2)
    assert steps["distill-flap-s50-seed0-inbudget"] == round((630 - 120) / 3.3)
    assert steps["distill-flap-s20-seed1-inbudget"] == round((600 - 170) / 4.2)
    assert "distill-default-s20-seed0-inbudget" not in tasks and "eval-split-s20-seed0" not in tasks
    assert tasks["distill-flap-s50-seed0-inbudget"].deps == ["prune-flap-s50-seed0"]
    assert recovery.inbudget_minutes("flap", "s50", TIMING, 120) == 8.5
    with pytest.raises(ValueError, match="default"):
        recovery.inbudget_minutes("default", "s50", TIMING, 120)
    (tmp_path / "flap-s50-seed0-inbudget.eval.json").write_text(
        json.dumps({"models": {"m": {"perplexity": {"2048": {"ppl": 200.0}}}}})
    )
    (row,) = recovery.summarize(_args(tmp_path), TIMING, tmp_path / "results")["rows"]
    assert (row["start"], row["recovery"], row["recovery_cpu_minutes"], row["total_cpu_minutes"]) == (
        "flap", "inbudget", 8.5, 10.5
    )  # fmt: skip


def test_an_interrupted_run_resumes_and_a_fresh_one_starts_over(recovery, tmp_path):
    cmd = ["maskprune", "distill", "s", "--out", str(tmp_path / "r"), "--overwrite", "--steps", "9"]
    assert recovery._resumed(cmd) == cmd
    (tmp_path / "r.checkpoints").mkdir()
    assert recovery._resumed(cmd) == cmd  # an empty checkpoint folder: nothing to continue
    (tmp_path / "r.checkpoints" / "step-000025").mkdir()
    assert recovery._resumed(cmd) == [c if c != "--overwrite" else "--resume" for c in cmd]


def test_the_summary_merges_perplexity_and_piqa(recovery, tmp_path):
    def result(path: Path, **model):
        path.write_text(json.dumps({"models": {"m": model}}))

    result(tmp_path / "x.eval.json", perplexity={"2048": {"ppl": 12.5}})
    assert recovery._eval_row(tmp_path / "x.eval.json") == {"ppl2048": 12.5, "piqa": None, "piqa_stderr": None}
    result(tmp_path / "x.piqa.json", zeroshot={"tasks": {"piqa": {"acc": 0.6, "acc_stderr": 0.01}}})
    assert recovery._eval_row(tmp_path / "x.eval.json") == {"ppl2048": 12.5, "piqa": 0.6, "piqa_stderr": 0.01}
    assert recovery._eval_row(tmp_path / "missing.eval.json") is None


def test_the_table_counts_the_seeds_of_each_measure(recovery, tmp_path):
    """Perplexity of two seeds, PIQA of one: the table says so instead of printing a range of one value."""

    def result(name: str, **model):
        (tmp_path / name).write_text(json.dumps({"models": {"m": model}}))

    result("dense.eval.json", perplexity={"2048": {"ppl": 19.0}})
    result("dense.piqa.json", zeroshot={"tasks": {"piqa": {"acc": 0.64, "acc_stderr": 0.01}}})
    for seed, ppl in ((0, 200.0), (1, 220.0)):
        result(f"default-s50-seed{seed}.eval.json", perplexity={"2048": {"ppl": ppl}})
    result("default-s50-seed0.piqa.json", zeroshot={"tasks": {"piqa": {"acc": 0.55, "acc_stderr": 0.01}}})
    out = recovery.summarize(_args(tmp_path), TIMING, tmp_path / "results")
    (row,) = out["rows"]
    assert row["seeds"] == [0, 1] and row["piqa_seeds"] == [0] and row["ppl2048_median"] == 210.0
    table = (tmp_path / "results" / "recovery.md").read_text()
    assert "| 50 % | default | 0 (0min) | 0 | 0 | 10.5 | 210.00 [200.00, 220.00] | 2 | 55.00 | 1 |" in table


def test_an_earlier_summary_fills_the_seeds_the_work_folder_lacks(recovery, tmp_path):
    """--include: a point measured in another session keeps its seeds; a seed measured again here wins; the
    medians are taken over the union, and every carried cell names the summary it came from."""

    def result(work: Path, name: str, ppl: float):
        work.mkdir(exist_ok=True)
        (work / name).write_text(json.dumps({"models": {"m": {"perplexity": {"2048": {"ppl": ppl}}}}}))

    old, new = tmp_path / "old", tmp_path / "new"
    for seed, ppl in ((0, 100.0), (1, 120.0), (2, 140.0)):
        result(old, f"default-s50-seed{seed}.eval.json", ppl)
    result(old, "flap-s20-seed0.eval.json", 50.0)
    recovery.summarize(_with(_args(old), seeds=[0, 1, 2]), TIMING, old)
    result(new, "default-s50-seed1.eval.json", 80.0)  # seed 1 measured again
    result(new, "default-s20-seed0.eval.json", 30.0)  # a point the old summary lacks
    out = recovery.summarize(
        _with(_args(new), seeds=[0, 1, 2], include=[str(old / "recovery.json")]), TIMING, new / "results"
    )
    rows = {(r["sparsity"], r["start"]): r for r in out["rows"]}
    assert set(rows) == {(0.2, "default"), (0.2, "flap"), (0.5, "default")}
    r50 = rows[(0.5, "default")]
    assert r50["seeds"] == [0, 1, 2] and [c["ppl2048"] for c in r50["cells"]] == [100.0, 80.0, 140.0]
    assert r50["ppl2048_median"] == 100.0
    assert [c.get("source") for c in r50["cells"]] == [str(old / "recovery.json"), None, str(old / "recovery.json")]
    assert rows[(0.2, "default")]["seeds"] == [0] and rows[(0.2, "flap")]["ppl2048_median"] == 50.0
    assert "Seeds this work folder lacks come from" in (new / "results" / "recovery.md").read_text()


def _with(a: argparse.Namespace, **kw) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(a), **kw})
