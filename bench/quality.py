"""Issue 26's comparison: the arms of a pruned model's quality for its minutes, each a ``method`` name.

Arms (all from the same calibration text, the run's default dtype):

- ``maskprune-2026-11-30``: the default recipe as of 2026-11-30 (heads + FFN, Wanda-sp prior, measured split,
  every step distils the masked full-width model, 128-token windows, 4 a step), ``--steps`` the run's default 400.
- ``maskprune``: the default as of 2026-12-04 (the prior's cut with the searched shape, re-fit, then the sliced
  model distilled on 512-token windows, one a step) for ``--steps`` that fill the same minutes.
- ``heads-ffn``: the same with heads and FFN channels only (``--prune-axes heads,ffn``).
- ``refit-dense`` / ``no-refit``: the default with the cross-model re-fit (``--reconstruct-target dense``) / with
  no re-fit (``--no-reconstruct``); with ``--steps arm=0`` the cut alone.
- ``flap`` (the one-shot method alone) and ``flap+recovery`` (``--recover-steps`` that fill the same minutes).

Steps per arm are given on the command line (``--steps arm=N``), set from measured seconds per step so every
arm spends the old default's minutes; the table reports each run's measured minutes, so equal minutes is checked,
not assumed. Perplexity: WikiText-2 raw test at 2048 tokens on its first 16k tokens, fp32. Accuracy (PIQA all
1,838, ARC-e all 2,376) where ``--tasks`` asks for it.

    python bench/quality.py --work runs/quality --model smollm2-135m --sparsity 20 --seeds 0,1,2 \\
        --arms maskprune-2026-11-30,maskprune --steps maskprune=240 --out bench/results/2026-12-04-quality
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMON = "--eval-data none --no-report --dtype auto"
OLD_WINDOWS = ["--seq-len", "128", "--batch-size", "4", "--prior-samples", "128", "--split-search-samples", "16"]
"""The 2026-11-30 default's windows: 128 tokens, 4 a step, the prior on 128 windows, the split search on 16."""
ARMS = {
    # the default as of 2026-11-30: the masked path, heads + FFN, no re-fit, its windows (1024 of 128 tokens)
    "maskprune-2026-11-30": ["--no-cut-first", "--calib-samples", "1024", "--val-windows", "16", *OLD_WINDOWS],
    "maskprune": [],  # the default: cut first, the shape searched, re-fit, the sliced model distilled
    "heads-ffn": ["--prune-axes", "heads,ffn"],  # the same with heads and FFN channels only
    "refit-dense": ["--reconstruct-target", "dense"],  # the default with the cross-model re-fit
    "no-refit": ["--no-reconstruct"],  # the default without any re-fit
    "flap": ["--method", "flap"],
    "flap+recovery": ["--method", "flap"],
}
"""Every arm but the first runs the default windows (512 tokens, one a step, 512 of them: fresh each step).
Runs before the default changed (2026-12-04) passed the same settings explicitly (``--cut-first --reconstruct
--prune-axes heads,ffn,hidden,layers --seq-len 512 --batch-size 1 --split-search-samples 4 --prior-samples 32
--calib-samples 512``)."""
STEPS_FLAG = {"flap+recovery": "--recover-steps"}
NAMES = {"smollm2-135m": "smollm2-135m"}


