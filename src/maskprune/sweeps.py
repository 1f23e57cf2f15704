"""``maskprune sweep``: one pruned checkpoint per size, as ``maskprune prune`` writes it, and the size/quality curve
that chooses among them.

Every size is a ``prune`` run of the same recipe and options into ``<out>/<label>`` (a stock checkpoint with its
report and card). What does not depend on the size is done once and shared through ``<out>/.shared``
(:mod:`maskprune.shared`): the dense model's evaluations, the shape search's reference logits, layer-skip KLs,
metric statistics and channel energies; the teacher's cached top-k where the distillation uses one
(``--teacher-topk``, :mod:`maskprune.teacher_cache`). A size's own run evaluates its final model only, not the
models between its stages (``eval_between``, on with ``--eval-between``). Every size and the dense model are then
measured on one table protocol (WikiText-2 perplexity at ``seq_len``, zero-shot ``tasks``), kept in the same store,
so a resumed sweep measures nothing twice. A target (:class:`Target`) picks the smallest size that meets it.

Written: ``sweep.json`` (the table, the target, the choice, the minutes), ``sweep.md``, ``sweep.png`` and
``index.html`` (:mod:`maskprune.sweepreport`). Resumable: a finished size is kept, a size cut off mid-run continues
as ``prune --resume`` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

from .config import PruneConfig
from .errors import MaskPruneError

__all__ = ["Size", "Target", "TableProtocol", "sizes_from", "parse_count", "pick", "run_sweep", "SWEEP_FILE"]

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5)


@dataclasses.dataclass(frozen=True)
class Size:
    """One size of the sweep: a sparsity or a parameter budget, and the folder name it is written under."""

    label: str
    sparsity: float | None = None
    budget_params: int | None = None

    def config(self, cfg: PruneConfig) -> PruneConfig:
        """``cfg`` asking for this size (the other way of giving a size cleared)."""
        if self.budget_params is not None:
            return cfg.replace(budget_params=self.budget_params, sparsity=None)
        return cfg.replace(sparsity=self.sparsity, budget_params=None)


_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str) -> int:
    """A parameter count: ``135000000``, ``100M``, ``1.5B``, ``800k``; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", text)
    if match is None:
        raise ValueError(f"expected a parameter count like 100M, 1.5B or 80000000, found {text!r}")
    value = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if value < 1:
        raise ValueError(f"expected a positive parameter count, found {text!r}")
    return int(round(value))


def _label_count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(n)


def sizes_from(sparsity: str | None = None, budget_params: str | None = None, params: str | None = None) -> list[Size]:
    """The sizes of a sweep from one comma-separated list: sparsities (``0.1,0.2``), parameter budgets
    (``--budget-params``, plain counts) or parameter counts with units (``--params 100M,80M``); the default
    sparsities 0.1-0.5 where none is given. Refused: more than one list, an empty or repeated size, a value out of
    range."""
    given = [(name, text) for name, text in (("sparsity", sparsity), ("budget_params", budget_params),
                                             ("params", params)) if text is not None]  # fmt: skip
    if len(given) > 1:
        raise MaskPruneError(
            "a sweep's sizes come from one list",
            found=" and ".join(f"--{n.replace('_', '-')}" for n, _ in given),
            fix="give --sparsity, --budget-params or --params, not several",
        )
    if not given:
        return [Size(f"sparsity-{s:.2f}", sparsity=s) for s in DEFAULT_SPARSITIES]
    name, text = given[0]
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise MaskPruneError(f"--{name.replace('_', '-')} lists no size", expected="e.g. 0.1,0.2,0.3")
    sizes = []
    for item in items:
        try:
            if name == "sparsity":
                s = float(item)
                if not 0.0 < s < 1.0:
                    raise ValueError(f"a sparsity is a share of the parameters to remove, in (0, 1); found {item}")
                sizes.append(Size(f"sparsity-{s:.2f}", sparsity=s))
            else:
                n = parse_count(item) if name == "params" else int(item)
                if n < 1:
                    raise ValueError(f"a parameter budget is a positive count; found {item}")
                sizes.append(Size(f"params-{_label_count(n)}", budget_params=n))
        except ValueError as exc:
            raise MaskPruneError(f"--{name.replace('_', '-')}: {exc}", fix="e.g. --sparsity 0.1,0.3,0.5") from None
    labels = [s.label for s in sizes]
    if len(set(labels)) < len(labels):
        raise MaskPruneError(f"--{name.replace('_', '-')} repeats a size", found=", ".join(labels))
    return sizes


