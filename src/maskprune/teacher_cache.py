"""The teacher off the hot path (DistillKit's and Megatron-LM's offline-logit distillation): the dense teacher's
top-``k`` log-probabilities on a training window, with the log-mass of the rest, computed once and kept on disk, so
a later run with the same teacher, ``k`` and dtype that draws the same window (another size of a sweep, a resumed
run, another seed drawing it too) reads it instead of running the teacher.

The cache is **per window**: a run computes the windows it draws and no others. A run of 60 steps over 512
calibration windows pays 60 teacher forwards, as a full-vocabulary run does, not 512 (the default's time budget
draws far fewer windows than it has). A run whose every window is cached never loads the teacher.

On disk: ``<cache>/teacher-topk/<key>/<window hash>.safetensors`` with ``logprob`` (fp16 ``[T, k]``), ``index``
(int32 ``[T, k]``) and ``tail`` (fp32 ``[T]``), each written to a temporary name and renamed (complete or absent).
The key hashes the teacher (its path, gguf file, and the size and modification time of its weight files), ``k`` and
the autocast dtype the logits were computed in; a window's name hashes its token ids. What is read equals what was
written, and a window computed in the run is rounded the same way before use, so a run that reads the cache trains
exactly as the run that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .cache import cache_dir, source_fingerprint
from .losses import teacher_topk

__all__ = ["TopKStore", "WindowTopK", "teacher_cache_root", "teacher_key"]

log = logging.getLogger(__name__)

Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (logprob fp16 [.., T, k], index int32 [.., T, k], tail fp32)
Passes = Callable[[torch.Tensor], Iterator[tuple[int, torch.Tensor]]]  # windows -> (batch index, logits [b, T, V])


def _rounded(logits: torch.Tensor, k: int) -> Rows:
    """The stored form of the top-``k`` of ``logits [b, T, V]``: fp16 log-probabilities, int32 ids, fp32 tail, on
    the host (what the cache holds, and so what every run trains on)."""
    lp, idx, rest = teacher_topk(logits, k)
    return lp.cpu().half(), idx.cpu().int(), rest.cpu().float()


def teacher_cache_root() -> Path:
    """Where the teacher's windows are kept: ``$MASKPRUNE_TEACHER_CACHE``, else ``<cache>/teacher-topk``
    (:func:`maskprune.cache.cache_dir`). A large model's cache can take gigabytes (``k`` x 6 bytes a token): point it
    at a large disk."""
    root = os.environ.get("MASKPRUNE_TEACHER_CACHE")
    return Path(root) if root else cache_dir() / "teacher-topk"


def teacher_key(teacher: str, gguf_file: str | None, k: int, dtype: str) -> str:
    """A short hash of what a cached window depends on besides its tokens: the teacher (path or hub id, gguf file,
    its weight files' sizes and modification times where local), ``k`` and the dtype of the logits."""
    h = hashlib.sha256()
    h.update(json.dumps({"teacher": teacher, "gguf": gguf_file, "k": k, "dtype": dtype, "layout": 2}).encode())
    h.update(source_fingerprint(teacher, gguf_file).encode())
    return h.hexdigest()[:16]


class TopKStore:
    """The per-window files of one teacher, ``k`` and dtype (``key`` from :func:`teacher_key`)."""

    def __init__(self, key: str) -> None:
        self.folder = teacher_cache_root() / key

    @staticmethod
    def name(window: torch.Tensor) -> str:
        """The file name of a window ``[T]``: a hash of its token ids."""
        return hashlib.sha256(window.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:24]

    def has(self, window: torch.Tensor) -> bool:
        return (self.folder / f"{self.name(window)}.safetensors").is_file()

    def read(self, window: torch.Tensor) -> Rows | None:
        from safetensors.torch import load_file

        path = self.folder / f"{self.name(window)}.safetensors"
        if not path.is_file():
            return None
        t = load_file(path)
        return t["logprob"], t["index"], t["tail"]

    def write(self, window: torch.Tensor, rows: Rows) -> None:
        """Keep one window's rows (written to a temporary file and renamed: complete or absent)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            lp, idx, tail = rows
            save_file({"logprob": lp.contiguous(), "index": idx.contiguous(), "tail": tail.contiguous()}, tmp)
            os.replace(tmp, self.folder / f"{self.name(window)}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class WindowTopK:
    """The teacher's top-``k`` on the run's ``windows [N, T]``, window by window: read from ``store`` where it holds
    them, else computed by ``logits(batch [b, T]) -> [b, T, V]`` (which may load the teacher on first use) and
    kept in the store. Nothing is held in memory between steps: a step reads its batch's windows (a few MB), so a
    run's memory does not grow with the windows it draws. :meth:`rows` is what the learner asks; :meth:`fill`
    computes in one pass the windows of a list that are missing (before training, where the teacher must not stay
    in memory)."""

    def __init__(
        self,
        windows: torch.Tensor,
        k: int,
        store: TopKStore,
        logits: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int,
    ) -> None:
        self.windows, self.k, self.store, self._logits, self.batch_size = windows, k, store, logits, batch_size
        self._seen: set[int] = set()  # windows this run has used (read or computed), for the counts and the mass
        self.read = 0  # windows this run read from the store (first use)
        self.computed = 0  # windows computed (teacher forwards) during this run
        self._mass: list[float] = []  # per window used: the mean share of the teacher's probability in its top-k

    @property
    def path(self) -> Path:
        return self.store.folder

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def _first_use(self, i: int, rows: Rows, computed: bool) -> None:
        if i in self._seen:
            return
        self._seen.add(i)
        self._mass.append(float((-rows[2].double().exp()).add(1.0).mean()))
        if computed:
            self.computed += 1
        else:
            self.read += 1

    @property
    def mass(self) -> float | None:
        """The mean share of the teacher's probability its top-``k`` holds, over the windows this run used (1: all
        of it; what the rest, the tail, holds is matched only as a whole)."""
        return sum(self._mass) / len(self._mass) if self._mass else None

    def _compute(self, indices: list[int], logits: torch.Tensor) -> dict[int, Rows]:
        lp, idx, tail = _rounded(logits, self.k)
        out = {}
        for j, i in enumerate(indices):
            rows = (lp[j].clone(), idx[j].clone(), tail[j].clone())
            self.store.write(self.windows[i], rows)
            self._first_use(i, rows, computed=True)
            out[i] = rows
        return out

    def _stored(self, indices: Iterable[int]) -> tuple[dict[int, Rows], list[int]]:
        """``({index: rows} read from the store, [indices it lacks])``, each index once."""
        got, missing = {}, []
        for i in dict.fromkeys(int(j) for j in indices):
            rows = self.store.read(self.windows[i])
            if rows is None:
                missing.append(i)
            else:
                self._first_use(i, rows, computed=False)
                got[i] = rows
        return got, missing

    @torch.no_grad()
    def rows(self, indices: torch.Tensor, device: torch.device) -> Rows:
        """The teacher of the windows with indices ``indices`` (1-d), on ``device``; missing windows computed now."""
        got, missing = self._stored(indices.tolist())
        for s in range(0, len(missing), self.batch_size):
            part = missing[s : s + self.batch_size]
            got.update(self._compute(part, self._logits(self.windows[part])))
        batch = [got[int(i)] for i in indices.tolist()]
        return tuple(torch.stack([g[n] for g in batch]).to(device) for n in range(3))  # type: ignore[return-value]

    @torch.no_grad()
    def fill(
        self, indices: Iterable[int], passes: Callable[[torch.Tensor], Iterator[tuple[int, torch.Tensor]]]
    ) -> None:
        """Compute the missing windows among ``indices`` in one pass ``passes(windows) -> (batch index, logits)``
        over consecutive batches of ``batch_size`` (:meth:`maskprune.passes.Execution.logits`, streamed or not);
        what it computes goes to the store, not to memory."""
        missing = [i for i in dict.fromkeys(int(j) for j in indices) if not self.store.has(self.windows[i])]
        if not missing:
            return
        for j, logits in passes(self.windows[missing]):
            self._compute(missing[j * self.batch_size : j * self.batch_size + logits.shape[0]], logits)

    def summary(self) -> str:
        mass = "" if self.mass is None else f"; the top-{self.k} hold {100 * self.mass:.1f} % of the teacher's mass"
        return f"{self.read} windows read from the cache, {self.computed} computed ({self.path}){mass}"
