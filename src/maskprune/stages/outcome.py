"""What both ways of choosing the units share: their result (:class:`Outcome`), the measured head/FFN
split, and the fp32 model the cut and the export work on."""

from __future__ import annotations

import dataclasses
import logging

import torch

from .. import distributed as D
from ..compensate import Parts
from ..config import PruneConfig
from ..cut import CutPlan, KeptUnits, candidate_splits
from ..dtypes import DTYPES, autocast_dtype
from ..errors import MaskPruneError
from ..learner import attach_lora
from ..masks import MaskSet
from ..models import load_model
from ..split import SplitResult, search_split
from ..structure import Structure

__all__ = ["score_summary", "Outcome", "measure_split", "rebuild_for_export", "weight_dtype", "on_disk"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Outcome:
    """What choosing the units produced, learned or one-shot: the model with its masks, the plan, the kept
    units, and the evidence the report carries (the split search, the bias compensation)."""

    model: torch.nn.Module
    masks: MaskSet
    state: object | None  # LearnState for the learned method, None for a one-shot baseline
    plan: CutPlan
    kept: KeptUnits
    split: dict | None = None
    compensation: Parts = Parts(False, False)
    means: dict | None = None  # mean inputs of o / down (bias compensation)
    extra_params: int = 0  # parameters the compensating biases add
    calibration: str | None = None  # one-shot baselines: "one-pass" or "layerwise" scoring
    scores: dict | None = None  # the one-shot scores that chose the units, summarised (score_summary)
    shape: object | None = None  # the shape search's ShapeChoice (prune_axes hidden / layers), else None
    reference: torch.nn.Module | None = None  # the uncut model in fp32 (--reconstruct-target dense), until the fit


def measure_split(
    cfg: PruneConfig, model, masks: MaskSet, structure: Structure, scores, windows, budget: int, device
) -> SplitResult:
    """The head/FFN split with the lowest KL after cutting by ``scores`` (see :mod:`maskprune.split`)."""
    candidates = candidate_splits(structure, budget, head_multiple=cfg.head_multiple, ffn_multiple=cfg.ffn_multiple)
    result = search_split(
        model,
        masks,
        scores[0],
        scores[1],
        candidates,
        windows[: cfg.split_search_samples],
        batch_size=cfg.batch_size,
        direction=cfg.kl_direction,
        autocast_dtype=autocast_dtype(cfg.dtype, device),
    )
    log.info(
        "split search: %s -> %d head units and %d FFN channels cut per row",
        ", ".join(f"{p.k_head}/{p.k_ffn}: KL {v:.4f}" for p, v in zip(result.candidates, result.losses)),
        result.best.k_head,
        result.best.k_ffn,
    )
    return result


def rebuild_for_export(
    cfg: PruneConfig,
    model,
    adapter,
    structure: Structure,
    masks: MaskSet,
    device: torch.device,
    main: bool,
    reshape=None,
):
    """A fresh fp32 model for the cut and the export: base weights reloaded from the source in fp32, the
    learned LoRA (gathered whole when FSDP sharded it; every process takes part) and masks attached.

    Used when learning ran on half-precision or sharded weights: merging LoRA into bf16 weights rounds
    away most of its update (a LoRA delta is far below a bf16 weight's ulp) and SmolLM2's activation
    outliers turned that into logit errors of 5 on 36 (measured), so merge, fold and the parity check
    happen in fp32 and only the finished model is cast to ``export_dtype``. Sharded runs rebuild in host
    memory (the model needed sharding); others on ``device``. Other ranks get ``(None, masks)``. ``reshape``:
    called on the fresh model before anything is attached (the shape search's cut, repeated in fp32)."""
    lora = {n: D.full(p.detach()).float().cpu() for n, p in model.named_parameters() if "lora_" in n}
    if not main:
        return None, masks
    learned = {k: p.detach().float().cpu().clone() for k, p in masks.by_kind().items()}
    masks.detach()
    sharded = any(D.is_sharded(p) for p in model.parameters())
    del model
    where = torch.device("cpu") if sharded else device
    fresh = load_model(
        cfg.model,
        gguf_file=cfg.gguf_file,
        trust_remote_code=cfg.trust_remote_code,
        device=where,
        dtype=torch.float32,
        offload=on_disk(cfg),
    ).model
    adapter.unfuse_(fresh)
    if reshape is not None:
        reshape(fresh)
    if lora:
        fresh = attach_lora(fresh, adapter, cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    params = dict(fresh.named_parameters())
    if set(lora) != {n for n in params if "lora_" in n}:
        raise MaskPruneError("internal error: the gathered LoRA weights do not match the rebuilt model")
    with torch.no_grad():
        for n, t in lora.items():
            params[n].copy_(t)
    rebuilt = MaskSet(structure).to(where)
    with torch.no_grad():
        for kind, p in rebuilt.by_kind().items():
            p.copy_(learned[kind])
    fresh.eval()
    return fresh, rebuilt.attach(fresh)


def on_disk(cfg: PruneConfig) -> bool:
    """Whether the model's weights wait on disk between their turns (:mod:`maskprune.offload`): a streamed one-shot
    cut (``--streaming on``, or ``auto`` where the plan says the model does not fit whole). Learning, distillation
    and Taylor's gradients hold the weights they train or differentiate."""
    return cfg.streaming == "on" and cfg.method not in ("maskprune", "taylor") and not cfg.has_teacher


def weight_dtype(cfg: PruneConfig) -> torch.dtype:
    """Dtype of the frozen base weights while learning: ``auto`` is the autocast dtype (bf16 by default, on
    CPU and GPU alike: no per-forward cast of every frozen weight, half the memory; the export reloads the
    source in fp32 for the merge and the fold, see :func:`rebuild_for_export`), fp32 when autocast is off."""
    if cfg.weight_dtype != "auto":
        return DTYPES[cfg.weight_dtype]
    if cfg.full:  # every weight is trained: fp32 master weights
        return torch.float32
    return autocast_dtype(cfg.dtype) or torch.float32


def score_summary(metric: str, scores: tuple[torch.Tensor, torch.Tensor], kept: KeptUnits) -> dict:
    """The report's account of the one-shot scores that chose the units: per layer and kind, the quantiles
    (5, 25, 50, 75, 95 %) of the scores over the layer's units and the highest cut and lowest kept score, all
    divided by the layer's median (scales differ between layers and metrics; the order within a layer is what
    the cut uses)."""
    out: dict = {"metric": metric, "quantiles": [0.05, 0.25, 0.5, 0.75, 0.95]}
    for kind, score, keep in (("head", scores[0], kept.head), ("ffn", scores[1], kept.ffn)):
        score = score.detach().float().cpu()  # [L, rows, U]; FFN has one row
        kept_mask = torch.zeros_like(score, dtype=torch.bool).scatter_(2, keep.cpu(), True).flatten(1)
        flat = score.flatten(1)  # [L, rows * U]
        norm = flat / flat.median(dim=1, keepdim=True).values.clamp_min(1e-30)
        q = torch.quantile(norm, torch.tensor(out["quantiles"]), dim=1).T  # [L, 5]
        cut_max = torch.where(kept_mask, float("-inf"), norm).max(dim=1).values
        kept_min = torch.where(kept_mask, norm, float("inf")).min(dim=1).values
        out[kind] = {
            "per_layer": q.tolist(),
            "highest_cut": [v if v != float("-inf") else None for v in cut_max.tolist()],
            "lowest_kept": kept_min.tolist(),
        }
    return out