@dataclasses.dataclass(frozen=True)
class TableProtocol:
    """What every size and the dense model are measured on for the table: WikiText-2 perplexity at ``seq_len``
    (every window; ``ppl_tokens``: the first ``ppl_tokens`` tokens of the text, the same for every model;
    ``limit``: the first windows) and the zero-shot ``tasks`` (``data_dir``: offline task data; ``limit``: examples
    per task), in the run's dtype."""

    seq_len: int = 2048
    tasks: tuple[str, ...] = ("piqa", "arc_easy")
    data_dir: str | None = None
    limit: int | None = None
    batch_size: int = 4
    ppl_tokens: int | None = None

    def problems(self) -> list[str]:
        if self.ppl_tokens is not None and self.ppl_tokens < self.seq_len:
            return [f"--ppl-tokens {self.ppl_tokens} is less than one window of --table-seq-len {self.seq_len}"]
        return []

    def settings(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Target:
    """What the user wants of a size; the sweep picks the smallest size that meets every bound given."""

    max_ppl_ratio: float | None = None  # perplexity at most this times the dense model's
    min_accuracy_share: float | None = None  # mean zero-shot accuracy at least this share of the dense model's
    max_params: int | None = None
    max_gguf_bytes: int | None = None

    def given(self) -> bool:
        return any(v is not None for v in dataclasses.asdict(self).values())

    def problems(self, table: TableProtocol, gguf: str | None) -> list[str]:
        """What makes the target unmeasurable with these settings (checked before any run)."""
        problems = []
        if self.max_ppl_ratio is not None and self.max_ppl_ratio <= 0:
            problems.append(f"--max-ppl-ratio must be positive, found {self.max_ppl_ratio}")
        if self.min_accuracy_share is not None:
            if not 0 < self.min_accuracy_share <= 1.5:
                problems.append(
                    f"--min-accuracy-share is a share of the dense accuracy, found {self.min_accuracy_share}"
                )
            if not table.tasks:
                problems.append("--min-accuracy-share needs zero-shot tasks (--tasks), and --tasks is empty")
        if self.max_gguf_bytes is not None and not gguf:
            problems.append("--max-gguf-bytes needs the GGUF files: pass --gguf TYPE (e.g. q4_k_m)")
        return problems

    def misses(self, row: dict, dense: dict, seq_len: int) -> list[str]:
        """The bounds ``row`` (a size of the table) does not meet, in words (empty: it meets the target)."""
        out = []
        key = f"ppl_{seq_len}"
        if self.max_ppl_ratio is not None:
            bound = self.max_ppl_ratio * dense[key]
            if not row.get(key) or row[key] > bound:
                out.append(f"ppl@{seq_len} {row.get(key) or float('nan'):.2f} > {bound:.2f}")
        if self.min_accuracy_share is not None:
            bound = self.min_accuracy_share * dense["accuracy_mean"]
            if row.get("accuracy_mean") is None or row["accuracy_mean"] < bound:
                out.append(f"mean accuracy {row.get('accuracy_mean') or float('nan'):.4f} < {bound:.4f}")
        if self.max_params is not None and row["params"] > self.max_params:
            out.append(f"{row['params']:,} parameters > {self.max_params:,}")
        if self.max_gguf_bytes is not None and (row.get("gguf_bytes") or math.inf) > self.max_gguf_bytes:
            out.append(f"GGUF {row.get('gguf_bytes')} bytes > {self.max_gguf_bytes}")
        return out


def pick(rows: list[dict], dense: dict, target: Target, seq_len: int) -> str | None:
    """The label of the smallest size (fewest parameters) that meets ``target``; None where none does (or no target
    is given). Marks every row with ``meets`` and ``misses``."""
    for row in rows:
        row["misses"] = target.misses(row, dense, seq_len) if target.given() else []
        row["meets"] = target.given() and not row["misses"]
    meeting = [r for r in rows if r["meets"]]
    return min(meeting, key=lambda r: r["params"])["label"] if meeting else None


def table_row(label: str, evaluation: dict, seq_len: int, tasks: tuple[str, ...]) -> dict:
    """A size's (or the dense model's) cells from its table evaluation (:func:`maskprune.evaluate.evaluate_model`)."""
    row: dict[str, Any] = {"label": label, "params": evaluation["params"]}
    ppl = evaluation["perplexity"].get(str(seq_len))
    row[f"ppl_{seq_len}"] = ppl["ppl"] if ppl else None
    zs = (evaluation.get("zeroshot") or {}).get("tasks", {})
    for t in tasks:
        e = zs.get(t)
        row[f"{t}_acc"] = e[e["average_uses"]] if e else None
    accs = [row[f"{t}_acc"] for t in tasks]
    row["accuracy_mean"] = sum(accs) / len(accs) if accs and None not in accs else None
    return row


def run_sweep(
    cfg: PruneConfig,
    sizes: list[Size],
    out: str | Path,
    *,
    table: TableProtocol = TableProtocol(),
    target: Target = Target(),
    progress: bool = True,
) -> dict:
    """Cut ``cfg``'s model to every size into ``out``, measure each and the dense model on ``table``, pick by
    ``target``; write ``sweep.json``, ``sweep.md``, the figure and the HTML page; return the sweep's record."""
    from .recipes import resumable, run

    out = Path(out)
    _check(cfg, sizes, out, table, target)
    started = time.perf_counter()
    shared = out / ".shared"
    out.mkdir(parents=True, exist_ok=True)
    record = _record(cfg, sizes, out, table, target)
    dense = _evaluate(cfg, cfg.model, cfg.gguf_file, table, shared, "dense", progress)
    record["dense"] = dense
    for size in sizes:
        folder = out / size.label
        t0 = time.perf_counter()
        earlier = next((r for r in record["sizes"] if r["label"] == size.label), None)
        if (folder / "maskprune_report.json").is_file():
            report = json.loads((folder / "maskprune_report.json").read_text())
            _same_run(report, size, cfg, folder)
            log.info("sweep: %s finished already, kept", size.label)
            run_seconds = (report.get("seconds") or {}).get("total")
            t0 -= 60 * earlier["minutes"] if earlier else (run_seconds or 0.0)  # the minutes it took when it ran
        else:
            again = resumable(folder)
            log.info("sweep: %s %s", size.label, "resumed" if again else "...")
            size_cfg = size.config(cfg).replace(
                out=str(folder), shared_cache=str(shared), resume=again, overwrite=False,
                eval_between=False if cfg.eval_between is None else cfg.eval_between,  # the table measures each size
            )  # fmt: skip
            report = run(size_cfg, progress=progress)
            run_seconds = time.perf_counter() - t0
        row = {**_evaluate(cfg, str(folder), None, table, shared, size.label, progress), "label": size.label}
        row.update(_size_facts(size, report, folder, run_seconds, time.perf_counter() - t0))
        record["sizes"] = [r for r in record["sizes"] if r["label"] != size.label] + [row]
        _write(out, record)  # after every size: a killed sweep keeps what it measured
    record["chosen"] = pick(record["sizes"], dense, target, table.seq_len)
    record["sweep_minutes"] = round((time.perf_counter() - started) / 60, 3)
    _write(out, record)
    from .sweepreport import write_sweep_report

    record["page"] = str(write_sweep_report(out, record))
    return record


def _check(cfg: PruneConfig, sizes: list[Size], out: Path, table: TableProtocol, target: Target) -> None:
    """Every check that needs no model: the target against the settings, the task data, the output folder, and
    each size's config (a bad option fails now, not after the first size)."""
    from .zeroshot import check_sources, resolve_tasks

    problems = target.problems(table, cfg.gguf) + table.problems()
    if table.seq_len < 2:
        problems.append(f"--table-seq-len must be at least 2 tokens, found {table.seq_len}")
    if problems:
        raise MaskPruneError("the sweep's target cannot be measured: " + "; ".join(problems))
    if table.tasks:
        check_sources(resolve_tasks(list(table.tasks)), table.data_dir)
    from .recipes import check_request

    for size in sizes:  # every size's options and what it asks of the model's shape, before the first run
        check_request(size.config(cfg).replace(out=str(out / size.label)))
    if out.exists() and not out.is_dir():
        raise MaskPruneError(f"--out {str(out)!r} is a file", fix="give a folder for the sweep")
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")) and not cfg.resume:
        raise MaskPruneError(
            f"--out {str(out)!r} holds an earlier sweep",
            fix="pass --resume to continue it (finished sizes are kept), or choose another --out",
        )
    if cfg.gguf:
        from .gguf_export import preflight

        preflight(cfg.gguf)


def _record(cfg: PruneConfig, sizes: list[Size], out: Path, table: TableProtocol, target: Target) -> dict:
    """The sweep's record as far as it is known before any run (``sizes`` filled as they finish; an earlier record
    of a resumed sweep gives the sizes it measured)."""
    earlier = []
    path = out / SWEEP_FILE
    if cfg.resume and path.is_file():
        earlier = json.loads(path.read_text()).get("sizes", [])
    labels = {s.label for s in sizes}
    return {
        "model": cfg.model,
        "sizes_asked": [dataclasses.asdict(s) for s in sizes],
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("sparsity", "budget_params", "out")},
        "table_protocol": table.settings(),
        "target": dataclasses.asdict(target),
        "sizes": [r for r in earlier if r.get("label") in labels and (out / r["label"]).is_dir()],
        "chosen": None,
    }


