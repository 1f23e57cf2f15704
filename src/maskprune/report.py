"""``maskprune report RUN_DIR``: PNG figures and one self-contained HTML page for a prune run.

Reads ``maskprune_report.json``, ``metrics.jsonl`` and ``masks.pt`` from the run folder and writes
``report/*.png`` and ``report/index.html`` (figures embedded, so the page opens anywhere). The
figures follow the paper's: kept units per layer (fig. 3), loss and proximal schedule (fig. 5),
spread of FFN widths across layers (fig. 6), mask heatmaps (figs. 7-8) and histograms (figs. 9-10),
plus s, y, z and size against the budget.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch

from .errors import MaskPruneError

__all__ = ["make_report", "FIGURES", "FIG_SIZE_PX"]

FIG_SIZE_IN = (8.0, 4.5)
DPI = 100
FIG_SIZE_PX = (int(FIG_SIZE_IN[0] * DPI), int(FIG_SIZE_IN[1] * DPI))
FIGURES = (
    "kept_units_per_layer",
    "loss_and_prox_schedule",
    "ffn_width_spread",
    "head_mask_heatmap",
    "ffn_mask_heatmap",
    "head_mask_histogram",
    "ffn_mask_histogram",
    "s_y_z_size",
)


def _load(run_dir: Path) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    need = ["maskprune_report.json", "metrics.jsonl", "masks.pt"]
    missing = [n for n in need if not (run_dir / n).is_file()]
    if missing:
        raise MaskPruneError(
            f"{str(run_dir)!r} is not a complete maskprune run folder",
            expected=", ".join(need),
            found=f"missing {', '.join(missing)}",
            fix="pass the --out folder of a finished `maskprune prune`",
        )
    report = json.loads((run_dir / "maskprune_report.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    masks = torch.load(run_dir / "masks.pt", map_location="cpu", weights_only=True)
    return report, metrics, masks


def make_report(run_dir: str | Path) -> Path:
    """Draw every figure and the HTML page; return the page's path."""
    run = Path(run_dir)
    report, metrics, masks = _load(run)
    figs = _Figures(run / "report")
    head = masks["head"].float()  # [L, rows, U]
    ffn = masks["ffn"].float()[:, 0]  # [L, d_ff]
    steps = [m["step"] for m in metrics]
    _kept_figure(figs, report, head)
    _loss_figure(figs, steps, metrics)
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


def _kept_figure(figs: _Figures, report: dict, head: torch.Tensor) -> None:
    shape, params = report["shape"], report["params"]
    n_layers = shape["num_hidden_layers"]
    kept_head, kept_ffn = report["kept_units"]["head"], report["kept_units"]["ffn"]
    # fig. 3: kept heads and FFN channels per layer
    f, ax = figs.new("kept")
    layers = list(range(n_layers))
    heads_kept = [sum(len(r) for r in kept_head[li]) for li in layers]
    ffn_kept = [len(kept_ffn[li]) for li in layers]
    ax.bar(layers, ffn_kept, color="tab:orange", label="FFN channels kept")
    ax.axhline(shape["dense"]["intermediate_size"], color="tab:orange", ls=":", label="FFN channels (dense)")
    ax.set_xlabel("layer")
    ax.set_ylabel("FFN channels kept")
    ax2 = ax.twinx()
    ax2.plot(layers, heads_kept, "o-", color="tab:blue", label="head units kept")
    ax2.axhline(head.shape[1] * head.shape[2], color="tab:blue", ls=":", label="head units (dense)")
    ax2.set_ylabel("head units kept")
    ax2.set_ylim(0, head.shape[1] * head.shape[2] + 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    ax.set_title(
        f"Kept units per layer ({params['exported'] / 1e6:.1f}M of {params['dense'] / 1e6:.1f}M params, "
        f"budget {params['budget'] / 1e6:.1f}M)"
    )
    figs.save("kept_units_per_layer", f)


def _loss_figure(figs: _Figures, steps: list[int], metrics: list[dict]) -> None:
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


def _html(report: dict, files: dict[str, Path]) -> str:
    p, shape, ppl = report["params"], report["shape"], report.get("perplexity", {})
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['ppl']:.3f}</td><td>{v['seq_len']}</td>"
        f"<td>{v['windows']}/{v['total_windows']}</td></tr>"
        for k, v in ppl.items()
        if isinstance(v, dict) and "ppl" in v
    )
    imgs = "".join(
        f"<figure><img alt='{n}' src='data:image/png;base64,"
        f"{base64.b64encode(path.read_bytes()).decode()}'/><figcaption>{n.replace('_', ' ')}</figcaption></figure>"
        for n, path in files.items()
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>maskprune report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} td,th{{padding:2px 10px}}
figure{{display:inline-block;margin:8px}} img{{max-width:520px}}</style></head><body>
<h1>maskprune: {html.escape(str(report["model"]["source"]))}</h1>
<p>{p["dense"]:,} &rarr; {p["exported"]:,} parameters ({100 * p["sparsity"]:.2f}% removed; budget {p["budget"]:,});
every layer: {shape["num_attention_heads"]} query heads, {shape["num_key_value_heads"]} KV heads, head_dim
{shape["head_dim"]}, FFN {shape["intermediate_size"]}. Mask mass on cut units: {report["cut_mask_mass_share"]}.</p>
<table><tr><th>perplexity</th><th>value</th><th>seq_len</th><th>windows</th></tr>{rows}</table>
{imgs}</body></html>"""
