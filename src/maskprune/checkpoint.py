"""Learner checkpoints: written atomically, the last K kept, the newest valid one found on resume.

A checkpoint holds everything the next step depends on: masks, LoRA weights, optimizer state, the
minimax variables (step, sigma, y, z) and the RNG states. The data position is a pure function of the
step (``Learner.batch_indices``), so it needs no state of its own. Files are read back with
``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import MaskPruneError

__all__ = ["save_checkpoint", "load_latest", "list_checkpoints", "config_fingerprint", "RESUME_KEYS_FREE"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")

# Config keys that may differ between the interrupted run and its resumption.
RESUME_KEYS_FREE = frozenset(
    {
        "out",
        "overwrite",
        "resume",
        "threads",
        "log_every",
        "eval_data",
        "eval_seq_len",
        "eval_max_windows",
        "checkpoint_every",
        "keep_checkpoints",
        "device",
        "compile",
    }
)


def config_fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that must match for a resume to be exact."""
    return {k: v for k, v in cfg.items() if k not in RESUME_KEYS_FREE}


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, newest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, payload: dict[str, Any], step: int, keep: int) -> Path:
    """Write ``payload`` as ``ckpt-<step>.pt``: temporary file, fsync, rename; keep the last ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"ckpt-{step:08d}.pt"
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return final


def load_latest(folder: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads; corrupt or truncated ones are skipped with a warning."""
    for path in list_checkpoints(folder):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or "state" not in payload:
                raise ValueError("not a maskprune checkpoint")
            return payload, path
        except Exception as exc:  # a torn write, a truncated copy, a foreign file
            log.warning("skipping unreadable checkpoint %s (%s: %s)", path.name, type(exc).__name__, exc)
    return None


def checkpoint_dir(out: Path) -> Path:
    """Where a run keeps its checkpoints and metrics until it completes: ``<out>.checkpoints``."""
    return out.with_name(out.name + ".checkpoints")


def check_checkpoints(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to silently mix runs: resume needs a checkpoint, a fresh run needs none (or --overwrite). A
    checkpoint folder that holds no checkpoint (a run that stopped before its first one) has nothing to resume
    or lose: a fresh run replaces it."""
    ckpt_dir = checkpoint_dir(out)
    found = list_checkpoints(ckpt_dir)
    if resume and not found:
        left = " (it holds no checkpoint: the run stopped before its first)" if ckpt_dir.exists() else ""
        raise MaskPruneError(
            f"--resume: no checkpoint in {str(ckpt_dir)!r}{left}",
            fix="run the same command without --resume to start over, or pass the --out of the interrupted run",
        )
    if not resume and ckpt_dir.exists():
        if found and not overwrite:
            raise MaskPruneError(
                f"an earlier, unfinished run left checkpoints in {str(ckpt_dir)!r} (newest: {found[0].name})",
                fix="pass --resume to continue it, or --overwrite to start over",
            )
        if not found:
            log.info("removing %s: an earlier run stopped there before its first checkpoint", ckpt_dir)
        shutil.rmtree(ckpt_dir)
