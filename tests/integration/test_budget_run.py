"""A run that fits the time it is given (``--minutes``): the default recipe cuts, then distils for as many steps as
the budget buys at the pace it measures, and the whole run, evaluations and export included, ends within it."""

from __future__ import annotations

import json
import time

import pytest

import tiny
from maskprune.cli import main


@pytest.mark.parametrize("between", [[], ["--no-eval-between"]], ids=["default", "no-eval-between"])
def test_a_small_budget_ends_within_it_and_says_so(tiny_dir, calib, tmp_path, capsys, between):
    minutes, cap = 0.3, 100_000
    out = tmp_path / "o"
    argv = ["-q", "prune", str(tiny_dir), "--minutes", str(minutes), "--steps", str(cap), "--out", str(out)]
    argv += ["--no-report", *tiny.small_run(calib), *between]
    start = time.monotonic()
    assert main(argv) == 0, capsys.readouterr().err
    wall = time.monotonic() - start
    r = json.loads((out / "maskprune_report.json").read_text())
    rec = r["recovery"]
    assert rec["budget_minutes"] == minutes and rec["steps_cap"] == cap
    assert 20 < rec["steps"] < cap  # the budget, not the cap, set the count
    assert rec["seconds_per_step"] > 0 and rec["run_minutes"] <= minutes * 1.1
    assert wall <= 60 * minutes * 1.1 + 1.0  # within 10 % (and the CLI's start, outside the run's clock)
    assert wall >= 60 * minutes * 0.75  # and spent, not left on the table
    assert f"{minutes:g}-minute time budget" in (out / "README.md").read_text()
    # the cut's export is evaluated even without --eval-between: its seconds are what the budget keeps for the end
    assert r["perplexity"]["before_recovery"] is not None
    assert (r["perplexity"]["after_cut"] is None) == bool(between)


def test_steps_alone_fix_the_count(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["-q", "prune", str(tiny_dir), "--steps", "7", "--out", str(out), "--no-report", *tiny.small_run(calib)]
    assert main(argv) == 0, capsys.readouterr().err
    rec = json.loads((out / "maskprune_report.json").read_text())["recovery"]
    assert rec["steps"] == 7 and "budget_minutes" not in rec