def _evaluate(cfg: PruneConfig, model: str, gguf_file: str | None, table, shared: Path, label: str, progress) -> dict:
    """The table's cells of ``model`` (the dense source, or a size's folder), measured once: kept in the sweep's
    shared store under a key of the model's files and the protocol."""
    from .shared import SharedWork

    store = SharedWork(shared, model, gguf_file, cfg.device, fingerprint=_size_fingerprint(Path(model)))
    settings = {**table.settings(), "dtype": cfg.dtype}
    t0 = time.perf_counter()
    evaluation = store.get("table", settings, None, lambda: _measure(cfg, model, gguf_file, table, label, progress))
    row = table_row(label, evaluation, table.seq_len, table.tasks)
    row["eval_minutes"] = round((time.perf_counter() - t0) / 60, 3)
    return row


def _size_fingerprint(folder: Path) -> str | None:
    """What identifies a size's checkpoint for its table entry: the run's report (written once per run, with its
    timings and the export's reload difference) and the weight files' names and sizes; not the folder's path or the
    files' times, so a sweep copied or moved elsewhere and resumed measures nothing again. None for the dense model
    (not a size: the path and times of its files, as every run's store keys it)."""
    report = folder / "maskprune_report.json"
    if not report.is_file():
        return None
    parts = ["sweep size", hashlib.sha256(report.read_bytes()).hexdigest()]
    parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(folder.glob("*.safetensors"))]
    return "\n".join(parts)


