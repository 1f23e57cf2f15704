"""The cache builds a folder once, however many processes ask for it at the same moment (the test run's own
parallel workers converting the default model once caught it: 'Directory not empty' on the rename)."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from maskprune.cache import build_once


def _complete(p: Path) -> bool:
    return (p / "done").is_file()


def _slow_build(log: str, tmp: Path) -> None:
    with open(log, "a") as f:  # one line per build actually run
        f.write("built\n")
    time.sleep(0.5)  # long enough that every caller arrives while the first is building
    (tmp / "part").write_text("x")
    (tmp / "done").write_text("ok")


def _ask(target: str, log: str, barrier) -> str:
    barrier.wait()
    return str(build_once(Path(target), _complete, lambda tmp: _slow_build(log, tmp)))


def test_concurrent_processes_build_once_and_all_get_the_folder(tmp_path: Path) -> None:
    target, log = tmp_path / "cache" / "thing", tmp_path / "log"
    ctx = mp.get_context("spawn")
    n = 4
    barrier = ctx.Manager().Barrier(n)
    with ctx.Pool(n) as pool:
        got = pool.starmap(_ask, [(str(target), str(log), barrier)] * n)
    assert got == [str(target)] * n
    assert log.read_text().count("built") == 1
    assert _complete(target) and (target / "part").read_text() == "x"
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".thing.") and p.is_dir()]  # no staging left


def test_a_failed_build_leaves_nothing_and_an_incomplete_leftover_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "thing"

    def fail(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, _complete, fail)
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.is_dir()]

    target.mkdir()
    (target / "stale").write_text("from a run killed before the rename existed")
    built = build_once(target, _complete, lambda tmp: (tmp / "done").write_text("ok"))
    assert _complete(built) and not (built / "stale").exists()
    calls: list[Path] = []
    assert build_once(target, _complete, calls.append) == target and calls == []  # complete: not rebuilt
