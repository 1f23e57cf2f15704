"""What a sweep costs against one run (issue 37): in one session on one machine, one after the other,

1. one point of the curve by hand: ``maskprune prune MODEL --sparsity S --steps N`` and then ``maskprune eval
   --compare MODEL OUT`` on the table's protocol (WikiText-2 at 2048, PIQA + ARC-e): what a user runs today per size;
2. ``maskprune sweep MODEL --sparsity LIST --steps N`` with the same options and protocol,

each timed by the wall clock, after one untimed load of the model (a GGUF's conversion is cached on disk by the first
run of all: neither arm pays it), each arm with its own, empty teacher top-k cache. Writes ``{"sizes": [{"sparsity", "params", "ppl_2048", "piqa_acc", "arc_easy_acc",
"minutes"}], "one_run_minutes", "sweep_minutes", "cost_ratio_vs_one_run", ...}`` with the command, date and machine,
and the ratios both ways: against the prune with its evaluation (what one point costs), and against the prune alone
with the sweep's table evaluations taken out (what the sharing saves in the runs themselves).

    python bench/sweep_cost.py --out /tmp/sc --results bench/results/<date>-sweep.json --data-dir ../shared/data \
        --sparsity 0.1,0.2,0.3,0.4,0.5 --one 0.3 --steps 20 -- smollm2-135m
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _timed(cmd: list[str], log: Path, teacher_cache: Path | None = None) -> float:
    """Seconds ``cmd`` took; ``teacher_cache``: its own teacher top-k folder (each arm computes its windows, as a
    first run does: neither reads what the other computed)."""
    env = {**os.environ, "MASKPRUNE_TEACHER_CACHE": str(teacher_cache)} if teacher_cache else None
    t = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc not in (0, 1):  # sweep: 1 = no size met a target (none is given here)
        sys.exit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return time.perf_counter() - t


def _report(folder: Path) -> dict:
    """A size's run report (its export's reload parity, what it read from the caches)."""
    return json.loads((folder / "maskprune_report.json").read_text())


def _cpu() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor()


def _one_size(work: Path, model: str) -> dict:
    """The one run's pruned model as its evaluation measured it (``one-eval.json``): the cells the sweep's size of
    the same sparsity should match (the same recipe, steps, seed and windows; only the work sharing differs)."""
    models = json.loads((work / "one-eval.json").read_text())["models"]
    pruned = next(v for k, v in models.items() if k != model)
    ppl = pruned["perplexity"].get("2048")
    tasks = (pruned.get("zeroshot") or {}).get("tasks", {})
    return {
        "ppl_2048": ppl["ppl"] if ppl else None,
        **{f"{t}_acc": e[e["average_uses"]] for t, e in tasks.items()},
    }


def markdown(result: dict) -> str:
    """The result as the page a reader opens first: the cost, both ratios, the table, the one run's point."""

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    lines = [
        f"# A 5-size sweep against one run (issue 37), {result['date']}",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores. Code {result.get('commit', '?')}.",
        f"Command: `{result['command']}`",
        "",
        f"- one run (`prune` + `eval --compare`, the dense model and the pruned one): **{result['one_run_minutes']:.1f}"
        f" minutes** (prune {result['one_run_prune_minutes']:.1f}, evaluation {result['one_run_eval_minutes']:.1f})",
        f"- the sweep ({len(result['sizes'])} sizes, the table of every size and the dense model): **"
        f"{result['sweep_minutes']:.1f} minutes** (of which the table's evaluations {result['sweep_eval_minutes']:.1f})",
        f"- **cost ratio {result['cost_ratio_vs_one_run']:.2f}x** one run with its evaluation; "
        f"**{result['cost_ratio_runs_only']:.2f}x** the prune alone with the table's evaluations taken out of the sweep",
        "",
        "| size | params | ppl@2048 | PIQA | ARC-e | minutes (run / table) | shape (L / hidden / heads / FFN) | teacher"
        " windows read / computed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    d = result["dense"]
    lines.append(
        f"| dense | {d['params'] / 1e6:.2f}M | {d['ppl_2048']:.2f} | {pct(d.get('piqa_acc'))} | "
        f"{pct(d.get('arc_easy_acc'))} | - | - | - |"
    )
    for r in sorted(result["sizes"], key=lambda r: r["sparsity"]):
        sh = r["shape"]
        tw = (r.get("teacher_topk_windows") or {}).get("training") or {}
        lines.append(
            f"| {r['sparsity']:.2f} | {r['params'] / 1e6:.2f}M | {r['ppl_2048']:.2f} | {pct(r.get('piqa_acc'))} | "
            f"{pct(r.get('arc_easy_acc'))} | {r['run_minutes']:.1f} / {r['eval_minutes']:.1f} | "
            f"{sh['num_hidden_layers']} / {sh['hidden_size']} / {sh['num_attention_heads']} / "
            f"{sh['intermediate_size']} | {tw.get('read', '-')} / {tw.get('computed', '-')} |"
        )
    one = result.get("one_run_size")
    if one:
        lines += [
            "",
            f"The one run's model ({result.get('one_sparsity', '?')}), on the same protocol: ppl@2048 "
            f"{one['ppl_2048']:.2f}, PIQA {pct(one.get('piqa_acc'))}, ARC-e {pct(one.get('arc_easy_acc'))}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (replaced)")
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--sparsity", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--one", type=float, default=0.3, help="the sparsity of the one run")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--tasks", default="piqa,arc_easy")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--ppl-tokens", type=int, default=None, help="the table's perplexity on the first N tokens")
    ap.add_argument("--render", action="store_true", help="only write --results' markdown (and the one run's point)")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- MODEL [prune options]")
    a = ap.parse_args()
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    model, options = rest[0], rest[1:]
    if a.render:
        result = json.loads(a.results.read_text())
        result.setdefault("one_sparsity", a.one)
        if (a.out / "one-eval.json").is_file():
            result["one_run_size"] = _one_size(a.out, model)
        a.results.write_text(json.dumps(result, indent=1) + "\n")
        a.results.with_suffix(".md").write_text(markdown(result))
        return
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    mp = [sys.executable, "-m", "maskprune", "-q"]
    limit = ["--limit", str(a.limit)] if a.limit else []
    limit += ["--ppl-tokens", str(a.ppl_tokens)] if a.ppl_tokens else []
    one = a.out / "one"
    prune = [*mp, "prune", model, "--sparsity", str(a.one), "--steps", str(a.steps), "--out", str(one), *options]
    evaluate = [*mp, "eval", "--compare", model, str(one), "--seq-len", "2048", "--tasks", a.tasks]
    evaluate += ["--data-dir", a.data_dir, "--out", str(a.out / "one-eval.json"), *limit]
    sweep = [*mp, "sweep", model, "--sparsity", a.sparsity, "--steps", str(a.steps), "--out", str(a.out / "sweep")]
    sweep += ["--tasks", a.tasks, "--data-dir", a.data_dir, *limit, *options]
    warm = [*mp, "eval", model, "--ppl-tokens", "256", "--seq-len", "128", "--out", str(a.out / "warm.json")]
    _timed(warm, a.out / "warm.log")  # untimed: converts and caches a GGUF once, for both arms
    prune_s = _timed(prune, a.out / "one-prune.log", a.out / "one-teacher")
    eval_s = _timed(evaluate, a.out / "one-eval.log")
    sweep_s = _timed(sweep, a.out / "sweep.log", a.out / "sweep-teacher")
    record = json.loads((a.out / "sweep" / "sweep.json").read_text())
    eval_min = sum(r["eval_minutes"] for r in record["sizes"]) + record["dense"]["eval_minutes"]
    one_min, sweep_min = (prune_s + eval_s) / 60, sweep_s / 60
    result = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent).stdout.strip(),  # fmt: skip
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "platform": platform.platform()},
        "commands": {"one_prune": " ".join(prune), "one_eval": " ".join(evaluate), "sweep": " ".join(sweep)},
        "sizes": [
            {
                "sparsity": r["sparsity_asked"],
                "params": r["params"],
                "ppl_2048": r.get("ppl_2048"),
                "piqa_acc": r.get("piqa_acc"),
                "arc_easy_acc": r.get("arc_easy_acc"),
                "minutes": r["minutes"],
                "run_minutes": r["run_minutes"],
                "eval_minutes": r["eval_minutes"],
                "shape": r["shape"],
                "roundtrip_max_abs_diff": _report(a.out / "sweep" / r["label"])["roundtrip"]["max_abs_diff"],
                "roundtrip_tolerance": _report(a.out / "sweep" / r["label"])["roundtrip"]["tolerance"],
                "teacher_topk_windows": _report(a.out / "sweep" / r["label"]).get("recovery", {}).get(
                    "teacher_topk_windows"
                ),
            }
            for r in record["sizes"]
        ],
        "dense": {k: record["dense"].get(k) for k in ("params", "ppl_2048", "piqa_acc", "arc_easy_acc")},
        "steps": a.steps,
        "one_run_minutes": round(one_min, 3),
        "one_run_prune_minutes": round(prune_s / 60, 3),
        "one_run_eval_minutes": round(eval_s / 60, 3),
        "sweep_minutes": round(sweep_min, 3),
        "sweep_eval_minutes": round(eval_min, 3),
        "cost_ratio_vs_one_run": round(sweep_min / one_min, 3),
        "cost_ratio_runs_only": round((sweep_min - eval_min) / (prune_s / 60), 3),
    }
    result["one_sparsity"] = a.one
    result["one_run_size"] = _one_size(a.out, model)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps(result, indent=1) + "\n")
    a.results.with_suffix(".md").write_text(markdown(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("sizes", "commands")}, indent=1))


if __name__ == "__main__":
    main()
