"""Data parallelism over torch.distributed (launched by ``torchrun`` or ``accelerate launch``).

Each process takes its slice of every global batch; mask and LoRA gradients are averaged with an
all-reduce; the proximal step and the s / y / z updates then run on identical values in every
process, and :func:`check_consistent` verifies that cheaply (fails loudly on drift). Only rank 0
writes logs, checkpoints and the export.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

import torch
import torch.distributed as dist

from .errors import MaskPruneError

__all__ = [
    "init_from_env",
    "world",
    "rank",
    "is_main",
    "all_reduce_grads",
    "all_reduce_mean",
    "any_true",
    "check_consistent",
    "RankDesyncError",
    "barrier",
    "is_sharded",
    "shard_fsdp",
    "full",
    "like",
    "shutdown",
]

log = logging.getLogger(__name__)

_OWNED = False  # True when init_from_env created the process group (then shutdown destroys it)


class RankDesyncError(MaskPruneError):
    """Processes that must hold identical masks and multipliers hold different ones."""


def init_from_env(device: torch.device) -> bool:
    """Join the process group the launcher describes (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    global _OWNED
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    _OWNED = True
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    log.info("rank %d of %d joined (%s)", rank(), world(), backend)
    return True


def shutdown() -> None:
    """Destroy the process group :func:`init_from_env` created (a group the caller made is left alone).

    A process that exits with a live gloo group can abort at interpreter teardown ("terminate called
    without an active exception", SIGABRT): gloo worker threads still hold work objects then. Seen in CI
    on the non-writing rank of an FSDP run, which finishes first."""
    global _OWNED
    if _OWNED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (a parameter or state sharded by FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without the distributed package
        return False
    return isinstance(t, DTensor)


def shard_fsdp(model: torch.nn.Module, layers: Iterable[torch.nn.Module]) -> torch.nn.Module:
    """Shard ``model`` over all processes with torch FSDP2: one unit per decoder layer, then the root
    (embeddings, norm, head). Frozen base weights and LoRA weights are sharded alike; FSDP all-gathers
    a layer for its forward and backward and reduce-scatters (averages) the LoRA gradients. The masks
    live outside the model, replicated, and are averaged by :func:`all_reduce_grads`."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process for a DTensor (a collective), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out like ``ref``: sharded the same way when ``ref`` is a DTensor."""
    if not is_sharded(ref):
        return value.to(ref.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements)


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over processes (one flat all-reduce). Sharded (FSDP)
    parameters are skipped: FSDP has already reduce-scattered their gradients."""
    if world() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None and not is_sharded(p)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if world() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world() for k, v in zip(keys, t.tolist())}


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every process if it is true on any (e.g. a stop signal)."""
    if world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def check_consistent(state: dict[str, float], tensors: dict[str, torch.Tensor], step: int) -> None:
    """Compare scalars and tensor checksums across processes; raise on any difference."""
    if world() == 1:
        return
    names = sorted(state) + [f"{k}.sum" for k in sorted(tensors)] + [f"{k}.sumsq" for k in sorted(tensors)]
    vals = [state[k] for k in sorted(state)]
    vals += [float(tensors[k].detach().double().sum()) for k in sorted(tensors)]
    vals += [float((tensors[k].detach().double() ** 2).sum()) for k in sorted(tensors)]
    device = next(iter(tensors.values())).device
    lo = torch.tensor(vals, dtype=torch.float64, device=device)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    bad = [n for n, a, b in zip(names, lo.tolist(), hi.tolist()) if a != b]
    if bad:
        raise RankDesyncError(
            f"processes disagree at step {step} on {', '.join(bad)}",
            expected="identical masks, s, y and z on every rank",
            fix="a bug or a non-deterministic kernel: rerun; report it if it persists",
        )
