"""What ``maskprune sweep`` shows: the size/quality table (markdown), the figure (parameters against perplexity and
against mean zero-shot accuracy, the dense model and the chosen size marked, the target's bounds drawn; llama.cpp
prefill and decode speed against size where the sizes have GGUF files) and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .report import DPI

__all__ = ["markdown_table", "write_sweep_report", "sweep_figure"]


def _columns(record: dict) -> list[tuple[str, str]]:
    """``(key, header)`` of the table's measured columns."""
    proto = record["table_protocol"]
    cols = [(f"ppl_{proto['seq_len']}", f"ppl@{proto['seq_len']}")]
    cols += [(f"{t}_acc", f"{t} acc") for t in proto["tasks"]]
    if proto["tasks"]:
        cols.append(("accuracy_mean", "mean acc"))
    if any(r.get("gguf_bytes") for r in record["sizes"]):
        cols += [("gguf_bytes", "GGUF MB"), ("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s")]
    return cols


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "gguf_bytes":
        return f"{value / 1e6:.1f}"
    if key.endswith("_acc") or key == "accuracy_mean":
        return f"{100 * value:.2f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(n)


def _rows(record: dict) -> tuple[list[str], list[list[str]]]:
    cols = _columns(record)
    header = ["size", "params", "removed", *[h for _, h in cols], "minutes", "target"]
    dense = record.get("dense") or {}
    rows = []
    if dense:
        rows.append(["dense", _count(dense["params"]), "0.0%", *[_cell(k, dense.get(k)) for k, _ in cols],
                     "-", "-"])  # fmt: skip
    for r in record["sizes"]:
        mark = "chosen" if r["label"] == record.get("chosen") else ("meets" if r.get("meets") else "")
        if r.get("misses"):
            mark = "misses: " + "; ".join(r["misses"])
        rows.append([r["label"], _count(r["params"]), f"{100 * r['sparsity']:.1f}%",
                     *[_cell(k, r.get(k)) for k, _ in cols], f"{r['minutes']:.1f}", mark])  # fmt: skip
    return header, rows


def markdown_table(record: dict) -> str:
    """The sweep's table in markdown: the dense model, then every size from the largest."""
    header, rows = _rows(record)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    chosen = record.get("chosen")
    if any(v is not None for v in record["target"].values()):
        lines.append("")
        lines.append(f"Chosen: **{chosen}**" if chosen else "No size meets the target.")
    return "\n".join(lines)


