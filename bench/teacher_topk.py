"""Full-vocabulary distillation against the cached top-k teacher (--teacher-topk) at equal tokens: the same student
(a cut export), the same windows, steps and seeds; per run the perplexity of the export, the seconds a step, the
whole process's peak resident memory (/usr/bin/time -v) and the report's per-phase peaks. With ``--tasks`` each export
(and the dense teacher, once) is also measured on the table protocol: WikiText-2 at 2048 tokens (``--ppl-tokens``: the
first N tokens, the same for every model) and the zero-shot tasks on their full sets (``--data-dir``).

    python bench/teacher_topk.py STUDENT --teacher smollm2-135m --steps 100 --seeds 0,1,2 --topk 0,64 \
        --out bench/results/2026-12-07-teacher-topk.json

Runs one at a time (each uses every core); the top-k cache is built by the first top-k run and read by the
others, which the JSON records (``cache``: computed / read).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _table(model: str, a: argparse.Namespace, work: Path, name: str) -> dict:
    """ppl@2048 on the first ``--ppl-tokens`` tokens and the tasks' accuracies of ``model`` (``maskprune eval``); a
    persistent ``--work`` keeps each protocol's evaluation under its own name and does not run it again."""
    tag = f"ppl{a.ppl_tokens or 'all'}-{a.tasks.replace(',', '+') or 'none'}-n{a.limit or 'all'}"
    out = work / f"{name}-eval-{tag}.json"
    if out.is_file():
        return _row(out, None)
    argv = [sys.executable, "-m", "maskprune", "-q", "eval", model, "--seq-len", "2048", "--tasks", a.tasks]
    argv += ["--data-dir", a.data_dir, "--out", str(out)]
    argv += ["--ppl-tokens", str(a.ppl_tokens)] if a.ppl_tokens else []
    argv += ["--limit", str(a.limit)] if a.limit else []  # examples per task (the perplexity: --ppl-tokens)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"eval failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return _row(out, time.perf_counter() - start)


def _row(out: Path, seconds: float | None) -> dict:
    """The table's row of one evaluation (``seconds`` None: read from an earlier run)."""
    (m,) = json.loads(out.read_text())["models"].values()
    ppl = m["perplexity"]["2048"]
    row = {"ppl_2048": ppl["ppl"], "ppl_windows": ppl["windows"], "eval_seconds": seconds}
    for task, r in (m.get("zeroshot") or {}).get("tasks", {}).items():
        row[f"{task}_acc"], row[f"{task}_n"] = r["acc"], r["n"]
    accs = [v for key, v in row.items() if key.endswith("_acc")]
    row["accuracy_mean"] = statistics.mean(accs) if accs else None
    return row


def _run(student: str, teacher: str, steps: int, seed: int, k: int, extra: list[str], work: Path) -> dict:
    out = work / f"k{k}-s{seed}"
    if (out / "maskprune_report.json").exists():  # a persistent --work: the distillation finished earlier
        return _cell(out, k, seed, None, None)
    argv = [sys.executable, "-m", "maskprune", "distill", student, "--teacher", teacher, "--steps", str(steps)]
    argv += ["--seed", str(seed), "--teacher-topk", str(k), "--out", str(out), "--overwrite", "--no-report", *extra]
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return _cell(out, k, seed, peak_kb * 1024 / 1e9, wall)


def _cell(out: Path, k: int, seed: int, peak_gb: float | None, wall: float | None) -> dict:
    report = json.loads((out / "maskprune_report.json").read_text())
    d = report["distill"]
    windows = (d.get("teacher_topk_windows") or {}).get("training")  # what the run read and computed
    cache = None if not k else ("read" if windows and not windows["computed"] else "computed")
    return {
        "teacher_topk": k,
        "seed": seed,
        "steps": d["steps"],
        "ppl_exported": report["perplexity"]["exported"]["ppl"],
        "eval_windows": report["perplexity"]["exported"]["windows"],
        "eval_seq_len": report["perplexity"]["exported"]["seq_len"],
        "seconds_per_step": d["seconds"] / max(1, d["steps"]),
        "peak_rss_gb": peak_gb,  # the process's (/usr/bin/time -v); None where the run was not timed here
        "phase_peak_rss_gb": {k2: v / 1e9 for k2, v in report["memory"]["peak_rss_bytes"].items()},
        "phase_seconds": report["seconds"],
        "cache": cache,
        "teacher_topk_windows": d.get("teacher_topk_windows"),
        "wall_seconds": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student")
    p.add_argument("--teacher", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--topk", default="0,64", help="comma-separated k (0: the full vocabulary)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", default=None, help="e.g. piqa,arc_easy (or '': perplexity alone): measure every export on the table protocol")
    p.add_argument("--data-dir", default=None, help="offline task data (with --tasks)")
    p.add_argument("--ppl-tokens", type=int, default=None, help="score the first N WikiText-2 tokens at 2048")
    p.add_argument("--limit", type=int, default=None, help="the first N examples of each task")
    p.add_argument("--work", type=Path, default=None, help="keep the exports here (a finished one is not rerun)")
    a, extra = p.parse_known_args()  # what is left: more distill flags (after --)
    extra = [x for x in extra if x != "--"]
    cells = []
    with tempfile.TemporaryDirectory(prefix="topk-bench-") as scratch:
        tmp = str(a.work or scratch)
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for seed in (int(x) for x in a.seeds.split(",")):  # seeds outermost: a cut-short run still compares arms
            for k in (int(x) for x in a.topk.split(",")):
                cells.append(_run(a.student, a.teacher, a.steps, seed, k, extra, Path(tmp)))
                if a.tasks is not None:
                    cells[-1].update(_table(str(Path(tmp) / f"k{k}-s{seed}"), a, Path(tmp), f"k{k}-s{seed}"))
                print(json.dumps(cells[-1]), flush=True)
                _write(a.out, cells)
        if a.tasks is not None:  # the dense teacher on the same protocol, last (a cut-short run still compares the arms)
            cells.append({"method": "dense", **_table(a.teacher, a, Path(tmp), "dense")})
    _write(a.out, cells)


def _write(out: Path, cells: list[dict]) -> None:
    """The results so far (rewritten after every run)."""

    summary = {}
    for k in sorted({c["teacher_topk"] for c in cells if "teacher_topk" in c}):
        mine = [c for c in cells if c.get("teacher_topk") == k]
        ppl = [c["ppl_exported"] for c in mine]
        summary[str(k)] = {
            "ppl_median": statistics.median(ppl),
            "ppl_range": [min(ppl), max(ppl)],
            "seconds_per_step_median": statistics.median(c["seconds_per_step"] for c in mine),
            "peak_rss_gb_median": statistics.median(c["peak_rss_gb"] for c in mine if c["peak_rss_gb"] is not None)
            if any(c["peak_rss_gb"] is not None for c in mine)
            else None,
        }
        for key in ("ppl_2048", "piqa_acc", "arc_easy_acc", "accuracy_mean"):
            vals = [c[key] for c in mine if c.get(key) is not None]
            if vals:
                summary[str(k)][f"{key}_median"] = statistics.median(vals)
                summary[str(k)][f"{key}_range"] = [min(vals), max(vals)]
    summary.update({"dense": c for c in cells if c.get("method") == "dense"})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": {"platform": platform.platform(), "cpu": platform.processor(), "cores": os.cpu_count()},
                "cells": cells,
                "summary": summary,
            },
            indent=1,
        )
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
