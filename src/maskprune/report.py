"""``maskprune report RUN_DIR``: PNG figures and one self-contained HTML page for a finished run.

Reads ``maskprune_report.json`` (and, where the run has them, ``metrics.jsonl``, ``recovery_metrics.jsonl`` and
``masks.pt``) and writes ``report/*.png`` and ``report/index.html`` (figures embedded, so the page opens
anywhere). Every figure is drawn only where it carries information for that run: the loss and the held-out KL
along the steps (a run that trains), the split search's candidates, the one-shot scores that chose the units per
layer; and, only where masks were learned, the paper's mask figures (mask heatmaps and histograms, the proximal
schedule, the spread of FFN widths, s, y, z and the size against the budget). The page gives the kept shape,
the sizes and the evaluations as tables.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import torch

from .errors import MaskPruneError
from .runreport import recipe_of

__all__ = ["make_report", "figures_for", "MASK_FIGURES", "FIG_SIZE_PX"]

FIG_SIZE_IN = (8.0, 4.5)
DPI = 100
FIG_SIZE_PX = (int(FIG_SIZE_IN[0] * DPI), int(FIG_SIZE_IN[1] * DPI))
MASK_FIGURES = (
    "loss_and_prox_schedule",
    "ffn_width_spread",
    "head_mask_heatmap",
    "ffn_mask_heatmap",
    "head_mask_histogram",
    "ffn_mask_histogram",
    "s_y_z_size",
)
"""The figures of learned masks (the paper's), drawn only for runs whose masks learned."""


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _load(run_dir: Path) -> tuple[dict, list[dict], list[dict], dict[str, torch.Tensor] | None]:
    """The report, the learning (or distillation) metrics, the recovery's metrics and the masks, where present."""
    if not (run_dir / "maskprune_report.json").is_file():
        raise MaskPruneError(
            f"{str(run_dir)!r} is not a complete maskprune run folder",
            expected="maskprune_report.json (and, for a run that trained, metrics.jsonl)",
            found="no maskprune_report.json",
            fix="pass the --out folder of a finished `maskprune prune` or `maskprune distill`",
        )
    report = json.loads((run_dir / "maskprune_report.json").read_text())
    masks_path = run_dir / "masks.pt"
    masks = torch.load(masks_path, map_location="cpu", weights_only=True) if masks_path.is_file() else None
    return report, _read_jsonl(run_dir / "metrics.jsonl"), _read_jsonl(run_dir / "recovery_metrics.jsonl"), masks


def masks_learned(report: dict) -> bool:
    """Whether the run learned its masks for at least one step (not a one-shot run, a distillation, or the
    default recipe, whose selection is the prior's, fixed at step 0)."""
    return recipe_of(report) == "learned"


def figures_for(report: dict, metrics: list[dict], recovery: list[dict]) -> list[str]:
    """The figures that carry information for this run, in page order."""
    names = []
    if metrics or recovery:
        names.append("training")
    if report.get("split_search"):
        names.append("split_search")
    if report.get("scores"):
        names += ["scores_head", "scores_ffn"]
    if masks_learned(report) and metrics:
        names += list(MASK_FIGURES)
    return names


def make_report(run_dir: str | Path) -> Path:
    """Draw the figures that carry information for this run and the HTML page; return the page's path."""
    run = Path(run_dir)
    report, metrics, recovery, masks = _load(run)
    figs = _Figures(run / "report")
    names = figures_for(report, metrics, recovery)
    if "training" in names:
        _training_figure(figs, report, metrics, recovery)
    if "split_search" in names:
        _split_figure(figs, report["split_search"])
    if "scores_head" in names:
        _scores_figures(figs, report["scores"])
    if "head_mask_heatmap" in names and masks is not None:
        head, ffn = masks["head"].float(), masks["ffn"].float()[:, 0]
        steps = [m["step"] for m in metrics]
        _prox_figure(figs, steps, metrics)
        _spread_figure(figs, steps, metrics)
        _mask_figures(figs, head, ffn, report["shape"]["num_hidden_layers"])
        _syz_figure(figs, steps, metrics)
    page = figs.out / "index.html"
    page.write_text(_html(report, figs.files), encoding="utf-8")
    return page


class _Figures:
    """The report folder's figures: a new one of the page's size, saved as ``<name>.png`` and listed."""

    def __init__(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.out, self.files = plt, out, {}
        out.mkdir(exist_ok=True)

    def new(self, name: str):
        return self.plt.subplots(figsize=FIG_SIZE_IN, dpi=DPI)

    def save(self, name: str, f) -> None:
        f.tight_layout()
        path = self.out / f"{name}.png"
        f.savefig(path, dpi=DPI)
        self.plt.close(f)
        self.files[name] = path


def _training_figure(figs: _Figures, report: dict, metrics: list[dict], recovery: list[dict]) -> None:
    """The training loss along the steps and the held-out KL to the teacher where it was measured; a recovery
    after the cut continues the step axis."""
    f, ax = figs.new("training")
    first = len(metrics)
    for series, offset, label, color in ((metrics, 0, "", "tab:red"), (recovery, first, "recovery ", "tab:purple")):
        if not series:
            continue
        steps = [m["step"] + offset for m in series]
        ax.plot(steps, [m["loss"] for m in series], color=color, alpha=0.6, lw=1, label=f"{label}training loss")
        val = [(m["step"] + offset + 1, m["val_kl"]) for m in series if "val_kl" in m]
        if val:
            ax.plot(*zip(*val), "o-", color="black" if not offset else "tab:blue", label=f"{label}held-out KL")
    if recovery and metrics:
        ax.axvline(first, color="gray", ls=":", label="cut, then recovery")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token (log scale)")
    kind = "mask learning" if masks_learned(report) else "distillation"
    ax.set_title(f"Training loss and held-out KL to the teacher along the {kind}")
    ax.legend(fontsize=8)
    figs.save("training", f)


def _split_figure(figs: _Figures, split: dict) -> None:
    """The split search: KL to the dense model after cutting each candidate split, the chosen one marked."""
    f, ax = figs.new("split_search")
    cands = split["candidates"]
    ks = [c["k_head"] for c in cands]
    ax.plot(ks, [c["kl"] for c in cands], "o-", color="tab:blue")
    best = split["chosen"]["k_head"]
    ax.axvline(best, color="tab:green", ls="--", label=f"chosen: {best} head units cut per row")
    for c in cands:
        ax.annotate(f"FFN -{c['k_ffn']}", (c["k_head"], c["kl"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_yscale("log")
    ax.set_xlabel("head units cut per row (FFN channels cut fill the rest of the budget)")
    ax.set_ylabel("KL to the dense model (log)")
    ax.set_title(f"Split search over {len(cands)} candidate splits ({split['tokens']:,} tokens)")
    ax.legend(fontsize=8)
    figs.save("split_search", f)


def _scores_figures(figs: _Figures, scores: dict) -> None:
    """Per layer, the spread of the one-shot scores (relative to the layer's median) and where the cut fell."""
    for kind, what in (("head", "head units"), ("ffn", "FFN channels")):
        entry = scores[kind]
        q = torch.tensor(entry["per_layer"])  # [L, 5]: 5, 25, 50, 75, 95 %
        layers = list(range(q.shape[0]))
        f, ax = figs.new(f"scores_{kind}")
        ax.fill_between(layers, q[:, 0], q[:, 4], color="tab:blue", alpha=0.15, label="5-95 % of units")
        ax.fill_between(layers, q[:, 1], q[:, 3], color="tab:blue", alpha=0.35, label="25-75 %")
        cut = [(li, v) for li, v in zip(layers, entry["highest_cut"]) if v is not None]
        if cut:
            ax.plot(*zip(*cut), "v", color="tab:red", label="highest score cut")
        ax.plot(layers, entry["lowest_kept"], "^", color="tab:green", label="lowest score kept")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("score / the layer's median (log)")
        ax.set_title(f"One-shot `{scores['metric']}` scores of the {what}, per layer")
        ax.legend(fontsize=8)
        figs.save(f"scores_{kind}", f)


def _prox_figure(figs: _Figures, steps: list[int], metrics: list[dict]) -> None:
    # fig. 5: training loss and the proximal schedule
    f, ax = figs.new("loss")
    ax.plot(steps, [m["loss"] for m in metrics], label="loss (total)", color="tab:red")
    for key, label, color in (("kl", "KL", "tab:pink"), ("ce", "LM cross-entropy", "tab:olive")):
        if key in metrics[0]:
            ax.plot(steps, [m[key] for m in metrics], label=label, color=color, alpha=0.7)
    if "layer_mse" in metrics[0]:
        ax.plot(steps, [m["layer_mse"] for m in metrics], label="layer MSE", color="tab:purple", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax2 = ax.twinx()
    ax2.step(
        steps, [m["ffn_prox_interval"] for m in metrics], where="post", color="tab:gray", label="FFN prox interval k"
    )
    prox = [s for s, m in zip(steps, metrics) if m["prox_ffn"]]
    ax2.plot(prox, [0.5] * len(prox), "|", color="tab:green", label="FFN prox step taken")
    ax2.set_ylabel("interval (steps)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_title("Training loss and the FFN proximal schedule")
    figs.save("loss_and_prox_schedule", f)


def _spread_figure(figs: _Figures, steps: list[int], metrics: list[dict]) -> None:
    # fig. 6: spread of FFN widths across layers over steps
    f, ax = figs.new("spread")
    # the cut keeps U - ceil(s) channels in every layer: its structural spread is 0 at every step
    ax.plot(steps, [0.0] * len(steps), label="kept channels (U - ceil(s)): std over layers")
    ax.plot(steps, [m["ffn_alive_std"] for m in metrics], label="channels with mask > 0.05: std over layers")
    ax.set_xlabel("step")
    ax.set_ylabel("std of FFN channels across layers")
    ax.legend(fontsize=8)
    ax.set_title("Spread of FFN width across layers (flat = layer-uniform)")
    figs.save("ffn_width_spread", f)


def _mask_figures(figs: _Figures, head: torch.Tensor, ffn: torch.Tensor, n_layers: int) -> None:
    # figs. 7-8: heatmaps of mask values per layer, before the cut
    for name, data, title in (
        ("head_mask_heatmap", head.reshape(n_layers, -1), "Head-unit mask values"),
        (
            "ffn_mask_heatmap",
            torch.sort(ffn, dim=1, descending=True).values,
            "FFN channel mask values (sorted within each layer)",
        ),
    ):
        f, ax = figs.new(name)
        im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlabel("unit index" if name.startswith("head") else "channel rank in layer")
        ax.set_ylabel("layer")
        ax.set_title(title + " before the cut")
        f.colorbar(im, ax=ax, label="mask value")
        figs.save(name, f)

    # figs. 9-10: histograms
    for name, data, title in (
        ("head_mask_histogram", head.flatten(), "Head-unit masks"),
        ("ffn_mask_histogram", ffn.flatten(), "FFN channel masks"),
    ):
        f, ax = figs.new(name)
        ax.hist(data.numpy(), bins=50, range=(0, 1), color="tab:blue", log=True)
        ax.set_xlabel("mask value")
        ax.set_ylabel("count (log scale)")
        ax.set_title(f"{title}: distribution before the cut ({data.numel()} values)")
        figs.save(name, f)


def _syz_figure(figs: _Figures, steps: list[int], metrics: list[dict]) -> None:
    # s, y, z and size against the budget
    f, ax = figs.new("syz")
    ax.plot(steps, [m["sigma_head"] for m in metrics], label="s head (fraction)")
    ax.plot(steps, [m["sigma_ffn"] for m in metrics], label="s FFN (fraction)")
    ax.plot(steps, [m["size_ratio"] for m in metrics], label="size M(s) / M dense", color="black")
    ax.plot(steps, [m["target_ratio"] for m in metrics], "--", label="budget schedule / M dense", color="black")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction")
    ax2 = ax.twinx()
    ax2.plot(steps, [m["y"] for m in metrics], ":", color="tab:red", label="y")
    ax2.plot(steps, [m["z"] for m in metrics], ":", color="tab:green", label="z")
    ax2.set_ylabel("multiplier value")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    ax.set_title("Sparsity fractions, multipliers and model size vs budget")
    figs.save("s_y_z_size", f)


_CAPTIONS = {
    "training": "Training loss (per step) and KL to the teacher on held-out calibration windows.",
    "split_search": "How the budget was split between head units and FFN channels: KL after each candidate cut.",
    "scores_head": "The one-shot scores that chose the head units: spread per layer and where the cut fell.",
    "scores_ffn": "The one-shot scores that chose the FFN channels: spread per layer and where the cut fell.",
}


def _html(report: dict, files: dict[str, Path]) -> str:
    p, shape = report["params"], report["shape"]
    figures = "".join(
        f"<figure><img alt='{n}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'/>"
        f"<figcaption>{html.escape(_CAPTIONS.get(n, n.replace('_', ' ')))}</figcaption></figure>"
        for n, path in files.items()
    )
    what = "distilled" if report.get("distill") else f"pruned by {100 * p['sparsity']:.1f}%"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>maskprune report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} td,th{{padding:2px 10px;text-align:right}}
figure{{display:inline-block;margin:8px}} img{{max-width:520px}} table{{border-collapse:collapse;margin:8px 0}}
tr:nth-child(even){{background:#f4f4f4}}</style></head><body>
<h1>{html.escape(str(report["model"]["source"]))} {what}</h1>
<p>{html.escape(_recipe_text(report))}</p>
<p>{p["dense"]:,} &rarr; {p["exported"]:,} parameters ({100 * p["sparsity"]:.2f}% removed; budget {p["budget"]:,}).</p>
{_shape_table(shape)}{_shape_search_table(report.get("shape_search"))}{_ppl_table(report.get("perplexity") or {})}
{_zeroshot_table(report.get("zeroshot"))}{figures}</body></html>"""


def _recipe_text(report: dict) -> str:
    cfg = report["config"]
    if report.get("distill"):
        d = report["distill"]
        return f"Distilled from {d['teacher']} ({d['mode']}, {d['steps']} steps, {d['tokens']:,} tokens)."
    if cfg.get("method") != "maskprune":
        text = f"Units chosen by the one-shot {cfg['method']} score ({report.get('calibration') or 'one-pass'})."
    elif masks_learned(report):
        text = f"Masks learned by the minimax method for {cfg['freeze_share']:.0%} of {cfg['steps']} steps."
    else:
        text = f"Units chosen by the one-shot {cfg['mask_init']} prior, then {cfg['steps']} steps of distillation."
    rec = report.get("recovery")
    if rec:
        text += f" Then recovered by distillation ({rec['mode']}, {rec['steps']} steps)."
    return text


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _shape_table(shape: dict) -> str:
    dense = shape["dense"]
    rows = [
        [key.replace("_", " "), dense.get(key, shape[key]), shape[key]]
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
        if key in shape
    ]
    layers = shape["num_hidden_layers"]
    rows.append(["layers (every one the same shape)", dense.get("num_hidden_layers", layers), layers])
    return _table(["per layer", "dense", "pruned"], rows)


def _shape_search_table(search: dict | None) -> str:
    """The shape search's candidates (layers, hidden width, head/FFN cut, KL and the text's perplexity after the
    cut, KL after the trial)."""
    if not search:
        return ""
    rows = [
        [
            c["layers"],
            c["hidden_size"],
            "-" if c["k_head"] is None else c["k_head"],
            "-" if c["k_ffn"] is None else c["k_ffn"],
            "-" if c["kl"] is None else f"{c['kl']:.4f}",
            f"{math.exp(c['nll']):.2f}" if c.get("nll") is not None else "-",
            f"{c['trial_kl']:.4f}" if "trial_kl" in c else "-",
        ]
        for c in search["candidates"]
    ]
    chosen = f"<p>Shape search: {len(search['kept_layers'])} layers and hidden {search['hidden_size']} chosen.</p>"
    return chosen + _table(
        ["layers", "hidden", "head units cut / row", "FFN cut", "KL after cut", "ppl after cut", "KL after trial"],
        rows,
    )


def _ppl_table(ppl: dict) -> str:
    rows = [
        [k.replace("_", " "), f"{v['ppl']:.3f}", v["seq_len"], f"{v['windows']} of {v['total_windows']}"]
        for k, v in ppl.items()
        if isinstance(v, dict) and "ppl" in v
    ]
    return _table(["WikiText-2 perplexity", "value", "seq_len", "windows"], rows) if rows else ""


def _zeroshot_table(zs: dict | None) -> str:
    if not zs:
        return ""
    rows = []
    for which, res in zs.items():
        for task, r in ((res or {}).get("tasks") or {}).items():
            rows.append([which.replace("_", " "), task, f"{100 * r.get('acc', float('nan')):.1f}", r.get("n")])
    return _table(["model", "task", "acc %", "examples"], rows) if rows else ""