def sweep_figure(record: dict, path: Path) -> Path:
    """Parameters against perplexity and against mean accuracy (and llama.cpp speed where measured), one panel
    each: the sizes as a line, the dense model as a star, the chosen size circled, a target's bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    proto, dense, sizes = record["table_protocol"], record.get("dense") or {}, record["sizes"]
    ppl_key = f"ppl_{proto['seq_len']}"
    panels = [(ppl_key, f"WikiText-2 perplexity @ {proto['seq_len']} (lower is better)")]
    if proto["tasks"]:
        panels.append(("accuracy_mean", f"mean accuracy, {' + '.join(proto['tasks'])} (higher is better)"))
    speed = any(r.get("prefill_tok_s") for r in sizes)
    fig, axes = plt.subplots(1, len(panels) + speed, figsize=(5.2 * (len(panels) + speed), 4.2), dpi=DPI, squeeze=False)
    chosen = next((r for r in sizes if r["label"] == record.get("chosen")), None)
    target = record["target"]
    for ax, (key, title) in zip(axes[0], panels):
        pts = sorted((r["params"] / 1e6, r[key]) for r in sizes if r.get(key) is not None)
        if pts:
            ax.plot(*zip(*pts), "o-", color="tab:blue", label="pruned sizes")
        for r in sizes:
            if r.get(key) is not None:
                ax.annotate(f"{100 * r['sparsity']:.0f}%", (r["params"] / 1e6, r[key]), textcoords="offset points",
                            xytext=(4, 6), fontsize=8, color="tab:blue")  # fmt: skip
        if dense.get(key) is not None:
            ax.plot(dense["params"] / 1e6, dense[key], "*", ms=16, color="black", label="dense")
        if chosen is not None and chosen.get(key) is not None:
            ax.plot(chosen["params"] / 1e6, chosen[key], "o", ms=16, mfc="none", mew=2, color="tab:red",
                    label=f"chosen ({chosen['label']})")  # fmt: skip
        bound = _bound(key, target, dense, ppl_key)
        if bound is not None:
            ax.axhline(bound, ls="--", color="tab:red", lw=1, label="target")
        if target.get("max_params"):
            ax.axvline(target["max_params"] / 1e6, ls=":", color="tab:red", lw=1, label="max params")
        values = [v for _, v in pts] + ([dense[key]] if dense.get(key) else [])
        if key == ppl_key and values and min(values) > 0 and max(values) > 5 * min(values):
            ax.set_yscale("log")  # perplexities that span several fold: the small sizes would flatten the rest
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 10, 100: not 10^1, 10^2
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(title.split(" (")[0])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if speed:
        ax = axes[0][-1]
        pts = sorted(
            (r["params"] / 1e6, r["prefill_tok_s"], r["decode_tok_s"]) for r in sizes if r.get("prefill_tok_s")
        )
        x, pre, dec = zip(*pts)
        ax.plot(x, pre, "o-", label="prefill")
        ax.plot(x, dec, "s-", label="decode")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("tokens / s (llama.cpp)")
        ax.set_title("llama.cpp speed of the GGUF files", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{record['model']}: size against quality", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _bound(key: str, target: dict, dense: dict, ppl_key: str) -> float | None:
    if key == ppl_key and target.get("max_ppl_ratio") and dense.get(key):
        return target["max_ppl_ratio"] * dense[key]
    if key == "accuracy_mean" and target.get("min_accuracy_share") and dense.get(key):
        return target["min_accuracy_share"] * dense[key]
    return None


def write_sweep_report(out: Path, record: dict) -> Path:
    """``sweep.png`` and ``index.html`` (the figure embedded, the table, links to every size's own page)."""
    png = sweep_figure(record, out / "sweep.png")
    header, rows = _rows(record)
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    for r in rows:
        table += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
    table += "</table>"
    links = "".join(
        f"<li><a href='{html.escape(r['label'])}/report/index.html'>{html.escape(r['label'])}</a> "
        f"({html.escape(r['folder'])})</li>"
        for r in record["sizes"]
        if (out / r["label"] / "report" / "index.html").is_file()
    )
    chosen = record.get("chosen")
    wanted = any(v is not None for v in record["target"].values())
    verdict = (f"<p><b>Chosen: {html.escape(chosen)}</b>, the smallest size that meets the target.</p>" if chosen
               else "<p><b>No size meets the target.</b></p>" if wanted else "")  # fmt: skip
    proto = record["table_protocol"]
    first = "" if proto["limit"] is None else f" (the first {proto['limit']} windows and examples)"
    if proto.get("ppl_tokens"):
        first = f" (the first {proto['ppl_tokens']} tokens){first}"
    page = out / "index.html"
    page.write_text(
        f"""<!doctype html><html><head><meta charset="utf-8"><title>maskprune sweep</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}} td,th{{padding:2px 10px;text-align:right}}
table{{border-collapse:collapse;margin:8px 0}} tr:nth-child(even){{background:#f4f4f4}} img{{max-width:100%}}</style>
</head><body><h1>{html.escape(str(record["model"]))}: {len(record["sizes"])} sizes</h1>{verdict}
<img alt="size against quality" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"/>
<p>WikiText-2 raw test at {proto["seq_len"]} tokens{first};
zero-shot: {html.escape(", ".join(proto["tasks"]) or "none")}. Minutes: the size's run and its measurement.</p>
{table}<ul>{links}</ul></body></html>""",
        encoding="utf-8",
    )
    return page