def _measure(cfg: PruneConfig, model: str, gguf_file: str | None, table: TableProtocol, label: str, progress) -> dict:
    from .dtypes import autocast_dtype
    from .evaluate import evaluate_model
    from .models import load_model
    from .outputs import resolve_device

    device = resolve_device(cfg.device)
    log.info("sweep: measuring %s (WikiText-2 @ %d, tasks %s)", label, table.seq_len, ",".join(table.tasks) or "none")
    loaded = load_model(model, gguf_file=gguf_file, trust_remote_code=cfg.trust_remote_code, device=device)
    return evaluate_model(
        loaded.model,
        loaded.tokenizer,
        seq_lens=[table.seq_len],
        tasks=list(table.tasks),
        data_dir=table.data_dir,
        limit=table.limit,
        ppl_tokens=table.ppl_tokens,
        batch_size=table.batch_size,
        autocast_dtype=autocast_dtype(cfg.dtype, device),
        progress=progress,
    )


def _same_run(report: dict, size: Size, cfg: PruneConfig, folder: Path) -> None:
    """Refuse to keep a finished size that another command wrote (another model, size or number of steps)."""
    done = report["config"]
    want = size.config(cfg)
    pairs = {
        "model": (done.get("model"), want.model),
        "sparsity": (done.get("sparsity"), want.sparsity),
        "budget_params": (done.get("budget_params"), want.budget_params),
        "seed": (done.get("seed"), want.seed),
        "minutes": (done.get("minutes"), want.minutes),
    }
    if not want.minutes:  # a budget sets the steps; without one, the steps asked must match those run
        pairs["steps"] = (done.get("recover_steps") or done.get("steps"), want.steps)
    differ = {k: v for k, v in pairs.items() if v[0] != v[1] and not (k == "sparsity" and want.budget_params)}
    if differ:
        raise MaskPruneError(
            f"{str(folder)!r} holds a finished run of other options than this sweep's",
            found=", ".join(f"{k} {a!r} (this sweep: {b!r})" for k, (a, b) in differ.items()),
            fix="remove that folder, or run the sweep with the options it was started with",
        )


