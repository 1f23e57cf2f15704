"""The tokens-vs-quality curve of recovery by distillation (``maskprune distill``).

Starts: SmolLM2-135M at 20 % and 50 %, pruned by the default recipe and by the best one-shot method (FLAP with
its bias compensation and layer-by-layer calibration), each with 3 seeds. Each start is recovered by
``maskprune distill --teacher DENSE`` (LoRA, merged) for the number of steps that 5, 15 and 60 minutes buy on
the reference CPU (2 cores), and evaluated with ``maskprune eval`` (WikiText-2 ppl@2048 on the first 16k
tokens, all 1,838 PIQA examples), the same protocol as the quality grid. Two more arms ask whether recovery
pays *inside* the default run's budget, at equal CPU time: the default recipe with a third of its steps given
instead to recovery after the cut (``split-...-inbudget``), and the one-shot cut first, then recovery for the
rest of the default run's minutes (``flap-...-inbudget``).

The step counts come from CPU timings measured here (``--measure-cpu`` writes them), so the curve can be run
on any device with the same numerics (fp32) and still reads in minutes of the reference machine:

    python bench/recovery.py --measure-cpu --cpu-timing bench/results/2026-11-30-recovery-cpu-timing.json
    python bench/recovery.py --cpu-timing bench/results/2026-11-30-recovery-cpu-timing.json \
        --model SmolLM2-135M-Instruct.Q4_1.gguf --data-dir ../shared/data --work runs/recovery --jobs 8

Unattended and resumable: a task whose output exists is skipped; after every task the summary
(``<results>/recovery.json`` and ``.md``) is rewritten from everything finished; ``--deadline`` stops starting
new tasks after that many seconds (most important first: every seed-0 task, then seeds 1 and 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

EXE = [sys.executable, "-m", "maskprune", "-q"]
STEPS = 120  # the default run's steps on the reference CPU (its 15-minute budget; see the quality results)
SPLIT_SHARE = 1 / 3  # the split arm gives this share of those steps to recovery after the cut
BATCH, SEQ = 4, 128


@dataclass
class Task:
    name: str
    cmd: list[str]
    done: Path  # exists once the task has finished
    deps: list[str] = field(default_factory=list)
    priority: int = 0


def _prune_cmd(
    model: str, method: str, sparsity: float, seed: int, steps: int, out: Path, threads: int, calib: int = 256
) -> list[str]:
    cmd = [*EXE, "prune", model, "--sparsity", str(sparsity), "--seed", str(seed), "--out", str(out), "--overwrite"]
    cmd += ["--calib-samples", str(calib), "--eval-data", "none", "--no-report", "--threads", str(threads)]
    cmd += ["--dtype", "fp32", "--weight-dtype", "fp32"]
    return cmd + (["--steps", str(steps)] if method == "maskprune" else ["--method", method])


def _distill_cmd(student: Path, teacher: str, steps: int, seed: int, out: Path, threads: int) -> list[str]:
    # one pass over the calibration text: as many windows as the steps read (no window seen twice)
    windows = max(256, steps * BATCH)
    cmd = [*EXE, "distill", str(student), "--teacher", teacher, "--steps", str(steps), "--seed", str(seed)]
    cmd += ["--calib-samples", str(windows), "--out", str(out), "--overwrite", "--eval-data", "none"]
    return cmd + ["--no-report", "--threads", str(threads), "--dtype", "fp32", "--weight-dtype", "fp32"]


def _eval_cmd(model: str, out: Path, batch: int, limit: int | None = None) -> list[str]:
    """WikiText-2 ppl@2048 on the first 16k tokens (a minute or two here)."""
    cmd = [*EXE, "eval", model, "--seq-len", "2048", "--ppl-tokens", "16384", "--dtype", "fp32"]
    cmd += ["--batch-size", "4", "--out", str(out)]
    return cmd + (["--limit", str(limit)] if limit else [])


def _piqa_cmd(model: str, out: Path, data_dir: str, batch: int, limit: int | None = None) -> list[str]:
    """All 1,838 PIQA examples (10-15 minutes of the reference CPU for 135M: its own task, run after the ppl)."""
    cmd = [*EXE, "eval", model, "--ppl", "none", "--tasks", "piqa", "--data-dir", data_dir, "--dtype", "fp32"]
    cmd += ["--batch-size", str(batch), "--out", str(out)]
    return cmd + (["--limit", str(limit)] if limit else [])


def _eval_tasks(name: str, model: str, work: Path, a: argparse.Namespace, deps: list[str], priority: int) -> list[Task]:
    """The perplexity and the PIQA evaluation of one model (``<name>.eval.json``, ``<name>.piqa.json``)."""
    return [
        Task(
            f"eval-{name}",
            _eval_cmd(model, work / f"{name}.eval.json", a.eval_batch, a.eval_limit),
            work / f"{name}.eval.json",
            deps,
            priority,
        ),
        Task(
            f"piqa-{name}",
            _piqa_cmd(model, work / f"{name}.piqa.json", a.data_dir, a.eval_batch, a.eval_limit),
            work / f"{name}.piqa.json",
            deps,
            priority,
        ),
    ]


def recovery_steps(minutes: float, step_seconds: float) -> int:
    """Distillation steps that ``minutes`` of the reference CPU buy at ``step_seconds`` a step."""
    return max(1, round(minutes * 60 / step_seconds))


def inbudget_minutes(start: str, tag: str, timing: dict, prune_steps: int) -> float:
    """Recovery minutes that fit in the default run's CPU budget: for ``split`` the learning steps it gives up,
    for ``flap`` (cut first) what the default recipe spends beyond FLAP's prune."""
    if start == "split":
        moved = round(prune_steps * SPLIT_SHARE)
        return moved * timing["learn_step_s"][tag] / 60
    if start == "flap":
        return (timing["prune_s"][f"default-{tag}"] - timing["prune_s"][f"flap-{tag}"]) / 60
    raise ValueError(f"no in-budget arm for the {start!r} start")


