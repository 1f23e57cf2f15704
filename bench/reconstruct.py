"""A reconstructed cut against FLAP's bias compensation and against no fit, before and after distillation.

Every arm is FLAP's layer-by-layer cut of SmolLM2-135M (the same 256 calibration windows of 128 tokens):
``comp`` with FLAP's bias compensation (its default), ``nofit`` without it, ``refit`` with ``--reconstruct``
(the kept o_proj / down_proj columns re-fit by ridge regression, layer by layer). Before distillation the cut is
deterministic (one run per arm); after it (``--recover-steps``, the same steps for both starts) seeds change the
batch order and the LoRA init. Perplexity: WikiText-2 raw test at 2048 tokens on its first 16k tokens, fp32.

    python bench/reconstruct.py --work runs/reconstruct            # runs what is missing, then writes the table
    python bench/reconstruct.py --work runs/reconstruct --out bench/results/2026-12-04-reconstruct

Writes ``<out>.json`` (cells) and ``<out>.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = {"comp": [], "nofit": ["--bias-compensation", "off"], "refit": ["--reconstruct"]}
COMMON = "--calib-samples 256 --seq-len 128 --batch-size 4 --eval-data none --no-report --dtype auto --val-every 0"


def cells(recover: int, seeds: dict[int, list[int]]) -> list[dict]:
    """Every (arm, sparsity, recovery steps, seed) this comparison runs."""
    out = [{"arm": a, "sparsity": s, "recover": 0, "seed": 0} for s in (20, 50) for a in ARMS]
    out += [
        {"arm": a, "sparsity": s, "recover": recover, "seed": seed}
        for s, seed_list in seeds.items()
        for seed in seed_list
        for a in ("comp", "refit")
    ]
    return out


def name(c: dict) -> str:
    tail = f"-rec{c['recover']}-seed{c['seed']}" if c["recover"] else ""
    return f"flap-{c['arm']}-s{c['sparsity']}{tail}"


def run(c: dict, work: Path, threads: int) -> dict:
    """Prune (if not done) and evaluate (if not done) one cell; its row."""
    folder, evals = work / name(c), work / f"{name(c)}.eval.json"
    cmd = [sys.executable, "-m", "maskprune", "-q"]
    if not (folder / "maskprune_report.json").is_file():
        prune = ["prune", "smollm2-135m", "--method", "flap", "--sparsity", f"0.{c['sparsity']}", *ARMS[c["arm"]]]
        prune += ["--recover-steps", str(c["recover"]), "--seed", str(c["seed"]), *COMMON.split()]
        t = time.perf_counter()
        subprocess.run([*cmd, *prune, "--threads", str(threads), "--out", str(folder), "--overwrite"], check=True)
        c["seconds"] = round(time.perf_counter() - t, 1)
    if not evals.is_file():
        ev = ["eval", str(folder), "--seq-len", "2048", "--ppl-tokens", "16384", "--dtype", "fp32", "--out", str(evals)]
        subprocess.run([*cmd, *ev], check=True)
    report = json.loads((folder / "maskprune_report.json").read_text())
    ppl = json.loads(evals.read_text())["models"][str(folder)]["perplexity"]["2048"]["ppl"]
    err = (report.get("reconstruction") or {}).get("relative_error", {})
    return {
        **c,
        "method": f"flap-{c['arm']}" + ("+recovery" if c["recover"] else ""),
        "params": report["params"]["exported"],
        "ppl_2048": ppl,
        "down_error_before": statistics.fmean(err["down_before"]) if err else None,
        "down_error_after": statistics.fmean(err["down_after"]) if err else None,
        "prune_seconds": report["seconds"]["total"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| start | sparsity | recovery steps | seeds | ppl@2048 median [min, max] | down_proj error before -> after | prune s |"
    ]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["sparsity"], r["recover"]), []).append(r)
    for (arm, s, rec), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        p = sorted(r["ppl_2048"] for r in rs)
        err = rs[0]["down_error_before"]
        err_text = f"{err:.3f} -> {rs[0]['down_error_after']:.3f}" if err is not None else "-"
        spread = f"{statistics.median(p):.2f} [{p[0]:.2f}, {p[-1]:.2f}]" if len(p) > 1 else f"{p[0]:.2f}"
        secs = statistics.median(r["prune_seconds"] for r in rs)
        lines.append(f"| {arm} | {s} % | {rec} | {len(p)} | {spread} | {err_text} | {secs:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    p.add_argument("--recover", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows = [run(c, a.work, a.threads) for c in cells(a.recover, {20: [0, 1, 2], 50: [0]})]
    text = table(rows)
    print(text)
    if a.out:
        a.out.with_suffix(".json").write_text(json.dumps({"cells": rows}, indent=1) + "\n")
        a.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
