"""The run report: one typed record of a finished run, assembled by the recipe and written once as
``maskprune_report.json``. The model card and the HTML report read this object (or one read back from the
file), never a rebuilt configuration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from .config import PruneConfig

__all__ = ["RunReport", "REPORT_FILE", "recipe_of"]

REPORT_FILE = "maskprune_report.json"


@dataclasses.dataclass
class RunReport:
    """Every section of the report. ``config`` is the run's resolved :class:`PruneConfig`; the other sections are
    plain JSON values (their keys are documented in the README's "What you get"). The sections in
    :attr:`OPTIONAL` exist only for the runs they describe (a distillation, validation, prune + recovery, GGUF)."""

    maskprune_version: str
    config: PruneConfig
    model: dict
    machine: dict
    params: dict | None = None
    shape: dict | None = None
    cut: dict | None = None
    split_search: dict | None = None
    shape_search: dict | None = None
    calibration: str | None = None
    bias_compensation: dict | None = None
    kept_units: dict | None = None
    scores: dict | None = None
    reconstruction: dict | None = None
    method: str | None = None
    final_state: dict | None = None
    cut_mask_mass_share: dict | None = None
    masks: dict | None = None
    distill: dict | None = None
    validation: list | None = None
    recovery: dict | None = None
    perplexity: dict | None = None
    zeroshot: dict | None = None
    parity: dict | None = None
    roundtrip: dict | None = None
    seconds: dict | None = None
    memory: dict | None = None
    gguf: dict | None = None
    shared: dict | None = None  # --shared-cache: the store, and which dense facts were read or computed
    out: str | None = None  # where the run was written (not saved in the file: the file is in it)

    OPTIONAL: ClassVar[tuple[str, ...]] = (
        "distill",
        "validation",
        "recovery",
        "gguf",
        "reconstruction",
        "shape_search",
        "memory",
        "shared",
    )

    def update(self, sections: dict[str, Any]) -> None:
        """Set several sections at once (``sections`` maps section names to values)."""
        for key, value in sections.items():
            if key not in _SECTIONS:
                raise KeyError(f"RunReport has no section {key!r}")
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the config flat, absent optional sections left out, ``out`` last."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["config"] = self.config.to_dict()
        for key in self.OPTIONAL:
            if d[key] is None:
                del d[key]
        if d["out"] is None:
            del d["out"]
        return d

    def write(self, folder: Path) -> Path:
        """``folder/maskprune_report.json`` (without ``out``)."""
        path = Path(folder) / REPORT_FILE
        path.write_text(json.dumps({k: v for k, v in self.to_dict().items() if k != "out"}, indent=1))
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunReport":
        """A report read back (``maskprune report DIR``): keys a later version dropped are ignored, config keys
        an earlier version did not have take their defaults."""
        values = {k: v for k, v in d.items() if k in _SECTIONS}
        values["config"] = PruneConfig.from_dict(d.get("config", {}))
        return cls(**values)

    @classmethod
    def read(cls, folder: Path) -> "RunReport":
        return cls.from_dict(json.loads((Path(folder) / REPORT_FILE).read_text()))


_SECTIONS = frozenset(f.name for f in dataclasses.fields(RunReport))


def recipe_of(report: dict) -> str:
    """What a run did, from its report (a dict as written): ``distill`` (a pruned student distilled from its
    teacher), ``one-shot`` (units chosen by a one-shot score), ``prior`` (the default: the one-shot prior's
    selection fixed at step 0, then distillation of the pruned structure) or ``learned`` (masks learned for
    some steps by the minimax method). A prune + recovery is its cut's kind with a ``recovery`` section."""
    cfg = report["config"]
    if report.get("distill"):
        return "distill"
    if cfg.get("method", "maskprune") != "maskprune":
        return "one-shot"
    return "learned" if cfg.get("freeze_share", 0.0) > 0.0 else "prior"
