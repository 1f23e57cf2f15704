"""Proof on the real model: SmolLM2-135M dense vs `maskprune prune` at given sparsities, through the
CLI exactly as a user runs it; full WikiText-2 perplexity at 2048 and 128 (and PIQA if asked).

    python bench/proof.py --name default --sparsity 0.2 0.5 [--prune-args "--steps 900"] [--piqa]

Writes bench/results/<date>-smollm2-<name>.{json,md}; resumable (finished cells are kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "data"
MASKPRUNE = [sys.executable, "-m", "maskprune"]


def run(cmd: list[str]) -> float:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--sparsity", nargs="+", type=float, default=[0.2, 0.5])
    ap.add_argument("--prune-args", default="", help="extra flags for maskprune prune")
    ap.add_argument("--seq-len", default="2048,128")
    ap.add_argument("--piqa", action="store_true", help="also full PIQA (1838 questions) from ../shared/data")
    ap.add_argument("--work", default="runs/proof")
    ap.add_argument("--eval-dtype", default="bf16", choices=["bf16", "fp32"], help="autocast dtype of the evaluation")
    a = ap.parse_args()
    date = datetime.date.today().isoformat()
    out = ROOT / "results" / f"{date}-smollm2-{a.name}.json"
    res = json.loads(out.read_text()) if out.exists() else {"cells": {}}
    res.update(
        {
            "command": "python bench/proof.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
            "date": date,
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        }
    )
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    eval_extra = ["--tasks", "piqa", "--data-dir", str(SHARED)] if a.piqa else []

    def evaluate(label: str, model: str) -> None:
        if label in res["cells"] and "eval" in res["cells"][label]:
            return
        path = work / f"eval-{a.name}-{label}.json"
        secs = run(
            [
                *MASKPRUNE,
                "-q",
                "eval",
                model,
                "--seq-len",
                a.seq_len,
                "--dtype",
                a.eval_dtype,
                "--batch-size",
                "2",
                "--out",
                str(path),
                *eval_extra,
            ]
        )
        r = json.loads(path.read_text())["models"][model]
        res["cells"].setdefault(label, {})["eval"] = r
        res["cells"][label]["eval_seconds"] = secs
        save()

    def save() -> None:
        out.write_text(json.dumps(res, indent=1))
        lines = [
            f"# SmolLM2-135M: dense vs maskprune ({a.name}, {date})",
            "",
            f"`{res['command']}`",
            "",
            f"Machine: {res['machine']}",
            "",
            "Perplexity: WikiText-2 raw test (shipped copy), rows joined with \\n\\n, non-overlapping windows, "
            f"remainder dropped, exp(mean NLL), {a.eval_dtype} autocast over fp32 weights, no BOS added (the tokenizer adds none).",
            "",
            "| model | params | sparsity | heads / KV / FFN per layer | ppl@2048 | ppl@128 | PIQA acc | PIQA acc_norm | prune wall time |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, c in res["cells"].items():
            e = c.get("eval", {})
            ppl = e.get("perplexity", {})
            sh = e.get("shape", {})
            zs = ((e.get("zeroshot") or {}).get("tasks") or {}).get("piqa", {})
            p = c.get("report", {}).get("params", {})
            lines.append(
                f"| {label} | {e.get('params', 0) / 1e6:.2f}M | {p.get('sparsity', 0):.3f} | "
                f"{sh.get('num_attention_heads')} / {sh.get('num_key_value_heads')} / {sh.get('intermediate_size')} | "
                f"{ppl.get('2048', {}).get('ppl', float('nan')):.2f} | {ppl.get('128', {}).get('ppl', float('nan')):.2f} | "
                f"{zs.get('acc', float('nan')):.4f} | {zs.get('acc_norm', float('nan')):.4f} | "
                f"{c.get('prune_seconds', 0) / 60:.1f} min |"
            )
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    evaluate("dense", "smollm2-135m")
    for s in a.sparsity:
        label = f"s{round(100 * s)}"
        run_dir = work / f"{a.name}-{label}"
        if not (label in res["cells"] and "report" in res["cells"][label]):
            secs = run(
                [
                    *MASKPRUNE,
                    "-q",
                    "prune",
                    "smollm2-135m",
                    "--sparsity",
                    str(s),
                    "--out",
                    str(run_dir),
                    "--overwrite",
                    *shlex.split(a.prune_args),
                ]
            )
            rep = json.loads((run_dir / "maskprune_report.json").read_text())
            res["cells"].setdefault(label, {}).update(
                {
                    "prune_seconds": secs,
                    "report": {
                        k: rep[k]
                        for k in (
                            "params",
                            "shape",
                            "cut",
                            "final_state",
                            "cut_mask_mass_share",
                            "perplexity",
                            "seconds",
                            "config",
                            "parity",
                        )
                    },
                }
            )
            save()
        evaluate(label, str(run_dir))
    save()


if __name__ == "__main__":
    main()