def run_cell(
    c: dict, model: str, name_: str, work: Path, threads: int, tasks: str | None, data_dir: str | None
) -> dict:
    """Prune (if not done) and evaluate (if not done) one cell; its row in the issue's schema."""
    name = f"{c['method']}-s{c['sparsity']}-seed{c['seed']}".replace("+", "_")
    folder, evals = work / name, work / f"{name}.eval.json"
    cmd = [sys.executable, "-m", "maskprune", "-q"]
    timing = work / f"{name}.seconds"
    if not (folder / "maskprune_report.json").is_file():
        arm = ARMS[c["method"]]
        prune = ["prune", model, "--sparsity", f"{c['sparsity'] / 100}", *arm, *COMMON.split()]
        if c["steps"] is not None:
            prune += [STEPS_FLAG.get(c["method"], "--steps"), str(c["steps"])]
        t = time.perf_counter()
        prune += ["--seed", str(c["seed"]), "--threads", str(threads), "--out", str(folder), "--overwrite"]
        subprocess.run([*cmd, *prune], check=True)
        timing.write_text(f"{time.perf_counter() - t:.1f}\n")
    if not evals.is_file():
        ev = ["eval", str(folder), "--seq-len", "2048", "--ppl-tokens", "16384", "--dtype", "fp32", "--out", str(evals)]
        if tasks:
            ev += ["--tasks", tasks, "--data-dir", data_dir]
        subprocess.run([*cmd, *ev], check=True)
    report = json.loads((folder / "maskprune_report.json").read_text())
    result = json.loads(evals.read_text())["models"][str(folder)]
    acc = work / f"{name}.acc.json"  # accuracy measured apart (eval --ppl none --tasks piqa,arc_easy)
    if acc.is_file():
        result = {**result, "zeroshot": json.loads(acc.read_text())["models"][str(folder)]["zeroshot"]}
    zs = (result.get("zeroshot") or {}).get("tasks", {})
    shape = report["shape"]
    return {
        "model": name_,
        "method": c["method"],
        "sparsity": c["sparsity"] / 100,
        "seed": c["seed"],
        "params": report["params"]["exported"],
        "shape": {
            k: shape[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
        },
        "minutes": round(float(timing.read_text()) / 60, 2) if timing.is_file() else None,
        "steps": c["steps"],
        "ppl_2048": result["perplexity"]["2048"]["ppl"],
        "piqa_acc": (zs.get("piqa") or {}).get("acc"),
        "piqa_stderr": (zs.get("piqa") or {}).get("acc_stderr"),
        "arc_easy_acc": (zs.get("arc_easy") or {}).get("acc"),
        "arc_easy_stderr": (zs.get("arc_easy") or {}).get("acc_stderr"),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | method | sparsity | seeds | steps | minutes (median) | shape (L / hidden / heads / FFN) |"
        " ppl@2048 median [min, max] | PIQA acc (seed 0) | ARC-e acc (seed 0) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["sparsity"]), []).append(r)
    for (model, method, s), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        p = sorted(r["ppl_2048"] for r in rs)
        spread = f"{statistics.median(p):.2f} [{p[0]:.2f}, {p[-1]:.2f}]" if len(p) > 1 else f"{p[0]:.2f}"
        minutes = statistics.median(r["minutes"] for r in rs if r["minutes"] is not None)
        sh = rs[0]["shape"]
        shape = (
            f"{sh['num_hidden_layers']} / {sh['hidden_size']} / {sh['num_attention_heads']} / {sh['intermediate_size']}"
        )
        first = min(rs, key=lambda r: r["seed"])
        acc = [
            f"{100 * first[k]:.2f} ± {100 * first[k.replace('acc', 'stderr')]:.2f}" if first[k] is not None else "-"
            for k in ("piqa_acc", "arc_easy_acc")
        ]
        lines.append(
            f"| {model} | {method} | {s:.0%} | {len(p)} | {rs[0]['steps'] or '-'} | {minutes:.1f} | {shape} | {spread} "
            f"| {acc[0]} | {acc[1]} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--name", default=None, help="the model's name in the results (default: known names, else the stem)")
    p.add_argument("--sparsity", type=int, default=20, help="percent")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--steps", action="append", default=[], help="arm=N (training or recovery steps of that arm)")
    p.add_argument("--tasks", default=None, help="e.g. piqa,arc_easy (all examples)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="merge the rows into <out>.json and rewrite <out>.md")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    steps = {k: int(v) for k, v in (s.split("=") for s in a.steps)}
    cells = [
        {"method": m, "sparsity": a.sparsity, "seed": int(seed), "steps": steps.get(m)}
        for seed in a.seeds.split(",")
        for m in a.arms.split(",")
    ]
    name = a.name or NAMES.get(a.model, Path(a.model).stem)
    rows = [run_cell(c, a.model, name, a.work, a.threads, a.tasks, a.data_dir) for c in cells]
    if a.out:
        path = a.out.with_suffix(".json")
        old = json.loads(path.read_text())["cells"] if path.is_file() else []
        key = ("model", "method", "sparsity", "seed")
        merged = {tuple(r[k] for k in key): r for r in old + rows}
        rows = list(merged.values())
        path.write_text(json.dumps({"cells": rows}, indent=1) + "\n")
        a.out.with_suffix(".md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
