"""The cut stage's cost and choice, before and after a change: for each pair of `maskprune prune --steps 0` runs of the
same model and sparsity (one made by the code before, one by the code after), the chosen shape, the winning row's
KL, the perplexity after the cut and after the re-fit, and the seconds of the phases that make the cut stage (the
shape search, the scoring, the re-fit); the ratio of the cut stage's seconds. Issue 36 part 3: the cut stage at
least 2x cheaper with the same chosen shapes.

    python bench/cut_stage.py --out bench/results/2026-12-07-cut-stage.json \
        --pair "smollm2-135m 20%" /tmp/b36/old-smol-0.2 /tmp/b36/new-smol-0.2 \
        --pair "smollm2-135m 50%" /tmp/b36/old-smol-0.5 /tmp/b36/new-smol-0.5 ...

Each run folder is a `maskprune prune ... --steps 0 --out DIR` (its maskprune_report.json is read); the runs of a
pair must be made on the same machine, one at a time, quiet. A BEFORE of `-` takes the case's "before" from an
earlier record of this script (`--baseline FILE`, the same machine): for a "before" too long to run again. `--held-out N` also measures each exported model's KL
to the dense one on the last N of the run's calibration windows (the cut scores and ranks on the first
`cut_samples`, so these are unseen by it): which of two different choices is the better model.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

CUT_PHASES = ("shape_search", "score", "reconstruct")


def summary(report: dict) -> dict:
    """One run's chosen shape, its winning row, its perplexities and its cut stage's seconds."""
    shape = report["shape_search"]
    rows = [r for r in shape["candidates"] if r.get("kl") is not None]
    best = min(rows, key=lambda r: r["kl"])
    seconds = report["seconds"]
    ppl = report["perplexity"]
    return {
        "layers": len(shape["kept_layers"]),
        "hidden_size": shape["hidden_size"],
        "k_head": best["k_head"],
        "k_ffn": best["k_ffn"],
        "kl": best["kl"],
        "rows": len(shape["candidates"]),
        "rows_measured_fully": len(rows),
        "ppl_after_cut": ppl["after_cut"]["ppl"],
        "ppl_exported": ppl["exported"]["ppl"],
        "seconds": {k: seconds.get(k, 0.0) for k in CUT_PHASES},
        "cut_stage_seconds": sum(seconds.get(k, 0.0) for k in CUT_PHASES),
        "total_seconds": seconds["total"],
        "code": report["maskprune_version"],
    }


def held_out_kl(folders: list[Path], windows: int) -> list[float]:
    """Each exported model's mean per-token KL (the run's direction) to the dense model it was cut from, on the last
    ``windows`` of the run's calibration windows (the same windows for every folder; the first run's settings)."""
    import torch
    from transformers import AutoModelForCausalLM

    from maskprune.axis_scores import kl_to, teacher_logits
    from maskprune.config import PruneConfig
    from maskprune.data import calibration_windows
    from maskprune.models import load_model

    report = json.loads((folders[0] / "maskprune_report.json").read_text())
    cfg = PruneConfig.from_dict(report["config"])
    dense = load_model(cfg.model, gguf_file=cfg.gguf_file, dtype=torch.float32, device=torch.device("cpu"))
    all_windows = calibration_windows(
        cfg.calib, dense.tokenizer, seq_len=cfg.seq_len, num_windows=cfg.calib_samples, config=cfg.calib_config
    )
    win = all_windows[-windows:]
    reference = teacher_logits(dense.model, win, 1, None)
    del dense
    out = []
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        out.append(kl_to(model, win, reference, 1, direction=cfg.kl_direction, autocast=None))
        del model
    return out


def compare(label: str, before: Path | dict, after: Path, held_out: int = 0, source: str = "") -> dict:
    """One case: ``before`` a run folder, or (``source`` says where from) a recorded summary of one."""
    new = summary(json.loads((after / "maskprune_report.json").read_text()))
    if isinstance(before, dict):
        old = before
        if held_out:
            (new["held_out_kl"],) = held_out_kl([after], held_out)
    else:
        old = summary(json.loads((before / "maskprune_report.json").read_text()))
        if held_out:
            old["held_out_kl"], new["held_out_kl"] = held_out_kl([before, after], held_out)
    same = all(old[k] == new[k] for k in ("layers", "hidden_size", "k_head"))
    return {
        "case": label,
        **({"before_from": source} if source else {}),
        "before": old,
        "after": new,
        "same_shape": same,
        "cut_stage_speedup": old["cut_stage_seconds"] / max(new["cut_stage_seconds"], 1e-9),
        "run_speedup": old["total_seconds"] / max(new["total_seconds"], 1e-9),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| case | shape before | shape after | KL before | KL after | ppl exported before | after | "
        "held-out KL exported before | after | cut stage s before | after | speedup |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def held(s: dict) -> str:
        return f"{s['held_out_kl']:.4f}" if "held_out_kl" in s else "-"

    def shape(s: dict) -> str:
        return f"{s['layers']}L/{s['hidden_size']}h/k_head {s['k_head']}"

    return head + "".join(
        f"| {r['case']} | {shape(r['before'])} | {shape(r['after'])} | {r['before']['kl']:.4f} | "
        f"{r['after']['kl']:.4f} | {r['before']['ppl_exported']:.3f} | {r['after']['ppl_exported']:.3f} | "
        f"{held(r['before'])} | {held(r['after'])} | {r['before']['cut_stage_seconds']:.0f} | {r['after']['cut_stage_seconds']:.0f} | "
        f"{r['cut_stage_speedup']:.2f}x |\n"
        for r in rows
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", nargs=3, action="append", metavar=("LABEL", "BEFORE", "AFTER"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--command", default="", help="the command that made the runs (recorded)")
    ap.add_argument("--held-out", type=int, default=0, help="windows (the last of the calibration) for held-out KL")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="an earlier record of this script: a pair whose BEFORE is '-' takes the 'before' of its case there "
        "(made on the same machine; recorded as before_from)",
    )
    args = ap.parse_args()
    recorded = {c["case"]: c["before"] for c in json.loads(args.baseline.read_text())["cases"]} if args.baseline else {}

    def before(label: str, b: str):
        if b != "-":
            return Path(b), ""
        if label not in recorded:
            raise SystemExit(f"--pair {label!r} - ...: no case {label!r} in --baseline {args.baseline}")
        return recorded[label], f"{args.baseline} (the 'before' of case {label!r})"

    rows = []
    for label, b, a in args.pair:
        old, source = before(label, b)
        rows.append(compare(label, old, Path(a), args.held_out, source))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "command": args.command,
        "cases": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