def _size_facts(size: Size, report: dict, folder: Path, run_seconds: float | None, seconds: float) -> dict:
    """What the table says of a size besides its evaluation: what was asked, the run's minutes, its GGUF and, where
    llama.cpp is installed, that GGUF's prefill and decode speed."""
    facts: dict[str, Any] = {
        "sparsity_asked": size.sparsity,
        "budget_params": size.budget_params,
        "sparsity": report["params"]["sparsity"],
        "folder": str(folder),
        "shape": {
            k: report["shape"].get(k)
            for k in (
                "num_hidden_layers",
                "hidden_size",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
            )
        },  # fmt: skip
        "run_minutes": round(run_seconds / 60, 3) if run_seconds is not None else None,
        "minutes": round(seconds / 60, 3),
        "steps": (report.get("recovery") or report.get("distill") or {}).get("steps"),
    }
    gguf = report.get("gguf")
    if gguf:
        facts["gguf_bytes"] = gguf["bytes"]
        facts.update(_gguf_speed(folder / gguf["file"]))
    return facts


def _gguf_speed(path: Path) -> dict:
    from . import llamacpp

    if not llamacpp.available():
        log.warning("llama.cpp speed not measured: install maskprune[llamacpp] for prefill and decode speed")
        return {"prefill_tok_s": None, "decode_tok_s": None}
    s = llamacpp.speed(path)
    return {"prefill_tok_s": s.prefill_tokens_per_s, "decode_tok_s": s.decode_tokens_per_s}


def _write(out: Path, record: dict) -> None:
    from .sweepreport import markdown_table

    record["sizes"].sort(key=lambda r: -r["params"])
    tmp = out / f".{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / SWEEP_FILE)
    (out / "sweep.md").write_text(markdown_table(record) + "\n")