def _labels(start: str, minutes: list[float]) -> list[str]:
    """The recovery points of a start: ``0min`` (the start itself, not for split), each budget in minutes, and
    ``inbudget`` (split and flap) - recovery that fits in the default run's CPU minutes."""
    timed = [f"{m:g}min" for m in minutes]
    return {"default": ["0min", *timed], "flap": ["0min", *timed, "inbudget"], "split": ["inbudget"]}[start]


def _label_minutes(start: str, tag: str, label: str, timing: dict, prune_steps: int) -> float:
    """The recovery CPU minutes of a point: ``<M>min`` is M, ``inbudget`` what fits in the default budget."""
    return inbudget_minutes(start, tag, timing, prune_steps) if label == "inbudget" else float(label[:-3])


def plan(a: argparse.Namespace, timing: dict) -> list[Task]:
    work, tasks = Path(a.work), []
    model = a.model
    tasks += _eval_tasks("dense", model, work, a, [], -1)
    for seed in a.seeds:
        for s in a.sparsities:
            tag = f"s{round(s * 100)}"
            split_steps = a.prune_steps - round(a.prune_steps * SPLIT_SHARE)  # the rest moves to recovery
            starts = {
                "default": ("maskprune", a.prune_steps),
                "flap": ("flap", 0),
                "split": ("maskprune", split_steps),
            }
            for start, (method, steps) in starts.items():
                key = f"{start}-{tag}-seed{seed}"
                folder = work / key
                tasks.append(
                    Task(
                        f"prune-{key}",
                        _prune_cmd(model, method, s, seed, steps, folder, a.threads, a.calib_samples),
                        folder / "maskprune_report.json",
                        priority=seed,
                    )
                )
                step_s = timing["distill_step_s"][f"{'flap' if start == 'flap' else 'default'}-{tag}"]
                for label in _labels(start, a.minutes):
                    if label == "0min":
                        tasks += _eval_tasks(key, str(folder), work, a, [f"prune-{key}"], seed)
                        continue
                    rkey = f"{key}-{label}"
                    n = recovery_steps(_label_minutes(start, tag, label, timing, a.prune_steps), step_s)
                    tasks.append(
                        Task(
                            f"distill-{rkey}",
                            _distill_cmd(folder, model, n, seed, work / rkey, a.threads),
                            work / rkey / "maskprune_report.json",
                            [f"prune-{key}"],
                            priority=seed,
                        )
                    )
                    tasks += _eval_tasks(rkey, str(work / rkey), work, a, [f"distill-{rkey}"], seed)
    return tasks


def _resumed(cmd: list[str]) -> list[str]:
    """A prune or distill whose run was interrupted (``<out>.checkpoints`` holds a checkpoint) continues it with
    ``--resume`` (exact) instead of starting over."""
    if "--out" not in cmd or "--overwrite" not in cmd:
        return cmd
    out = Path(cmd[cmd.index("--out") + 1])
    ckpts = out.with_name(out.name + ".checkpoints")
    if not ckpts.is_dir() or not any(ckpts.iterdir()):
        return cmd
    return [("--resume" if c == "--overwrite" else c) for c in cmd]


