"""The recipes write each run's report once, into the folder that becomes ``out``, and leave no stage folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny
from maskprune.cli import main


@pytest.mark.parametrize(
    "recipe",
    [
        ["--steps", "4"],  # the learned default
        ["--method", "flap"],  # one-shot
        ["--method", "wanda-sp", "--recover-steps", "3"],  # prune, then recover: two stages
    ],
    ids=["learned", "one-shot", "prune-then-recover"],
)
def test_the_report_is_written_once_per_run(tiny_dir, calib, tmp_path, monkeypatch, recipe):
    writes: list[str] = []
    write_text = Path.write_text

    def spy(self, *args, **kwargs):
        if self.name == "maskprune_report.json":
            writes.append(str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", spy)
    out = tmp_path / "pruned"
    argv = ["-q", "prune", str(tiny_dir), "--sparsity", "0.3", *recipe, *tiny.small_run(calib), "--out", str(out)]
    assert main(argv) == 0
    assert len(writes) == 1, writes
    report = json.loads((out / "maskprune_report.json").read_text())
    assert report["config"]["out"] == str(out) and "out" not in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no .cut, .checkpoints or staging left
    if "--recover-steps" in recipe:
        assert report["recovery"]["steps"] == 3 and report["config"]["recover_steps"] == 3
        assert {"masks.pt", "recovery_metrics.jsonl"} <= {p.name for p in out.iterdir()}
