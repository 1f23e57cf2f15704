"""Why the held-out KL stops falling (issue 36 part 4): one cause at a time, on one cut, at equal steps.

Each arm distils the same cut (a ``maskprune prune --steps 0`` export) from its dense teacher with the default
distillation and one change (``NAME:JSON`` overrides of the config: LoRA rank, learning rate, full fine-tuning at
its own rate, the loss, data reuse), for ``--steps`` steps, validating on ``--val-windows`` held-out windows every
``--every`` steps. Per arm: the held-out KL at every validation, the training KL averaged over the same blocks,
the KL bought by the second half of the steps, the train / held-out gap at the end, the seconds a step. Each arm
runs in its own process, one after the other; a finished arm (its JSON exists) is not run again.

    python bench/kl_plateau.py runs/cut20 --teacher smollm2-135m --steps 400 --every 25 --seeds 0 \
        --arm 'base:{}' --arm 'rank32:{"lora_rank":32}' --arm 'lr3e-3:{"lora_lr":3e-3}' \
        --arm 'full:{"full":true,"lora_lr":5e-5}' --arm 'topk64:{"teacher_topk":64}' \
        --arm 'reuse64:{"calib_samples":64}' --work runs/plateau --out bench/results/<date>-kl-plateau.json

Reading it: where the training KL keeps falling while the held-out one stalls, the student is fitting its windows
(data); where both stall together, the update cannot go further (capacity: rank, full; or rate: lr); an arm that
changes the slope of the second half names the mechanism, one that moves the whole curve only shifts it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _arm(text: str) -> tuple[str, dict]:
    name, _, overrides = text.partition(":")
    return name, json.loads(overrides or "{}")


def _one(a: argparse.Namespace, name: str, overrides: dict, seed: int) -> dict:
    """Run one arm in this process and summarise its metrics."""
    from maskprune import distill

    out = a.work / f"{name}-s{seed}"
    options = {"steps": a.steps, "val_every": a.every, "val_windows": a.val_windows, "seed": seed}
    options.update(eval_max_windows=a.eval_windows, overwrite=True, progress=False, **overrides)
    start = time.perf_counter()
    distill(str(a.cut), teacher=a.teacher, out=out, **options)
    wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # distill: no recovery_ prefix
    val = [(r["step"] + 1, r["val_kl"]) for r in rows if "val_kl" in r]
    blocks = {}
    for r in rows:
        blocks.setdefault(r["step"] // a.every, []).append(r["kl"])
    train = [((b + 1) * a.every, statistics.mean(v)) for b, v in sorted(blocks.items())]
    half = min(val, key=lambda sv: abs(sv[0] - a.steps // 2))
    report = json.loads((out / "maskprune_report.json").read_text())
    return {
        "arm": name,
        "overrides": overrides,
        "seed": seed,
        "steps": a.steps,
        "val_kl": val,
        "train_kl": train,
        "val_kl_end": val[-1][1],
        "second_half_gain": half[1] - val[-1][1],
        "train_val_gap_end": val[-1][1] - train[-1][1],
        "seconds_per_step": statistics.median(r["seconds"] for r in rows[2:]) if len(rows) > 2 else None,
        "ppl_exported": (report["perplexity"].get("exported") or {}).get("ppl"),
        "wall_seconds": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cut", type=Path, help="the cut to distil (maskprune prune --steps 0)")
    p.add_argument("--teacher", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=25, help="validate every N steps")
    p.add_argument("--val-windows", type=int, default=16, help="held-out windows (more: less noise per point)")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seeds", default="0")
    p.add_argument("--arm", action="append", required=True, help="NAME:JSON config overrides ('base:{}')")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: NAME@SEED, run in this process
    a = p.parse_args()
    arms = dict(_arm(x) for x in a.arm)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.one:
        name, seed = a.one.split("@")
        cell = _one(a, name, arms[name], int(seed))
        (a.work / f"{name}-s{seed}.json").write_text(json.dumps(cell, indent=1))
        return
    cells = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for name in arms:
            done = a.work / f"{name}-s{seed}.json"
            if not done.exists():
                argv = [sys.executable, *sys.argv, "--one", f"{name}@{seed}"]
                if subprocess.run(argv).returncode != 0:
                    sys.exit(f"arm {name} seed {seed} failed")
            cells.append(json.loads(done.read_text()))
            _write(a, cells)


def _write(a: argparse.Namespace, cells: list[dict]) -> None:
    a.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"platform": platform.platform(), "cpu": platform.processor(), "cores": os.cpu_count()},
        "cells": cells,
    }
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    lines = ["| arm | seed | held-out KL: " + ", ".join(f"@{s}" for s, _ in cells[0]["val_kl"]) + " | 2nd half gain |"
             " train-val gap | s/step | ppl |", "|" + " --- |" * 7]  # fmt: skip
    for c in cells:
        curve = ", ".join(f"{v:.4f}" for _, v in c["val_kl"])
        lines.append(
            f"| {c['arm']} | {c['seed']} | {curve} | {c['second_half_gain']:.4f} | {c['train_val_gap_end']:.4f} | "
            f"{c['seconds_per_step'] or 0:.2f} | {c['ppl_exported'] or float('nan'):.2f} |"
        )
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