def select(tasks: list[Task], only: list[str] | None) -> list[Task]:
    """The tasks whose names match one of the ``only`` patterns (regular expressions), with every task they
    depend on, ranked by the first pattern they match (then seed); all tasks when ``only`` is None."""
    if not only:
        return tasks
    by_name = {t.name: t for t in tasks}
    rank = {}
    for i, pat in enumerate(only):
        for t in tasks:
            if t.name not in rank and re.fullmatch(pat, t.name):
                rank[t.name] = i
    todo = list(rank)
    while todo:  # dependencies rank with their first dependant
        name = todo.pop()
        for d in by_name[name].deps:
            if d not in rank or rank[d] > rank[name]:
                rank[d] = rank[name]
                todo.append(d)
    chosen = [t for t in tasks if t.name in rank]
    for t in chosen:
        t.priority = rank[t.name]
    return chosen


def run_all(tasks: list[Task], jobs: int, deadline: float, log_dir: Path, on_done, threads: int = 2) -> dict[str, str]:
    """Run ``tasks`` (a DAG) ``jobs`` at a time, most important first; a failed task's dependants are skipped."""
    state: dict[str, str] = {t.name: "done" for t in tasks if t.done.exists()}
    t0, running = time.monotonic(), {}
    lock = threading.Lock()

    def launch(t: Task) -> float:
        s = time.monotonic()
        with open(log_dir / f"{t.name}.log", "a") as fh:
            cmd = _resumed(t.cmd)
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # eval has no --threads; torch reads this
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0:
            raise RuntimeError(f"{t.name} exited {rc}")
        return time.monotonic() - s

    with ThreadPoolExecutor(jobs) as pool:
        while True:
            ready = [
                t
                for t in tasks
                if t.name not in state
                and t.name not in {r.name for r in running.values()}
                and all(state.get(d) == "done" for d in t.deps)
            ]
            for t in tasks:  # dependants of a failure will never run
                if t.name not in state and any(state.get(d) in ("failed", "skipped") for d in t.deps):
                    state[t.name] = "skipped"
            ready.sort(key=lambda t: (t.priority, t.name.split("-")[0] != "prune", t.name))
            while ready and len(running) < jobs and time.monotonic() - t0 < deadline:
                t = ready.pop(0)
                running[pool.submit(launch, t)] = t
                print(f"[{time.monotonic() - t0:6.0f}s] start {t.name}", flush=True)
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in finished:
                t = running.pop(f)
                err = f.exception()
                with lock:
                    state[t.name] = "failed" if err else "done"
                print(
                    f"[{time.monotonic() - t0:6.0f}s] {'FAILED' if err else 'done'} {t.name}"
                    + (f" ({err})" if err else f" in {f.result():.0f} s"),
                    flush=True,
                )
                on_done()
    return state


def _model_result(path: Path) -> dict | None:
    if not path.exists():
        return None
    (m,) = json.loads(path.read_text())["models"].values()
    return m


def _eval_row(path: Path) -> dict | None:
    """ppl@2048 from ``<name>.eval.json`` and PIQA from ``<name>.piqa.json`` beside it (None until it exists)."""
    m = _model_result(path)
    if m is None:
        return None
    ppl = (m.get("perplexity") or {}).get("2048", {}).get("ppl")
    z = _model_result(path.with_name(path.name.replace(".eval.json", ".piqa.json"))) or {}
    piqa = ((z.get("zeroshot") or {}).get("tasks") or {}).get("piqa", {})
    return {"ppl2048": ppl, "piqa": piqa.get("acc"), "piqa_stderr": piqa.get("acc_stderr")}


def _cells(work: Path, name: str, seed: int, label: str) -> dict | None:
    """One seed's measurements of one (start, sparsity, recovery) point from the work folder (None until
    evaluated): perplexity, PIQA, and the distillation's steps, tokens and seconds from its report."""
    row = _eval_row(work / f"{name}.eval.json")
    if row is None:
        return None
    rep = work / name / "maskprune_report.json"
    d = json.loads(rep.read_text()).get("distill") if label != "0min" and rep.exists() else None
    return {
        **row,
        "seed": seed,
        "steps": d["steps"] if d else 0,
        "tokens": d["tokens"] if d else 0,
        "device_seconds": d["seconds"] if d else None,
    }


def _included(paths: list[str]) -> tuple[dict | None, dict[tuple, list[dict]]]:
    """The dense row and the per-seed cells of earlier summaries (``recovery.json`` of other work folders or
    sessions), keyed by (sparsity, start, recovery label); each cell remembers the summary it came from."""
    dense, cells = None, {}
    for path in paths:
        prev = json.loads(Path(path).read_text())
        dense = dense or prev.get("dense")
        for r in prev["rows"]:
            key = (r["sparsity"], r["start"], r["recovery"])
            have = {c["seed"] for c in cells.get(key, [])}
            cells.setdefault(key, []).extend(
                {**c, "source": c.get("source", str(path))} for c in r["cells"] if c["seed"] not in have
            )
    return dense, cells


