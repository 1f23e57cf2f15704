"""The comparison grid: methods x sparsities (and ablations) on SmolLM2-135M, every cell through
the same `maskprune prune` (same calibration data, steps, budget, uniform cut and export) and the same
`maskprune eval` (WikiText-2 at 2048 and 128 on the same text, zero-shot tasks from --data-dir).

    python bench/grid.py --group main            # 7 methods x 20/25/50 %
    python bench/grid.py --group ablations       # decay rate, prox schedule, multipliers, LoRA, KL+MSE, GQA, split
    python bench/grid.py --group steps           # MaskPrune at 20 % with 2x and 4x the steps
    python bench/grid.py --group numerics        # MaskPrune at 20 %: fp32 path and bf16 weights vs the default
    python bench/grid.py --group seeds           # MaskPrune at 20 % with two more seeds: the run-to-run spread
    python bench/grid.py --group quality --steps 0 --task-limit 0 --weight-dtype auto --dtype auto --eval-dtype fp32 \
        --eval-batch-size 16 --work runs/quality
                                                 # the default recipe (3 seeds) vs the one-shot methods
    python bench/grid.py --group all --dry-run   # list the cells and what is already done

Unattended and resumable: a cell whose evaluation JSON exists is skipped; a cell whose pruned model exists
is only evaluated; a prune interrupted half way resumes from its last checkpoint (`--resume`). After
every cell `bench/results/<date>-smollm2.{json,md}` and the plots are rewritten from all finished cells.
Long: run it in the background, e.g. `nohup python bench/grid.py --group main > grid.log 2>&1 &`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
# The recipe the 2026-11-23/24 groups (main, ablations, steps, numerics, seeds) measured: their learned cells
# run with these flags first, so the groups still reproduce those tables after the default changed.
RECIPE_2026_11_23 = [
    "--mask-init",
    "ones",
    "--mask-optimizer",
    "adamw",
    "--mask-lr",
    "0.1",
    "--mask-lr-schedule",
    "constant",
    "--freeze-share",
    "1",
    "--warmup-share",
    "0.7",
    "--kl-direction",
    "teacher_student",
]
METHODS = {  # label -> prune flags
    "MaskPrune": [],
    "MaskPrune-L0": ["--mask-type", "l0"],
    "MaskPrune-polarization": ["--mask-type", "polarization"],
    "Magnitude": ["--method", "magnitude"],
    "Taylor (LLM-Pruner)": ["--method", "taylor"],
    "Wanda-sp": ["--method", "wanda-sp"],
    "FLAP": ["--method", "flap"],
}
ABLATIONS = {  # label -> prune flags, at 20 % (figures 4-6: the ablations of the method)
    "resource weight flat": ["--resource-weight", "flat"],
    "no LoRA": ["--no-lora"],
    "eta1=0.01": ["--eta1", "0.01"],
    "eta1=1.0": ["--eta1", "1.0"],
    "ffn prox fixed 1": ["--ffn-prox-start", "1", "--ffn-prox-end", "1"],
    "ffn prox fixed 10": ["--ffn-prox-start", "10", "--ffn-prox-end", "10"],
    "fixed y, z": ["--y-init", "2.0", "--z-init", "1.0", "--eta3", "0", "--eta4", "0"],
    "KL + layer MSE (raw, as the paper)": ["--alpha", "1.0", "--layer-mse-norm", "none"],
    "KL + layer MSE (normalised), alpha 1": ["--alpha", "1.0"],
    "KL + layer MSE (normalised), alpha 0.1": ["--alpha", "0.1"],
    "no distillation (LM CE only)": ["--no-distill"],
    "GQA kv_group": ["--gqa-policy", "kv_group"],
}
ABLATIONS_50 = {"resource weight flat": ["--resource-weight", "flat"]}  # the head/FFN split at 50 %
STEPS = {  # MaskPrune at 20 % with more learning (the cell's --steps comes last, so it wins): is 150 too few?
    "MaskPrune, 300 steps": ["--steps", "300"],
    "MaskPrune, 600 steps": ["--steps", "600"],
}
NUMERICS = {  # the fast paths must not lower quality; the default cell is bf16 autocast on fp32 weights
    "MaskPrune, fp32 (no autocast)": ["--dtype", "fp32"],
    "MaskPrune, bf16 base weights": ["--weight-dtype", "bf16"],
    "MaskPrune, torch.compile": ["--compile"],
}
SEEDS = {  # the same cell with other seeds (batch order, LoRA init; the calibration windows stay the same):
    "MaskPrune, seed 1": ["--seed", "1"],  # how far apart two runs of one setting land, to read the rest by
    "MaskPrune, seed 2": ["--seed", "2"],
    "MaskPrune, seed 3": ["--seed", "3"],
    "MaskPrune, seed 4": ["--seed", "4"],
}
QUALITY_ONESHOT = {  # label -> flags; deterministic given the windows: one run each
    "wanda-sp": ["--method", "wanda-sp"],  # calibrated layer by layer (the default, as its reference code)
    "wanda-sp-one-pass": ["--method", "wanda-sp", "--no-layerwise-calibration"],
    "flap": ["--method", "flap"],  # layer by layer, with its bias compensation (the defaults for flap)
    "flap-uncompensated": ["--method", "flap", "--bias-compensation", "off"],
    "flap-one-pass-uncompensated": ["--method", "flap", "--bias-compensation", "off", "--no-layerwise-calibration"],
    "taylor": ["--method", "taylor"],
    "magnitude": ["--method", "magnitude"],
}
QUALITY_SEEDS = [0, 1, 2]  # the default recipe ("maskprune", no flags) at three seeds
QUALITY_CONTROLS = {  # seed 0 only: the recipe that shipped before 2026-11-30, the paper's, and the one-shot
    # prior with a learned selection phase before the recovery (does learning the selection buy anything?)
    "old-default": RECIPE_2026_11_23,
    "paper": ["--recipe", "paper"],
    "learned-selection": ["--freeze-share", "0.6"],  # masks learned for 60 % of the steps, cut ramped, then LoRA
    # the split search's alternative, measured with recovery: one query head of every KV group cut (SmolLM2)
    "heads-cut": ["--no-split-search", "--head-cut-fraction", "0.333"],
}


@dataclass
class Cell:
    name: str  # folder-safe id
    label: str
    group: str
    sparsity: float | None  # None: the dense model
    flags: list[str] = field(default_factory=list)

    @property
    def learned(self) -> bool:
        return "--method" not in self.flags


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def cells(group: str, sparsities: list[float]) -> list[Cell]:
    out = [Cell("dense", "Dense", "dense", None)]
    if group in ("main", "all"):
        for sp in sparsities:  # sparsity-major: a half-finished grid has every method at the first sparsities
            out += [Cell(f"{_slug(m)}-s{round(sp * 100)}", m, "main", sp, f) for m, f in METHODS.items()]
    if group in ("ablations", "all"):
        out += [Cell(f"abl-{_slug(a)}-s50", a, "ablations", 0.5, f) for a, f in ABLATIONS_50.items()]
        out += [Cell(f"abl-{_slug(a)}-s20", a, "ablations", 0.2, f) for a, f in ABLATIONS.items()]
    if group in ("steps", "all"):
        out += [Cell(f"steps-{f[-1]}-s20", a, "steps", 0.2, f) for a, f in STEPS.items()]
    if group in ("numerics", "all"):
        out += [
            Cell(f"num-{_slug(f[0])}{'-' + f[-1] if len(f) > 1 else ''}-s20", a, "numerics", 0.2, f)
            for a, f in NUMERICS.items()
        ]
    if group in ("seeds", "all"):
        out += [Cell(f"seed-{f[-1]}-s20", a, "seeds", 0.2, f) for a, f in SEEDS.items()]
    out = [
        c
        if c.group == "dense" or not c.learned
        else Cell(c.name, c.label, c.group, c.sparsity, RECIPE_2026_11_23 + c.flags)
        for c in out
    ]
    if group == "quality":  # not in "all": its protocol (default steps, full PIQA) differs from the 2026-11-23 grid
        for sp in sparsities:
            tag = f"s{round(sp * 100)}"
            out += [Cell(f"q-{m}-{tag}", m, "quality", sp, f) for m, f in QUALITY_ONESHOT.items()]
            out += [
                Cell(f"q-maskprune-seed{k}-{tag}", "maskprune", "quality", sp, ["--seed", str(k)])
                for k in QUALITY_SEEDS
            ]
            out += [Cell(f"q-{m}-{tag}", m, "quality", sp, f + ["--seed", "0"]) for m, f in QUALITY_CONTROLS.items()]
    return out


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output appended to ``log``; raise on failure; return seconds."""
    t = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        raise RuntimeError(f"exit {code}: {' '.join(cmd)} (see {log})")
    return time.perf_counter() - t


