"""Measure the effect of hyperparameters on SmolLM2-135M: one short prune per setting, same data,
same steps, same evaluation; writes bench/results/<date>-tune-<name>.{json,md}.

    python bench/tune.py --name s20 --sparsity 0.2 --steps 120 \
        --grid 'base:{}' 'kl_fwd:{"kl_direction":"teacher_student"}' 'lora5e-3:{"lora_lr":5e-3}'

Each cell is resumable: a finished cell (its report exists) is not run again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import time
from pathlib import Path

from maskprune import load_config, prune

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--work", default="/tmp/maskprune-tune")
    ap.add_argument("--grid", nargs="+", required=True, help="label:{json overrides}")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    date = datetime.date.today().isoformat()
    out_json = ROOT / "results" / f"{date}-tune-{a.name}.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {"cells": {}}
    results.update(
        {
            "command": "python bench/tune.py " + " ".join(__import__("sys").argv[1:]),
            "date": date,
            "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cores",
            "common": {
                "model": "smollm2-135m",
                "sparsity": a.sparsity,
                "steps": a.steps,
                "seq_len": a.seq_len,
                "batch_size": a.batch_size,
                "eval": f"WikiText-2 raw test, first {a.eval_windows} windows of 512",
            },
        }
    )
    for cell in a.grid:
        label, _, js = cell.partition(":")
        if label in results["cells"]:
            continue
        over = {
            "model": "smollm2-135m",
            "sparsity": a.sparsity,
            "steps": a.steps,
            "seq_len": a.seq_len,
            "batch_size": a.batch_size,
            "eval_max_windows": a.eval_windows,
            "eval_seq_len": 512,
            "out": f"{a.work}/{a.name}-{label}",
            "overwrite": True,
            "checkpoint_every": 0,
            **json.loads(js or "{}"),
        }
        t = time.time()
        r = prune(load_config(overrides=over), progress=False).report
        metrics = [json.loads(x) for x in Path(r["out"], "metrics.jsonl").read_text().splitlines()]
        tail = metrics[-10:]
        results["cells"][label] = {
            "overrides": json.loads(js or "{}"),
            "command": results["command"],
            "ppl_dense": r["perplexity"]["dense"]["ppl"],
            "ppl_before_cut": r["perplexity"]["before_cut"]["ppl"],
            "ppl_exported": r["perplexity"]["exported"]["ppl"],
            "final_kl": sum(m["kl"] for m in tail) / len(tail),
            "cut": r["cut"],
            "cut_mass_share": r["cut_mask_mass_share"],
            "sigma": r["final_state"]["sigma"],
            "seconds": round(time.time() - t, 1),
        }
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1))
        commands = sorted({c.get("command", results["command"]) for c in results["cells"].values()})
        lines = [
            f"# Tuning {a.name} ({date})",
            "",
            "Commands (cells were added by these runs):",
            "",
            *[f"- `{c}`" for c in commands],
            "",
            f"Machine: {results['machine']}",
            "",
            "| setting | ppl dense | ppl before cut | ppl exported | ratio | KL (last 10) | k_head | k_ffn | cut mass (ffn) | seconds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for lab, c in results["cells"].items():
            lines.append(
                f"| {lab} | {c['ppl_dense']:.2f} | {c['ppl_before_cut']:.2f} | {c['ppl_exported']:.2f} | "
                f"{c['ppl_exported'] / c['ppl_dense']:.2f} | {c['final_kl']:.3f} | {c['cut']['k_head']} | "
                f"{c['cut']['k_ffn']} | {c['cut_mass_share']['ffn']:.4f} | {c['seconds']:.0f} |"
            )
        out_json.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