def _row(s: float, start: str, label: str, minutes: float, total: float, cells: list[dict]) -> dict:
    """Medians and ranges over the seeds of one point (perplexity and PIQA counted separately)."""
    cells = sorted(cells, key=lambda c: c["seed"])
    ppls = [c["ppl2048"] for c in cells]
    accs = [c["piqa"] for c in cells if c["piqa"] is not None]
    return {
        "sparsity": s,
        "start": start,
        "recovery": label,
        "recovery_cpu_minutes": round(minutes, 2),
        "total_cpu_minutes": round(total, 2),
        "steps": cells[0]["steps"],
        "tokens": cells[0]["tokens"],
        "seeds": [c["seed"] for c in cells],
        "ppl2048_median": statistics.median(ppls),
        "ppl2048_min": min(ppls),
        "ppl2048_max": max(ppls),
        "piqa_median": statistics.median(accs) if accs else None,
        "piqa_min": min(accs) if accs else None,
        "piqa_max": max(accs) if accs else None,
        "piqa_stderr": next((c["piqa_stderr"] for c in cells if c["piqa"] is not None), None),
        "piqa_seeds": [c["seed"] for c in cells if c["piqa"] is not None],
        "cells": cells,
    }


def summarize(a: argparse.Namespace, timing: dict, results: Path) -> dict:
    """Every finished (start, sparsity, minutes) point: medians over seeds with min and max. Seeds this work
    folder lacks are taken from the summaries named by ``--include`` (the work folder wins for a seed it has)."""
    work = Path(a.work)
    old_dense, old = _included(a.include)
    rows = []
    dense = _eval_row(work / "dense.eval.json") or old_dense
    for s in a.sparsities:
        tag = f"s{round(s * 100)}"
        for start in ("default", "flap", "split"):
            prune_min = timing["prune_s"][f"{'flap' if start == 'flap' else 'default'}-{tag}"] / 60
            for label in _labels(start, a.minutes):
                cells = []
                for seed in a.seeds:
                    key = f"{start}-{tag}-seed{seed}"
                    cell = _cells(work, key if label == "0min" else f"{key}-{label}", seed, label)
                    if cell is not None:
                        cells.append(cell)
                have = {c["seed"] for c in cells}
                cells += [c for c in old.get((s, start, label), []) if c["seed"] not in have]
                if not cells:
                    continue
                minutes = _label_minutes(start, tag, label, timing, a.prune_steps)
                # in budget: the same CPU minutes as the default run
                total = timing["prune_s"][f"default-{tag}"] / 60 if label == "inbudget" else prune_min + minutes
                rows.append(_row(s, start, label, minutes, total, cells))
    out = {
        "date": a.date,
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "device": _device_name(),
        },
        "included": list(a.include),
        "cpu_timing": timing,
        "dense": dense,
        "rows": rows,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "recovery.json").write_text(json.dumps(out, indent=1))
    (results / "recovery.md").write_text(_table(out))
    return out


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover - the summary is written even without torch
        return "unknown"


