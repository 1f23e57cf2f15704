"""Where the learned method loses quality, in two diagnostics on SmolLM2-135M.

One learning run of a recipe (default: the recipe that shipped until 2026-11-30, i.e. masks from 1, AdamW at
lr 0.1, the selection learned until the cut), then the WikiText-2 perplexity of the same model with:

  (a) the learned selection as exported (cut units 0, kept units at their learned values, the learned LoRA);
      the learned selection with every kept mask reset to 1, with and without the learned LoRA;
  (b) a one-shot selection (Wanda-sp, FLAP: scored on the same calibration windows, the same per-row counts)
      with the learned LoRA, and without it (the one-shot baseline itself).

(a) says how much the learned mask *values* (distortion of the kept units) cost or buy; (b) says whether the
learned *selection* is better than a one-shot one when both get the same LoRA. Also the overlap of the kept
sets. Everything is evaluated on the masked model with hooks (bf16 weights, bf16 autocast), so the numbers are
comparable with each other, not to the digit with an fp32 export.

    python bench/diagnose.py --seeds 0,1,2 --sparsity 0.2 [--flags "--mask-init ones ..."]

Writes bench/results/<date>-diagnose-s<NN>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from grid import RECIPE_2026_11_23  # bench/ is on the path when this script runs

ROOT = Path(__file__).resolve().parent
OLD_DEFAULT = " ".join(RECIPE_2026_11_23)  # the recipe that shipped until 2026-11-30


def _flags_to_overrides(flags: str) -> dict:
    from maskprune.cli import parse_prune_overrides

    return parse_prune_overrides(shlex.split(flags))


def run_seed(seed: int, sparsity: float, flags: str, ppl_tokens: int, seq_len: int) -> dict:
    from maskprune.arch import get_adapter
    from maskprune.baselines import unit_scores
    from maskprune.config import load_config
    from maskprune.cut import kept_indices, plan_cut
    from maskprune.data import calibration_windows, wikitext2_test_text
    from maskprune.dtypes import autocast_dtype
    from maskprune.evaluate import perplexity, tokenize_windows
    from maskprune.masks import bypass
    from maskprune.models import load_model
    from maskprune.stages.learned import build_learner
    from maskprune.structure import Structure

    # the measured split is off unless the flags ask for it: the readings were taken without it
    overrides = {"split_search": False, **_flags_to_overrides(flags), "sparsity": sparsity, "seed": seed}
    cfg = load_config(overrides=overrides)
    torch.manual_seed(seed)
    amp = autocast_dtype(cfg.dtype)
    loaded = load_model(cfg.model, dtype=amp or torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(model.config.model_type)
    structure = Structure.of(model, adapter, cfg.gqa_policy)
    windows = calibration_windows(cfg.calib, tok, seq_len=cfg.seq_len, num_windows=cfg.calib_samples)
    ev, _ = tokenize_windows(wikitext2_test_text("default"), tok, seq_len)
    ev = ev[: max(1, ppl_tokens // seq_len)]
    scores = {
        m: unit_scores(m, model, adapter, structure, windows, batch_size=cfg.batch_size) for m in ("wanda-sp", "flap")
    }
    build = build_learner(cfg, model=model, adapter=adapter, structure=structure, windows=windows)
    model, masks, budget = build.model, build.masks, build.budget
    t = time.perf_counter()
    state = build.learner.run()
    learn_s = time.perf_counter() - t
    plan = plan_cut(structure, sigma_head=state.sigma["head"], budget=budget)
    learned = {k: p.detach().clone() for k, p in masks.by_kind().items()}
    kept = {"learned": (kept_indices(learned["head"], plan.k_head), kept_indices(learned["ffn"], plan.k_ffn))}
    for m, (h, f) in scores.items():
        kept[m] = (kept_indices(h, plan.k_head), kept_indices(f, plan.k_ffn))

    def set_masks(sel: str, values: str) -> None:
        with torch.no_grad():
            for i, kind in enumerate(("head", "ffn")):
                keep = torch.zeros_like(learned[kind], dtype=torch.bool).scatter_(-1, kept[sel][i], True)
                src = learned[kind] if values == "learned" else torch.ones_like(learned[kind])
                masks.by_kind()[kind].copy_(torch.where(keep, src, torch.zeros_like(src)))

    def ppl(lora: bool) -> float:
        if lora:
            return perplexity(model, ev, batch_size=1, autocast_dtype=amp, progress=False).ppl
        with bypass(model, None):  # LoRA off, masks on
            return perplexity(model, ev, batch_size=1, autocast_dtype=amp, progress=False).ppl

    rows = {}
    for name, sel, values, lora in (
        ("(a) learned selection, learned mask values, learned LoRA (the export)", "learned", "learned", True),
        ("(a) learned selection, kept masks reset to 1, learned LoRA", "learned", "ones", True),
        ("(a) learned selection, kept masks reset to 1, no LoRA", "learned", "ones", False),
        ("(a) learned selection, learned mask values, no LoRA", "learned", "learned", False),
        ("(b) Wanda-sp selection, learned LoRA", "wanda-sp", "ones", True),
        ("(b) FLAP selection, learned LoRA", "flap", "ones", True),
        ("(b) Wanda-sp selection, no LoRA (the one-shot baseline)", "wanda-sp", "ones", False),
        ("(b) FLAP selection, no LoRA (the one-shot baseline)", "flap", "ones", False),
    ):
        set_masks(sel, values)
        rows[name] = ppl(lora)
        print(f"seed {seed} {name}: {rows[name]:.2f}", flush=True)

    def overlap(a: str, b: str) -> dict:
        out = {}
        for i, kind in enumerate(("head", "ffn")):
            x, y = kept[a][i], kept[b][i]
            inter = sum(len(set(r1.tolist()) & set(r2.tolist())) for r1, r2 in zip(x.flatten(0, 1), y.flatten(0, 1)))
            out[kind] = inter / x.numel()
        return out

    return {
        "seed": seed,
        "ppl": rows,
        "plan": plan.to_dict(),
        "learn_seconds": round(learn_s, 1),
        "kept_overlap": {
            "learned_vs_wanda-sp": overlap("learned", "wanda-sp"),
            "learned_vs_flap": overlap("learned", "flap"),
            "wanda-sp_vs_flap": overlap("wanda-sp", "flap"),
        },
        "kept_mask_mean": {
            k: float(torch.gather(learned[k], -1, kept["learned"][i]).mean()) for i, k in enumerate(("head", "ffn"))
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--flags", default=OLD_DEFAULT, help="prune flags of the recipe to diagnose")
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    date = datetime.date.today().isoformat()
    runs = [run_seed(int(s), a.sparsity, a.flags, a.ppl_tokens, a.seq_len) for s in a.seeds.split(",")]
    res = {
        "command": "python bench/diagnose.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "date": date,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads},
        "recipe_flags": a.flags,
        "sparsity": a.sparsity,
        "protocol": f"WikiText-2 raw test, {a.ppl_tokens} tokens in windows of {a.seq_len}, masked model "
        "with hooks, weights and autocast in the run's dtype",
        "runs": runs,
    }
    stem = ROOT / "results" / f"{date}-diagnose-s{round(a.sparsity * 100)}{a.tag}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        f"# Diagnostics of the learned selection, {round(a.sparsity * 100)} % ({date})",
        "",
        f"`{res['command']}`",
        "",
        f"Recipe: `{a.flags}`",
        "",
        f"Machine: {res['machine']}",
        "",
        f"Protocol: {res['protocol']}",
        "",
        "| variant | median ppl | per seed |",
        "| --- | --- | --- |",
    ]
    for name in runs[0]["ppl"]:
        vals = [r["ppl"][name] for r in runs]
        lines.append(f"| {name} | {statistics.median(vals):.2f} | {', '.join(f'{v:.2f}' for v in vals)} |")
    lines += ["", "Kept-set overlap (share of kept units in common), per seed:", ""]
    for r in runs:
        lines.append(
            f"- seed {r['seed']}: plan {r['plan']}; mean learned value of kept masks "
            f"{json.dumps({k: round(v, 3) for k, v in r['kept_mask_mean'].items()})}; overlap "
            + json.dumps({k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in r["kept_overlap"].items()})
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