def do_cell(c: Cell, a: argparse.Namespace, work: Path) -> dict:
    res_path = work / f"{c.name}.eval.json"
    meta_path = work / f"{c.name}.cell.json"
    if res_path.exists() and meta_path.exists():
        return json.loads(meta_path.read_text())
    log = work / f"{c.name}.log"
    exe = [sys.executable, "-m", "maskprune", "-q"]
    meta: dict = {"name": c.name, "label": c.label, "group": c.group, "sparsity": c.sparsity, "flags": c.flags}
    model = "smollm2-135m"
    if c.sparsity is not None:
        out = work / c.name
        if not (out / "maskprune_report.json").exists():
            common = (["--steps", str(a.steps)] if a.steps > 0 else []) + [
                "--seq-len",
                str(a.seq_len),
                "--batch-size",
                str(a.batch_size),
                "--calib-samples",
                str(a.calib_samples),
                "--eval-max-windows",
                "4",
                "--no-report",
                "--threads",
                str(a.threads),
                "--weight-dtype",
                a.weight_dtype,
                "--dtype",
                a.dtype,
            ]
            resume = ["--resume"] if (work / f"{c.name}.checkpoints").exists() else []
            meta["prune_seconds"] = run(
                exe
                + [
                    "prune",
                    "smollm2-135m",
                    "--sparsity",
                    str(c.sparsity),
                    "--out",
                    str(out),
                    "--overwrite",
                    *common,
                    *c.flags,
                    *resume,
                ],
                log,
            )
        rep = json.loads((out / "maskprune_report.json").read_text())
        meta["prune_seconds"] = meta.get("prune_seconds") or rep.get("seconds", {}).get("total")
        meta.update(
            params=rep["params"],
            cut=rep["cut"],
            shape=rep["shape"],
            cut_mass_share=rep.get("cut_mask_mass_share"),
            final_state=rep.get("final_state"),
            ppl_during=rep.get("perplexity"),
        )
        model = str(out)
    ev = [
        "eval",
        model,
        "--seq-len",
        a.eval_seq_lens,
        "--ppl-tokens",
        str(a.ppl_tokens),
        "--dtype",
        a.eval_dtype,
        "--batch-size",
        str(a.eval_batch_size),
        "--out",
        str(res_path),
    ]
    skip_tasks = any(m and m in c.flags for m in a.no_tasks_for.split(","))
    if a.tasks and not skip_tasks:
        ev += ["--tasks", a.tasks, "--data-dir", a.data_dir] + (
            ["--limit", str(a.task_limit)] if a.task_limit > 0 else []
        )
    meta["eval_seconds"] = run(exe + ev, log)
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def _tasks_pass(c: Cell, a: argparse.Namespace, work: Path) -> None:
    """Zero-shot tasks alone on a finished cell's model (no perplexity), into ``<cell>.tasks.json``."""
    out, meta_path = work / f"{c.name}.tasks.json", work / f"{c.name}.cell.json"
    if out.exists() or not meta_path.exists():
        print(f"{c.name}: {'done' if out.exists() else 'not pruned yet'}", flush=True)
        return
    model = "smollm2-135m" if c.sparsity is None else str(work / c.name)
    cmd = [sys.executable, "-m", "maskprune", "-q", "eval", model, "--ppl", "none", "--tasks", a.tasks]
    cmd += ["--data-dir", a.data_dir, "--dtype", a.eval_dtype, "--batch-size", str(a.eval_batch_size)]
    cmd += (["--limit", str(a.task_limit)] if a.task_limit > 0 else []) + ["--out", str(out)]
    secs = run(cmd, work / f"{c.name}.log")
    print(f"{c.name}: tasks in {secs:.0f} s", flush=True)


