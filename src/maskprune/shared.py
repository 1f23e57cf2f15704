"""Work a run does that depends on the dense model, the data and a few settings, but not on the size it cuts to:
the dense model's evaluations, and the shape search's reference logits, layer-skip KLs, the one-shot metric's
statistics and the hidden channels' energies. Where a run sets ``shared_cache`` (``maskprune sweep`` sets it for
every size it cuts), each is computed once per key and kept there; a later run with the same model, windows and
settings reads it instead. What is read is what was computed (no rounding, no re-encoding), so a run that reads
the store reports exactly what the run that wrote it would have.

On disk: ``<folder>/<name>-<key>.pt`` (``torch.save`` of tensors, lists, dicts and numbers; read back with
``weights_only``), written to a temporary name and renamed, so a killed run leaves a complete file or none. The key
hashes the name, the settings (JSON), the model (:func:`maskprune.cache.source_fingerprint`), the token ids of the
windows the value was computed on and the run's device (a value is read back onto the device it was computed on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .cache import source_fingerprint

__all__ = ["SharedWork"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class SharedWork:
    """The store of one run's dense model (``folder`` None: nothing is kept, every value is computed)."""

    def __init__(
        self,
        folder: str | Path | None,
        model: str,
        gguf_file: str | None = None,
        device: str = "cpu",
        *,
        fingerprint: str | None = None,
    ) -> None:
        """``fingerprint``: what identifies the model instead of :func:`source_fingerprint` (its path and files'
        times), where something steadier does (a sweep's size: its run's report, kept when the folder moves)."""
        self.folder = Path(folder) if folder is not None else None
        if fingerprint is None and folder is not None:
            fingerprint = source_fingerprint(model, gguf_file)
        self._model = fingerprint or ""
        self._device = device  # a value is read back onto the devices it was computed on: part of every key
        self.reads: list[str] = []  # names read from the store during this run (the report lists them)
        self.writes: list[str] = []

    def key(self, name: str, settings: dict[str, Any], windows: torch.Tensor | None) -> str:
        """A short hash of what the value of ``name`` depends on."""
        h = hashlib.sha256()
        h.update(json.dumps({"name": name, "settings": settings}, sort_keys=True, default=str).encode())
        h.update(self._model.encode())
        h.update(self._device.encode())
        if windows is not None:
            h.update(str(tuple(windows.shape)).encode())
            h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def get(self, name: str, settings: dict[str, Any], windows: torch.Tensor | None, compute: Callable[[], T]) -> T:
        """The value of ``name`` for these ``settings`` and ``windows``: read from the store where it holds it, else
        ``compute()``, kept (where the store has a folder) and returned."""
        if self.folder is None:
            return compute()
        path = self.folder / f"{name}-{self.key(name, settings, windows)}.pt"
        if path.is_file():
            t = time.perf_counter()
            value = torch.load(path, weights_only=True)
            self.reads.append(name)
            log.info("%s read from the shared work at %s (%.1f s)", name, path, time.perf_counter() - t)
            return value
        value = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.folder)
        os.close(fd)
        try:
            torch.save(value, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.writes.append(name)
        return value

    def summary(self) -> dict | None:
        """What the report says about the store (None where the run kept nothing)."""
        if self.folder is None:
            return None
        return {"folder": str(self.folder), "read": list(self.reads), "computed": list(self.writes)}
