"""The Python API for notebooks and scripts: the same runs as the CLI, options named as the config keys.

::

    import maskprune
    result = maskprune.prune("smollm2-135m", sparsity=0.5, steps=120)   # nothing left on disk
    result.model.generate(...)                                           # a stock PreTrainedModel
    result.report["perplexity"]["exported"]
    maskprune.prune("smollm2-135m", sparsity=0.2, out="runs/s20")        # also written to runs/s20
    maskprune.distill("runs/s20", teacher="smollm2-135m", steps=60)
    maskprune.evaluate(["runs/s20"], seq_lens=[2048], tasks=["piqa"], data_dir="data")

Options are validated exactly as the CLI validates flags (an unknown key or a value out of range is a
:class:`~maskprune.errors.MaskPruneError` naming every problem).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_MODEL,
    DISTILL_ONLY,
    GROUP_OF,
    PRUNE_ONLY,
    PruneConfig,
    distill_overrides,
    field_hint,
    is_switch,
    load_config,
    options_help,
    prune_overrides,
)
from .errors import MaskPruneError

__all__ = ["PruneResult", "prune", "distill", "sweep"]


@dataclass
class PruneResult:
    """A finished run: the exported model and tokenizer in memory, its report, and where it was written
    (None when no ``out`` was given). ``model`` is None on the secondary processes of a distributed run."""

    model: Any
    tokenizer: Any
    report: dict
    out: Path | None


def prune(
    model: str | PruneConfig = DEFAULT_MODEL, *, out: str | Path | None = None, progress: bool = True, **options
) -> PruneResult:
    """Prune ``model`` (a folder, hub id, GGUF file or ``smollm2-135m``; or a ready :class:`PruneConfig`) with
    the config keys in ``options`` (``sparsity=0.5``, ``steps=120``, ``method="flap"``, ...). The result is
    written to ``out`` when given; otherwise the run works in a temporary folder that is removed."""
    if isinstance(model, PruneConfig):
        if options:
            raise MaskPruneError("pass options either in the PruneConfig or as keywords, not both")
        cfg = model if out is None else model.replace(out=str(out))
    else:
        overrides = {"model": model, **prune_overrides(options), **({"out": str(out)} if out is not None else {})}
        cfg = _load(overrides)
    return _run(cfg, progress)


def distill(
    student: str, *, teacher: str, out: str | Path | None = None, progress: bool = True, **options
) -> PruneResult:
    """Distil the pruned ``student`` from its dense ``teacher`` (see :mod:`maskprune.recipes`); options as
    for :func:`prune` (``steps``, ``calib``, ``lora_rank``, ``full``, ...)."""
    overrides = {"model": student, "teacher": teacher, **distill_overrides(options)}
    if out is not None:
        overrides["out"] = str(out)
    return _run(_load(overrides), progress)


def sweep(
    model: str = DEFAULT_MODEL,
    *,
    out: str | Path,
    sparsity: list[float] | None = None,
    budget_params: list[int] | None = None,
    params: list[str] | None = None,
    table_seq_len: int = 2048,
    tasks: list[str] | tuple[str, ...] = ("piqa", "arc_easy"),
    data_dir: str | None = None,
    limit: int | None = None,
    ppl_tokens: int | None = None,
    max_ppl_ratio: float | None = None,
    min_accuracy_share: float | None = None,
    max_params: int | None = None,
    max_gguf_bytes: int | None = None,
    progress: bool = True,
    **options,
) -> dict:
    """``maskprune sweep``: ``model`` pruned to every size (``sparsity=[0.1, 0.3]``, ``budget_params=[...]`` or
    ``params=["100M", "80M"]``; default 0.1-0.5) into ``out``, each measured on WikiText-2 at ``table_seq_len`` and
    the zero-shot ``tasks``; the bounds given pick the smallest size that meets them. Options as for :func:`prune`
    (per size). Returns the sweep's record (``sizes``, ``dense``, ``chosen``: a label or None; ``page``)."""
    from .sweeps import TableProtocol, Target, run_sweep, sizes_from

    def listed(values) -> str | None:
        return None if values is None else ",".join(str(v) for v in values)

    sizes = sizes_from(listed(sparsity), listed(budget_params), listed(params))
    cfg = _load({"model": model, **prune_overrides(options)})
    table = TableProtocol(
        seq_len=table_seq_len, tasks=tuple(tasks), data_dir=data_dir, limit=limit, ppl_tokens=ppl_tokens
    )
    target = Target(max_ppl_ratio, min_accuracy_share, max_params, max_gguf_bytes)
    return run_sweep(cfg, sizes, out, table=table, target=target, progress=progress)


def _load(overrides: dict[str, Any]) -> PruneConfig:
    """The config of these keyword options; an error names keywords (``sparsity=``), not the CLI's flags."""
    try:
        return load_config(overrides=overrides)
    except MaskPruneError as exc:
        raise MaskPruneError(_keywords(str(exc))) from None


_NOT_VALUES = frozenset({"or", "and", "to", "with", "the", "in", "on", "for", "is"})


def _keywords(message: str) -> str:
    """A message written for the CLI, in the API's words: ``--sparsity 0.5`` -> ``sparsity=0.5``, ``--full`` ->
    ``full=True``, ``--no-lora`` -> ``lora=False`` (command lines quoted in backticks stay as they are)."""

    def keyword(m: re.Match) -> str:
        negated, name, value = bool(m.group(1)), m.group(2).replace("-", "_"), m.group(3)
        if negated:
            return f"{name}=False" + (m.group(0)[m.end(2) - m.start(0) :] if value else "")
        if name in GROUP_OF and is_switch(field_hint(name)):
            return f"{name}=True" + (f" {value}" if value else "")
        if value and value.lower() not in _NOT_VALUES:
            return f"{name}={value}"
        return f"{name}=..." + (f" {value}" if value else "")

    pattern = re.compile(r"--(no-)?([a-z][a-z0-9-]*)(?: ([a-z0-9_.,-]+))?")
    parts = message.split("`")
    return "`".join(pattern.sub(keyword, p) if i % 2 == 0 else p for i, p in enumerate(parts))


prune.__doc__ = f"{prune.__doc__}\n\n    Options (keyword = default: meaning), by group::\n\n" + "\n".join(
    "        " + line for line in options_help(DISTILL_ONLY).splitlines()
)
distill.__doc__ = f"{distill.__doc__}\n\n    Options (keyword = default: meaning), by group::\n\n" + "\n".join(
    "        " + line for line in options_help(PRUNE_ONLY | {"teacher", "model"}).splitlines()
)


def _run(cfg: PruneConfig, progress: bool) -> PruneResult:
    from .recipes import run as run_recipe

    if cfg.out is not None:
        report = run_recipe(cfg, progress=progress)
        return _result(report, Path(report["out"]) if "out" in report else None, keep=True)
    with tempfile.TemporaryDirectory(prefix="maskprune-") as tmp:
        report = run_recipe(cfg.replace(out=str(Path(tmp) / "model")), progress=progress)
        result = _result(report, Path(tmp) / "model", keep=False)
    report.pop("out", None)
    return result


def _result(report: dict, folder: Path | None, *, keep: bool) -> PruneResult:
    if folder is None or "params" not in report:  # a secondary process of a distributed run
        return PruneResult(None, None, report, None)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)  # tensors read into memory: the folder may go after
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return PruneResult(model.eval(), tokenizer, report, folder if keep else None)