def _training(metrics: Path) -> dict | None:
    """What the learning loop logged (``metrics.jsonl``): the curves for the figure 5/6 plot and a summary:
    the distillation loss over the last 10 % of steps (the paper's figure 5 reads the final training
    loss) and the spread across layers of the alive FFN channel counts (figure 6 reads its variance)."""
    if not metrics.exists():
        return None
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "kl" in r and "step" in r]
    if not recs:
        return None
    k = max(1, len(recs) // 10)
    std = [r.get("ffn_alive_std", math.nan) for r in recs]
    return {
        "kl_last10": sum(r["kl"] for r in recs[-k:]) / k,
        "ffn_std_peak": max(std),
        "ffn_std_final": std[-1],
        "curve": {"step": [r["step"] for r in recs], "kl": [r["kl"] for r in recs], "ffn_std": std},
    }


def _cut_jump(during: dict | None) -> tuple[float, float] | None:
    """Perplexity of the masked model just before the cut and just after it (invariant 6 of docs/method.md),
    as the prune command measured it on a few WikiText-2 windows: the damage the cut itself does."""
    if not during or "before_cut" not in during or "after_cut" not in during:
        return None
    return during["before_cut"]["ppl"], during["after_cut"]["ppl"]


def _row(meta: dict, ev: dict, work: Path | None = None) -> dict:
    m = next(iter(ev["models"].values()))
    zs = dict((m.get("zeroshot") or {}).get("tasks", {}))
    tasks_path = work / f"{meta['name']}.tasks.json" if work and meta.get("name") else None
    if tasks_path is not None and tasks_path.exists():  # a separate --tasks-only pass (full task sets)
        zs.update(next(iter(json.loads(tasks_path.read_text())["models"].values()))["zeroshot"]["tasks"])
    row = {
        "label": meta["label"],
        "group": meta["group"],
        "sparsity": meta["sparsity"],
        "params": m["params"],
        "ppl2048": m["perplexity"]["2048"]["ppl"],
        "ppl128": m["perplexity"].get("128", {}).get("ppl", math.nan),
        "tasks": {
            t: {"acc": v.get("acc"), "acc_norm": v.get("acc_norm"), "n": v.get("n"), "acc_stderr": v.get("acc_stderr")}
            for t, v in zs.items()
        },
        "shape": {k: m["shape"].get(k) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")},
        "prune_seconds": meta.get("prune_seconds"),
        "eval_seconds": meta.get("eval_seconds"),
        "flags": meta.get("flags", []),
        "cut_mass_share": meta.get("cut_mass_share"),
        "cut": meta.get("cut"),
        "cut_jump": _cut_jump(meta.get("ppl_during")),
        "train": _training(work / meta["name"] / "metrics.jsonl") if work and meta.get("name") else None,
    }
    return row


def write_results(rows: list[dict], a: argparse.Namespace, date: str) -> None:
    res = {
        "command": "python bench/grid.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "date": date,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "protocol": {
            "steps": a.steps,
            "seq_len": a.seq_len,
            "batch_size": a.batch_size,
            "calib_samples": a.calib_samples,
            "weight_dtype": a.weight_dtype,
            "calib": "shipped C4 sample (same windows every cell)",
            "ppl_tokens": a.ppl_tokens,
            "tasks": a.tasks,
            "task_limit": a.task_limit,
            "eval_dtype": "bf16 autocast",
        },
        "rows": [
            r | {"train": {k: v for k, v in r["train"].items() if k != "curve"}} if r.get("train") else r for r in rows
        ],
    }
    (ROOT / "results" / f"{date}-smollm2.json").write_text(json.dumps(res, indent=1) + "\n")
    tasks = sorted({t for r in rows for t in r["tasks"]})
    head = (
        ["method", "params", "heads/KV/FFN", "WikiText2@2048", "WikiText2@128"]
        + [f"{t} acc" for t in tasks]
        + [f"{t} acc_norm" for t in tasks]
        + ["mask mass on cut units (heads / FFN)", "train KL (last 10 %)", "ppl before -> after cut", "prune s"]
    )
    lines = [
        f"# SmolLM2-135M: MaskPrune vs baselines ({date})",
        "",
        f"`{res['command']}`",
        "",
        f"Machine: {res['machine']}",
        "",
        f"Protocol: {json.dumps(res['protocol'])}",
        "",
        "Columns: perplexity on WikiText-2 raw test (32k tokens per length); PIQA on its first "
        f"{a.task_limit} dev examples (stderr about 2.8 points); mask mass on cut units = sum |m| over the "
        "units the cut removes / sum |m| (one-shot methods: their importance scores); train KL = the "
        "distillation loss of the masked model over the last 10 % of the learning steps; ppl before -> after "
        "cut = the masked model just before and just after the cut, WikiText-2 at 512 tokens on 4 windows "
        "only (a rough reading of the damage the cut itself does); prune s = wall time (cells ran beside "
        "other work, so not a timing).",
        "",
    ]
    for group, title in (
        ("main", "Methods x sparsity"),
        ("ablations", "Ablations"),
        ("steps", "More learning steps"),
        ("numerics", "Numerics"),
        ("seeds", "Run-to-run spread (seeds)"),
    ):
        sps = sorted({r["sparsity"] for r in rows if r["group"] == group})
        for sp in sps:
            sel = [r for r in rows if r["group"] == "dense"]
            if group in ("ablations", "steps", "numerics", "seeds"):  # the default it is compared with
                sel += [
                    r | {"label": f"MaskPrune (default, {a.steps} steps)"}
                    for r in rows
                    if r["group"] == "main" and r["label"] == "MaskPrune" and r["sparsity"] == sp
                ]
            sel += [r for r in rows if r["group"] == group and r["sparsity"] == sp]
            if group == "steps":  # the best one-shot baselines at the same sparsity
                sel += [
                    r
                    for r in rows
                    if r["group"] == "main" and r["label"] in ("Wanda-sp", "FLAP") and r["sparsity"] == sp
                ]
            lines += [
                f"## {title}: {round(sp * 100)} %",
                "",
                "| " + " | ".join(head) + " |",
                "|" + " --- |" * len(head),
            ]
            for r in sel:
                sh = r["shape"]
                cells_ = [
                    r["label"],
                    f"{r['params'] / 1e6:.1f}M",
                    f"{sh['num_attention_heads']}/{sh['num_key_value_heads']}/{sh['intermediate_size']}",
                    f"{r['ppl2048']:.2f}",
                    f"{r['ppl128']:.2f}",
                ]
                cells_ += [f"{100 * r['tasks'][t]['acc']:.1f}" if t in r["tasks"] else "-" for t in tasks]
                cells_ += [
                    f"{100 * r['tasks'][t]['acc_norm']:.1f}"
                    if t in r["tasks"] and r["tasks"][t]["acc_norm"] is not None
                    else "-"
                    for t in tasks
                ]
                cm = r.get("cut_mass_share")
                cells_.append(f"{cm['head']:.3f} / {cm['ffn']:.3f}" if cm else "-")
                tr = r.get("train")
                cells_.append(f"{tr['kl_last10']:.3f}" if tr else "-")
                cj = r.get("cut_jump")
                cells_.append(f"{cj[0]:.0f} -> {cj[1]:.0f}" if cj else "-")
                cells_.append(f"{r['prune_seconds']:.0f}" if r.get("prune_seconds") else "-")
                lines.append("| " + " | ".join(cells_) + " |")
            lines.append("")
    reading = ROOT / "results" / f"{date}-smollm2-reading.md"  # the hand-written reading, kept across reruns
    if reading.exists():
        lines += [reading.read_text().rstrip(), ""]
    (ROOT / "results" / f"{date}-smollm2.md").write_text("\n".join(lines) + "\n")
    _plots(rows, ROOT / "results" / f"{date}-smollm2")


def write_quality(rows: list[dict], a: argparse.Namespace, date: str) -> None:
    """The quality table: ``bench/results/<date>-quality.{json,md}``, one cell per (method, sparsity, seed),
    medians and spreads in the markdown; anyone can recompute them from the JSON."""
    import statistics

    cells_ = []
    for r in rows:
        seed = int(r["flags"][r["flags"].index("--seed") + 1]) if "--seed" in r.get("flags", []) else 0
        piqa = r["tasks"].get("piqa", {})
        cells_.append(
            {
                "method": "dense" if r["group"] == "dense" else r["label"],
                "sparsity": r["sparsity"] or 0.0,
                "seed": seed,
                "params": r["params"],
                "ppl_2048": r["ppl2048"],
                "ppl_128": None if math.isnan(r["ppl128"]) else r["ppl128"],
                "piqa_acc": piqa.get("acc"),
                "piqa_acc_norm": piqa.get("acc_norm"),
                "piqa_stderr": piqa.get("acc_stderr"),
                "piqa_n": piqa.get("n"),
                "shape": r["shape"],
                "prune_seconds": r.get("prune_seconds"),
                "cut_jump": r.get("cut_jump"),
            }
        )
    res = {
        "command": "python bench/grid.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "date": date,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "protocol": {
            "prune": f"maskprune prune smollm2-135m --steps {a.steps or '(default)'} --calib-samples "
            f"{a.calib_samples} --seq-len {a.seq_len} --batch-size {a.batch_size} --dtype {a.dtype} --threads {a.threads} "
            "(the same calibration windows for every cell; seeds change the batch order and the LoRA init)",
            "ppl": f"WikiText-2 raw test, {a.ppl_tokens} tokens per window length, {a.eval_dtype}",
            "tasks": a.tasks,
            "task_limit": (a.task_limit or "all") if a.tasks else None,
        },
        "cells": cells_,
    }
    (ROOT / "results" / f"{date}-quality.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        f"# SmolLM2-135M: default recipe vs one-shot methods ({date})",
        "",
        f"`{res['command']}`",
        "",
        f"Machine: {res['machine']}",
        "",
        f"Protocol: {json.dumps(res['protocol'])}",
        "",
        "Median over seeds (one-shot methods are deterministic on the fixed windows: one run), [min, max]; "
        "spread = max / min ppl@2048.",
        "",
    ]
    dense = [c for c in cells_ if c["method"] == "dense"]
    if dense:
        d = dense[0]
        extra = (f", ppl@128 {d['ppl_128']:.2f}" if d["ppl_128"] else "") + (
            f", PIQA {100 * d['piqa_acc']:.1f}" if d["piqa_acc"] is not None else ""
        )
        lines += [f"Dense: ppl@2048 {d['ppl_2048']:.2f}{extra}", ""]
    head = [
        "method",
        "seeds",
        "params",
        "heads/KV/FFN",
        "ppl@2048 median [min, max]",
        "spread",
        "ppl@128 median",
        "PIQA acc median (stderr)",
        "prune s median",
    ]
    for sp in sorted({c["sparsity"] for c in cells_ if c["method"] != "dense"}):
        lines += [f"## {round(sp * 100)} %", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        here = [c for c in cells_ if c["sparsity"] == sp]
        medians = {
            m: statistics.median(c["ppl_2048"] for c in here if c["method"] == m) for m in {c["method"] for c in here}
        }
        # the default recipe first, then every other method by its median perplexity
        for m in sorted(medians, key=lambda m: (m != "maskprune", medians[m])):
            sel = [c for c in cells_ if c["sparsity"] == sp and c["method"] == m]
            p = [c["ppl_2048"] for c in sel]
            acc = [c["piqa_acc"] for c in sel if c["piqa_acc"] is not None]
            se = [c["piqa_stderr"] for c in sel if c["piqa_stderr"] is not None]
            secs = [c["prune_seconds"] for c in sel if c["prune_seconds"]]
            sh = sel[0]["shape"]
            lines.append(
                "| "
                + " | ".join(
                    [
                        m,
                        ",".join(str(c["seed"]) for c in sel),
                        f"{sel[0]['params'] / 1e6:.2f}M",
                        f"{sh['num_attention_heads']}/{sh['num_key_value_heads']}/{sh['intermediate_size']}",
                        f"{statistics.median(p):.2f} [{min(p):.2f}, {max(p):.2f}]",
                        f"{max(p) / min(p):.3f}",
                        f"{statistics.median(c['ppl_128'] for c in sel):.2f}" if sel[0]["ppl_128"] is not None else "-",
                        f"{100 * statistics.median(acc):.1f} ({100 * statistics.median(se):.1f})" if acc else "-",
                        f"{statistics.median(secs):.0f}" if secs else "-",
                    ]
                )
                + " |"
            )
        lines.append("")
    reading = ROOT / "results" / f"{date}-quality-reading.md"
    if reading.exists():
        lines += [reading.read_text().rstrip(), ""]
    (ROOT / "results" / f"{date}-quality.md").write_text("\n".join(lines) + "\n")


def _plots(rows: list[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    dense = next((r for r in rows if r["group"] == "dense"), None)
    main = [r for r in rows if r["group"] == "main"]
    if main:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for label in dict.fromkeys(r["label"] for r in main):
            pts = sorted((r["sparsity"], r) for r in main if r["label"] == label)
            xs = [100 * p for p, _ in pts]
            axes[0].plot(xs, [r["ppl128"] for _, r in pts], marker="o", label=label)
            acc = [r["tasks"].get("piqa", {}).get("acc") for _, r in pts]
            if all(v is not None for v in acc):
                axes[1].plot(xs, [100 * v for v in acc], marker="o", label=label)
        if dense:
            axes[0].axhline(dense["ppl128"], color="k", ls="--", lw=1, label="dense")
            if "piqa" in dense["tasks"]:
                axes[1].axhline(100 * dense["tasks"]["piqa"]["acc"], color="k", ls="--", lw=1)
        axes[0].set(
            xscale="log", xlabel="sparsity (%)", ylabel="WikiText-2 ppl @128 (log)", title="Perplexity vs sparsity"
        )
        axes[1].set(xlabel="sparsity (%)", ylabel="PIQA acc (%)", title="PIQA vs sparsity")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "quality_vs_sparsity.png", dpi=100)
        plt.close(fig)
    abl = [r for r in rows if r["group"] == "ablations" and r["sparsity"] == 0.2]
    base = next((r for r in main if r["label"] == "MaskPrune" and r["sparsity"] == 0.2), None)
    if abl:
        items = ([base | {"label": "MaskPrune (default)"}] if base else []) + abl
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.barh(
            [r["label"] for r in items],
            [r["ppl128"] for r in items],
            color=["tab:green" if r is items[0] and base else "tab:blue" for r in items],
        )
        seeds = ([base["ppl128"]] if base else []) + [
            r["ppl128"] for r in rows if r["group"] == "seeds" and r["sparsity"] == 0.2
        ]
        if len(seeds) > 1:  # how far the default setting alone moves between seeds
            ax.axvspan(
                min(seeds), max(seeds), color="tab:green", alpha=0.15, label=f"default, {len(seeds)} seeds: range"
            )
            ax.legend(fontsize=8, loc="lower right")
        ax.set(xlabel="WikiText-2 ppl @128 at 20 % (lower is better)", title="Ablations")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(folder / "ablations.png", dpi=100)
        plt.close(fig)
    # the paper's figures 4-6 read the learning itself: training loss and the spread across layers of the
    # alive FFN channels, for the proximal interval schedules (figs 5, 6) and the decay rates (fig 4)
    curves = [(base | {"label": "default: prox 10 -> 1, eta1 0.1"}) if base else None] + [
        r for r in abl if r["label"].startswith(("ffn prox", "eta1"))
    ]
    curves = [r for r in curves if r and r.get("train")]
    if len(curves) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for r in curves:
            c = r["train"]["curve"]
            w = max(1, len(c["kl"]) // 15)  # running mean: one step is 4 windows, too noisy to read raw
            kl = [
                sum(c["kl"][max(0, i - w + 1) : i + 1]) / len(c["kl"][max(0, i - w + 1) : i + 1])
                for i in range(len(c["kl"]))
            ]
            axes[0].plot(c["step"], kl, label=f"{r['label']} (ppl@128 {r['ppl128']:.0f})")
            axes[1].plot(c["step"], c["ffn_std"], label=r["label"])
        axes[0].set(xlabel="step", ylabel="distillation KL (running mean)", title="Training loss (paper fig. 5)")
        axes[1].set(
            xlabel="step", ylabel="std across layers of alive FFN channels", title="Layer uniformity (paper fig. 6)"
        )
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "training.png", dpi=100)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--group", choices=["main", "ablations", "steps", "numerics", "seeds", "quality", "all"], default="main"
    )
    ap.add_argument("--sparsities", default="0.2,0.25,0.5")
    ap.add_argument(
        "--steps",
        type=int,
        default=150,
        help="learning steps per learned cell (all cells the same; 0: the recipe's default)",
    )
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=1024)
    ap.add_argument("--ppl-tokens", type=int, default=32768, help="WikiText-2 tokens scored at each length")
    ap.add_argument("--tasks", default="piqa")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--task-limit", type=int, default=300, help="examples per zero-shot task (0: all)")
    ap.add_argument(
        "--dtype", default="bf16", help="prune --dtype of every cell (auto: bf16 where the hardware has it)"
    )
    ap.add_argument("--eval-dtype", default="bf16", choices=["bf16", "fp32"], help="eval --dtype of every cell")
    ap.add_argument("--eval-seq-lens", default="2048,128", help="WikiText-2 window lengths scored per cell")
    ap.add_argument("--eval-batch-size", type=int, default=4, help="windows / lm-eval requests per forward")
    ap.add_argument("--no-tasks-for", default="", help="comma-separated --method names evaluated on perplexity only")
    ap.add_argument("--weight-dtype", default="fp32", help="base weights during learning (same for every cell)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", default=str(REPO / "runs" / "grid"), help="pruned models and per-cell results")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="results file date (resume: keep it)")
    ap.add_argument("--only", default=None, help="run only cells whose id contains this text")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--rewrite", action="store_true", help="only rewrite the results files from the finished cells")
    ap.add_argument(
        "--tasks-only",
        action="store_true",
        help="only run --tasks (with --task-limit) on finished cells' models into <cell>.tasks.json, merged into the table",
    )
    a = ap.parse_args()
    if a.tasks and not Path(a.data_dir).is_dir():
        sys.exit(f"--data-dir {a.data_dir} is not a folder (the zero-shot data); pass --tasks '' to skip tasks")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    todo = cells(a.group, [float(s) for s in a.sparsities.split(",")])
    if a.only:
        todo = [c for c in todo if a.only in c.name]
    if a.rewrite:
        (write_quality if a.group == "quality" else write_results)(_all_rows(work), a, a.date)
        return
    if a.tasks_only:
        for c in todo:
            _tasks_pass(c, a, work)
        (write_quality if a.group == "quality" else write_results)(_all_rows(work), a, a.date)
        return
    if a.dry_run:
        for c in todo:
            done = (work / f"{c.name}.cell.json").exists()
            print(f"{'done' if done else 'todo'}  {c.name:40s} {' '.join(c.flags)}")
        return
    rows: list[dict] = []
    for i, c in enumerate(todo):
        t = time.perf_counter()
        try:
            meta = do_cell(c, a, work)
        except RuntimeError as exc:  # one failed cell is reported, the grid goes on
            print(f"[{i + 1}/{len(todo)}] {c.name} FAILED: {exc}", flush=True)
            continue
        ev = json.loads((work / f"{c.name}.eval.json").read_text())
        rows = [
            r for r in rows if not (r["label"] == c.label and r["sparsity"] == c.sparsity and r["group"] == c.group)
        ] + [_row(meta, ev, work)]
        (write_quality if a.group == "quality" else write_results)(_all_rows(work), a, a.date)
        r = rows[-1]
        print(
            f"[{i + 1}/{len(todo)}] {c.name}: ppl {r['ppl2048']:.2f} / {r['ppl128']:.2f}  "
            f"piqa {r['tasks'].get('piqa', {}).get('acc', math.nan):.3f}  ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )


def _all_rows(work: Path) -> list[dict]:
    """Rows of every finished cell in ``work`` (so the main grid and the ablations share one file)."""
    rows = []
    order = {c.name: i for i, c in enumerate(cells("all", [0.2, 0.25, 0.5]))}
    for meta_path in sorted(work.glob("*.cell.json"), key=lambda p: order.get(p.name[:-10], 1 << 30)):
        ev_path = work / meta_path.name.replace(".cell.json", ".eval.json")
        if ev_path.exists():
            rows.append(_row(json.loads(meta_path.read_text()), json.loads(ev_path.read_text()), work))
    return rows


if __name__ == "__main__":
    main()