def _table(out: dict) -> str:
    lines = [
        f"# Recovery by distillation: tokens vs quality ({out['date']})",
        "",
        f"Command: `{out['command']}`  ",
        f"Machine: {out['machine']}",
        *([f"Seeds this work folder lacks come from: {', '.join(out['included'])}"] if out.get("included") else []),
        "",
        "Cells: the median [min, max] over the seeds counted beside them; one seed: its value.",
        "",
        "| sparsity | start | recovery (CPU min) | steps | tokens | total CPU min | ppl@2048 | seeds | PIQA | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    d = out.get("dense") or {}
    if d:
        lines.append(f"| 0 | dense | - | - | - | - | {d['ppl2048']:.2f} | - | {100 * d['piqa']:.2f} | - |")
    for r in out["rows"]:
        n_piqa = len(r.get("piqa_seeds", [])) if r["piqa_median"] is not None else 0
        ppl = _cell(r["ppl2048_median"], r["ppl2048_min"], r["ppl2048_max"], len(r["seeds"]))
        piqa = _cell(*(100 * r[k] for k in ("piqa_median", "piqa_min", "piqa_max")), n_piqa) if n_piqa else "-"
        lines.append(
            f"| {round(100 * r['sparsity'])} % | {r['start']} | {r['recovery_cpu_minutes']:g} ({r['recovery']}) "
            f"| {r['steps']} | {r['tokens']} | {r['total_cpu_minutes']:.1f} | {ppl} | {len(r['seeds'])} "
            f"| {piqa} | {n_piqa or '-'} |"
        )
    return "\n".join(lines) + "\n"


def _cell(median: float, lo: float, hi: float, n: int) -> str:
    """``median [min, max]`` of ``n`` seeds, or the one value."""
    return f"{median:.2f}" if n == 1 else f"{median:.2f} [{lo:.2f}, {hi:.2f}]"


def measure_cpu(a: argparse.Namespace) -> dict:
    """Seconds per step on this machine: learning (default recipe) and distillation of each start, and the
    whole prune of each start (one-shot measured whole, the default as its 10-step run plus the other steps)."""
    work = Path(a.work) / "cpu-timing"
    work.mkdir(parents=True, exist_ok=True)
    timing: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "threads": a.threads,
        "learn_step_s": {},
        "distill_step_s": {},
        "prune_s": {},
    }
    n = 10
    for s in a.sparsities:
        tag = f"s{round(s * 100)}"
        for start, method in (("default", "maskprune"), ("flap", "flap")):
            folder = work / f"{start}-{tag}"
            t = time.monotonic()
            subprocess.run(_prune_cmd(a.model, method, s, 0, n, folder, a.threads), check=True)
            wall = time.monotonic() - t
            if method == "maskprune":
                step = _median_step(folder / "metrics.jsonl")
                timing["learn_step_s"][tag] = step
                timing["prune_s"][f"{start}-{tag}"] = round(wall + (a.prune_steps - n) * step, 1)
            else:
                timing["prune_s"][f"{start}-{tag}"] = round(wall, 1)
            d = work / f"{start}-{tag}-distill"
            subprocess.run(_distill_cmd(folder, a.model, n, 0, d, a.threads), check=True)
            timing["distill_step_s"][f"{start}-{tag}"] = _median_step(d / "metrics.jsonl")
    Path(a.cpu_timing).write_text(json.dumps(timing, indent=1))
    return timing


def _median_step(metrics: Path) -> float:
    secs = [json.loads(x)["seconds"] for x in metrics.read_text().splitlines() if x.strip()]
    return round(statistics.median(secs[1:]), 3)  # the first step warms up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="the dense model (teacher and source of every start)")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--work", default="runs/recovery")
    ap.add_argument("--results", default=None, help="where recovery.{json,md} go (default: --work)")
    ap.add_argument(
        "--cpu-timing", required=True, help="JSON of the reference CPU's timings (written by --measure-cpu)"
    )
    ap.add_argument("--measure-cpu", action="store_true", help="measure the timings on this machine and stop")
    ap.add_argument("--sparsities", type=lambda x: [float(v) for v in x.split(",")], default=[0.2, 0.5])
    ap.add_argument("--seeds", type=lambda x: [int(v) for v in x.split(",")], default=[0, 1, 2])
    ap.add_argument("--minutes", type=lambda x: [float(v) for v in x.split(",")], default=[5.0, 15.0, 60.0])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--eval-limit", type=int, default=None, help="smoke tests only: PIQA examples / ppl windows")
    ap.add_argument("--prune-steps", type=int, default=STEPS, help="the default recipe's steps (smoke tests: fewer)")
    ap.add_argument("--calib-samples", type=int, default=256, help="calibration windows of the prunes")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="start no task after this many seconds")
    ap.add_argument(
        "--only",
        type=lambda x: x.split(","),
        default=None,
        help="comma-separated regular expressions over task names (prune-/distill-/eval-/piqa-<start>-s<NN>-seed<N>"
        "[-<M>min|-inbudget], eval-dense): run just those (and what they need), in this order of importance",
    )
    ap.add_argument(
        "--include",
        action="append",
        default=[],
        help="an earlier summary (recovery.json) whose seeds the work folder lacks are carried into this one "
        "(repeatable; each carried cell names its source)",
    )
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    a = ap.parse_args()
    if a.measure_cpu:
        print(json.dumps(measure_cpu(a), indent=1))
        return
    timing = json.loads(Path(a.cpu_timing).read_text())
    work = Path(a.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    results = Path(a.results or a.work)
    tasks = select(plan(a, timing), a.only)
    state = run_all(tasks, a.jobs, a.deadline, work / "logs", lambda: summarize(a, timing, results), a.threads)
    summarize(a, timing, results)
    print(json.dumps({k: v for k, v in state.items() if v != "done"}, indent=1) or "all done")


if __name__ == "__main__":
    main()
