"""The teacher off the hot path (DistillKit's and Megatron-LM's offline-logit distillation): the dense teacher's
top-``k`` log-probabilities on every training window, with the log-mass of the rest, computed once in one pass
(resident or streamed, :mod:`maskprune.passes`) and kept on disk, so the student trains with no teacher in memory
and later runs with the same teacher, windows and ``k`` (other seeds, sparsities, a resumed run) read the cache.

On disk: ``<cache>/teacher-topk/<key>/topk.safetensors`` with ``logprob`` (fp16 ``[N, T, k]``), ``index`` (int32
``[N, T, k]``) and ``tail`` (fp32 ``[N, T]``), built under :func:`maskprune.cache.build_once` (complete or absent).
The key hashes the teacher (its path, gguf file, and the size and modification time of its weight files), the
windows' token ids, ``k`` and the autocast dtype the logits were computed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch

from .cache import build_once, cache_dir, source_fingerprint
from .losses import teacher_topk

__all__ = ["TeacherTopK", "teacher_key", "cached_teacher_topk", "compute_teacher_topk"]

log = logging.getLogger(__name__)

_FILE = "topk.safetensors"


@dataclasses.dataclass(frozen=True)
class TeacherTopK:
    """The teacher's top-``k`` on ``N`` windows of ``T`` tokens: ``logprob [N, T, k]``, ``index [N, T, k]``,
    ``tail [N, T]`` (log of the probability of every other token; -inf where ``k`` is the vocabulary)."""

    logprob: torch.Tensor
    index: torch.Tensor
    tail: torch.Tensor
    path: Path | None = None

    @property
    def k(self) -> int:
        return int(self.index.shape[-1])

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def rows(self, windows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher of the windows with indices ``windows`` (a 1-d index tensor), on ``device``."""
        return (
            self.logprob[windows].to(device),
            self.index[windows].to(device),
            self.tail[windows].to(device),
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logprob, self.index, self.tail))


@torch.no_grad()
def compute_teacher_topk(
    logits_of: Callable[[], object], windows: torch.Tensor, k: int, batch_size: int
) -> TeacherTopK:
    """The top-``k`` of the logits ``logits_of()`` yields, ``(batch index, logits [b, T, V])`` for consecutive
    batches of ``batch_size`` windows (:meth:`maskprune.passes.Execution.logits`)."""
    n, t = windows.shape
    logprob = torch.empty(n, t, k, dtype=torch.float16)
    index = torch.empty(n, t, k, dtype=torch.int32)
    tail = torch.empty(n, t, dtype=torch.float32)
    for j, logits in logits_of():
        lp, idx, rest = teacher_topk(logits, k)
        rows = slice(j * batch_size, j * batch_size + logits.shape[0])
        logprob[rows], index[rows], tail[rows] = lp.cpu().half(), idx.cpu().int(), rest.cpu()
    return TeacherTopK(logprob, index, tail)


def teacher_key(teacher: str, gguf_file: str | None, windows: torch.Tensor, k: int, dtype: str) -> str:
    """A short hash of what the cache depends on: the teacher (path or hub id, gguf file, its weight files' sizes
    and modification times where local), the windows' token ids, ``k`` and the dtype of the logits."""
    h = hashlib.sha256()
    h.update(json.dumps({"teacher": teacher, "gguf": gguf_file, "k": k, "dtype": dtype}).encode())
    h.update(source_fingerprint(teacher, gguf_file).encode())
    h.update(str(tuple(windows.shape)).encode())
    h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_teacher_topk(key: str, build: Callable[[], TeacherTopK]) -> TeacherTopK:
    """The cache of ``key``: read from disk, or built once by ``build()`` (which may load the teacher) and written."""
    from safetensors.torch import load_file, save_file

    target = cache_dir() / "teacher-topk" / key
    built = False

    def write(tmp: Path) -> None:
        nonlocal built
        top = build()
        save_file({"logprob": top.logprob, "index": top.index, "tail": top.tail}, tmp / _FILE)
        built = True

    build_once(target, lambda p: (p / _FILE).is_file(), write)
    tensors = load_file(target / _FILE)
    top = TeacherTopK(tensors["logprob"], tensors["index"], tensors["tail"], target)
    log.info(
        "teacher top-%d %s %s (%d windows, %.0f MB)",
        top.k, "computed and cached at" if built else "read from the cache at", target, len(top), top.nbytes / 1e6,
    )  # fmt: skip
    return top
