"""One-shot, metric-based baselines behind one interface: a score per unit, then the same uniform cut.

Each method maps (model, calibration windows) to importance scores shaped like the masks
(head ``[L, rows, U_h]``, FFN ``[L, 1, U_f]``); the pipeline keeps the highest-scoring units of every
row with the same integer counts as MaskPrune's cut (``cut.plan_cut``), folds nothing and exports
through the same code. Nothing in the export knows which method ran.

- ``magnitude``: L2 norm of every weight a unit owns (q/k/v rows, o_proj columns; gate/up rows,
  down_proj column).
- ``taylor``: LLM-Pruner's default first-order importance (``--taylor param_first``): the per-weight
  salience ``|w * dL/dw|`` summed over every weight the unit owns, with the language-modelling loss on
  the calibration windows.
- ``wanda-sp``: ``sum |W_out[:, unit]| * ||x_unit||_2``: the output projection's input columns
  weighted by the input activation norms (structured Wanda, as FLAP's paper defines it).
- ``flap``: FLAP's fluctuation metric ``sum Var(x_unit) * ||W_out[:, unit]||^2`` over the unit's input
  columns of the output projection. Its bias compensation is :mod:`maskprune.compensate`.

``wanda-sp`` and ``flap`` can also be calibrated layer by layer on the already pruned prefix, as their
reference code does (:mod:`maskprune.sequential`).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ROLES, DecoderAdapter, HeadLayout
from .offload import held
from .structure import Structure

log = logging.getLogger(__name__)

__all__ = [
    "BASELINES",
    "LAYER_SCORERS",
    "unit_scores",
    "activation_stats",
    "input_means",
    "watch_inputs",
    "scoring_statistics",
]


def _head_column_scores(layout: HeadLayout, per_column: torch.Tensor) -> torch.Tensor:
    """Sum per-column scores ``[n_heads * head_dim]`` into unit scores ``[rows, U]``."""
    per_head = per_column.view(layout.num_attention_heads, layout.head_dim).sum(-1)  # [n_heads]
    if layout.unit_is_kv_group:  # MHA: group size 1, the sum below is over one head
        per_unit = per_head.view(layout.num_key_value_heads, layout.group_size).sum(-1)  # [n_kv]
        return per_unit.view(layout.rows, layout.units_per_row)
    return per_head.view(layout.rows, layout.units_per_row)


_WRITES_RESIDUAL = ("o", "down")  # their rows are the residual's channels; the others' columns are


def _weight(adapter: DecoderAdapter, layer: nn.Module, role: str, hidden: torch.Tensor | None) -> torch.Tensor:
    """A projection's weight, restricted to the residual channels ``hidden`` (rows of o / down, columns of the
    others) where a hidden cut is emulated: what the sliced model's weight would be."""
    w = adapter.proj(layer, role).weight
    if hidden is None:
        return w
    hidden = hidden.to(w.device)
    return w[hidden] if role in _WRITES_RESIDUAL else w[:, hidden]


def _row_norm_sq(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Squared norm of the rows of each head of a ``[heads * head_dim, in]`` projection -> ``[heads]``."""
    return (w.float() ** 2).sum(-1).view(heads, head_dim).sum(-1)


@torch.no_grad()
def _magnitude(
    model: nn.Module, adapter: DecoderAdapter, s: Structure, _stats, hidden=None
) -> tuple[torch.Tensor, torch.Tensor]:
    lay = s.head
    heads, ffns = [], []
    for layer in adapter.layers(model):
        with held(layer):
            q, k, v, o = (_weight(adapter, layer, r, hidden) for r in ("q", "k", "v", "o"))
            g, u, d = (_weight(adapter, layer, r, hidden).float() for r in ("gate", "up", "down"))
        per_q = _row_norm_sq(q, lay.num_attention_heads, lay.head_dim) + (o.float() ** 2).sum(0).view(
            lay.num_attention_heads, lay.head_dim
        ).sum(-1)  # [n_heads]
        kv = _row_norm_sq(k, lay.num_key_value_heads, lay.head_dim) + _row_norm_sq(
            v, lay.num_key_value_heads, lay.head_dim
        )
        if lay.unit_is_kv_group:
            unit = per_q.view(lay.num_key_value_heads, lay.group_size).sum(-1) + kv  # [n_kv] (r = 1: per head)
        else:
            unit = per_q
        heads.append(unit.sqrt().view(lay.rows, lay.units_per_row))
        ffns.append(((g**2).sum(1) + (u**2).sum(1) + (d**2).sum(0)).sqrt().view(1, -1))
    return torch.stack(heads), torch.stack(ffns)


@torch.no_grad()
def _taylor(
    model: nn.Module, adapter: DecoderAdapter, s: Structure, stats, hidden=None
) -> tuple[torch.Tensor, torch.Tensor]:
    lay = s.head
    grads = stats["grads"]
    heads, ffns = [], []
    for li, layer in enumerate(adapter.layers(model)):

        def wg(role: str) -> torch.Tensor:
            salience = (adapter.proj(layer, role).weight.float() * grads[(li, role)]).abs()  # per weight
            if hidden is None:
                return salience
            return salience[hidden] if role in _WRITES_RESIDUAL else salience[:, hidden]

        q, k, v, o = wg("q"), wg("k"), wg("v"), wg("o")
        per_q = q.sum(-1).view(lay.num_attention_heads, lay.head_dim).sum(-1) + o.sum(0).view(
            lay.num_attention_heads, lay.head_dim
        ).sum(-1)  # [n_heads]
        kv = k.sum(-1).view(lay.num_key_value_heads, lay.head_dim).sum(-1) + v.sum(-1).view(
            lay.num_key_value_heads, lay.head_dim
        ).sum(-1)
        if lay.unit_is_kv_group:
            unit = per_q.view(lay.num_key_value_heads, lay.group_size).sum(-1) + kv
        else:
            unit = per_q
        heads.append(unit.abs().view(lay.rows, lay.units_per_row))
        g, u, d = wg("gate"), wg("up"), wg("down")
        ffns.append((g.sum(1) + u.sum(1) + d.sum(0)).abs().view(1, -1))
    return torch.stack(heads), torch.stack(ffns)


def _wanda_sp_layer(layer: nn.Module, adapter: DecoderAdapter, s: Structure, stats: dict, li: int, hidden=None):
    """Wanda-sp scores of one layer: head units ``[rows, U_h]`` and FFN channels ``[1, U_f]``."""
    o, d = _weight(adapter, layer, "o", hidden).float(), _weight(adapter, layer, "down", hidden).float()
    o_norm = stats["sumsq"][(li, "o")].sqrt()  # [n_heads * head_dim]
    d_norm = stats["sumsq"][(li, "down")].sqrt()  # [d_ff]
    return _head_column_scores(s.head, o.abs().sum(0) * o_norm), (d.abs().sum(0) * d_norm).view(1, -1)


def _flap_layer(layer: nn.Module, adapter: DecoderAdapter, s: Structure, stats: dict, li: int, hidden=None):
    """FLAP's fluctuation scores of one layer: head units ``[rows, U_h]`` and FFN channels ``[1, U_f]``."""
    o, d = _weight(adapter, layer, "o", hidden).float(), _weight(adapter, layer, "down", hidden).float()
    n = stats["count"] if isinstance(stats["count"], (int, float)) else stats["count"][li]

    def var(role: str) -> torch.Tensor:
        mean = stats["sum"][(li, role)] / n
        return (stats["sumsq"][(li, role)] / n - mean**2).clamp_min(0)

    return _head_column_scores(s.head, var("o") * (o**2).sum(0)), (var("down") * (d**2).sum(0)).view(1, -1)


LAYER_SCORERS = {"wanda-sp": _wanda_sp_layer, "flap": _flap_layer}
"""The activation-based metrics, one layer at a time (what sequential calibration needs)."""


def _by_layer(layer_scorer):
    @torch.no_grad()  # scores, not a graph: a candidate's scores kept a graph of its sliced weights (0.15 GB each)
    def scorer(
        model: nn.Module, adapter: DecoderAdapter, s: Structure, stats, hidden=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layers = adapter.layers(model)
        pairs = []
        for li, layer in enumerate(layers):
            with held(layer):  # a layer whose weights wait on disk is read for its scores
                pairs.append(layer_scorer(layer, adapter, s, stats, li, hidden))
        return torch.stack([h for h, _ in pairs]), torch.stack([f for _, f in pairs])

    return scorer


_wanda_sp, _flap = _by_layer(_wanda_sp_layer), _by_layer(_flap_layer)


_Scorer = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BASELINES: dict[str, tuple[_Scorer, str]] = {
    "magnitude": (_magnitude, "none"),
    "taylor": (_taylor, "grads"),
    "wanda-sp": (_wanda_sp, "activations"),
    "flap": (_flap, "activations"),
}


def watch_inputs(stats: dict, adapter: DecoderAdapter, layer: nn.Module, li: int) -> list:
    """Pre-hooks that add the per-channel sum and sum of squares of this layer's o_proj and down_proj inputs to
    ``stats["sum"][(li, role)]`` / ``stats["sumsq"][(li, role)]``; returns their handles."""

    def hook(key):
        def fn(_m, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # [tokens, width]
            stats["sum"][key] = stats["sum"].get(key, 0) + x.sum(0)
            stats["sumsq"][key] = stats["sumsq"].get(key, 0) + (x**2).sum(0)

        return fn

    return [adapter.proj(layer, r).register_forward_pre_hook(hook((li, r))) for r in ("o", "down")]


def activation_stats(
    model: nn.Module,
    adapter: DecoderAdapter,
    windows: torch.Tensor,
    batch_size: int,
    execution=None,
    after_layer: Callable[[int, nn.Module, dict], None] | None = None,
) -> dict:
    """Per-channel sum and sum of squares of o_proj's and down_proj's inputs over all tokens (``execution``: where
    the pass runs, :class:`maskprune.passes.Execution`; default resident on the model's device).
    ``after_layer(index, layer, stats)``: called once a layer's statistics are complete (``stats["count"]`` set),
    during a streamed layer's turn (its weights still in memory)."""
    from .passes import resident

    stats: dict = {"sum": {}, "sumsq": {}, "count": int(windows.numel())}
    handles = [h for li, layer in enumerate(adapter.layers(model)) for h in watch_inputs(stats, adapter, layer, li)]
    done = None if after_layer is None else (lambda li, layer: after_layer(li, layer, stats))
    try:
        stats["count"] = (execution or resident(model)).forward(model, adapter, windows, batch_size, after_layer=done)
    finally:
        for h in handles:
            h.remove()
    # a layer that did not run (its cut emulated by passing its input through) has none: zeros, as for the gradients
    for li, layer in enumerate(adapter.layers(model)):
        for role in ("o", "down"):
            if (li, role) not in stats["sum"]:
                width = adapter.proj(layer, role).weight.shape[1]
                stats["sum"][(li, role)] = torch.zeros(width)
                stats["sumsq"][(li, role)] = torch.zeros(width)
    return stats


def input_means(stats: dict) -> dict:
    """Mean input of o_proj and down_proj per channel, ``{(layer, role): [width]}``, from :func:`activation_stats`."""
    count = stats["count"]
    return {k: v / (count if isinstance(count, (int, float)) else count[k[0]]) for k, v in stats["sum"].items()}


def _weight_grads(model: nn.Module, adapter: DecoderAdapter, windows: torch.Tensor, batch_size: int) -> dict:
    """Accumulated dL/dW of every projection for the LM loss on ``windows`` (weights frozen after)."""
    device = next(model.parameters()).device
    params = {(li, r): adapter.proj(layer, r).weight for li, layer in enumerate(adapter.layers(model)) for r in ROLES}
    was = {id(p): (p, p.requires_grad) for p in model.parameters()}
    for p in model.parameters():  # only the projection weights get gradients
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        for i in range(0, windows.shape[0], batch_size):
            batch = windows[i : i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            loss.backward()
        # a weight the loss does not reach (a layer whose cut is emulated by passing its input through) has none
        grads = {
            k: p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            for k, p in params.items()
        }
    finally:
        for p, flag in was.values():
            p.grad = None
            p.requires_grad_(flag)
    return {"grads": grads}


def scoring_statistics(
    method: str, model: nn.Module, adapter: DecoderAdapter, windows: torch.Tensor, batch_size: int, execution=None
) -> dict | None:
    """What ``method`` scores units from, measured once on ``windows``: the activation statistics (one pass; wanda-sp,
    flap), the loss's weight gradients (one resident pass with backward; taylor), or None (magnitude: the weights
    alone; no pass runs). ``BASELINES[method][0](model, adapter, structure, stats, hidden)`` then scores any cut of
    the model's hidden channels without another pass."""
    needs = BASELINES[method][1]
    if needs == "activations":
        return activation_stats(model, adapter, windows, batch_size, execution)
    if needs == "grads":
        return _weight_grads(model, adapter, windows, batch_size)
    return None


def unit_scores(
    method: str,
    model: nn.Module,
    adapter: DecoderAdapter,
    structure: Structure,
    windows: torch.Tensor,
    batch_size: int = 4,
    stats: dict | None = None,
    execution=None,
    hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance of every head unit ``[L, rows, U_h]`` and FFN channel ``[L, 1, U_f]`` (higher = keep).

    ``stats``: :func:`activation_stats` of ``windows`` if the caller has them already; ``execution``: where an
    activation pass runs (:class:`maskprune.passes.Execution`; the gradient pass of ``taylor`` is resident);
    ``hidden``: the residual channels a hidden cut keeps, where the model emulates it (the weights' other channels
    do not count, as in the sliced model)."""
    scorer, needs = BASELINES[method]
    if needs == "activations" and stats is None and method in LAYER_SCORERS and execution is not None:
        if execution.streamed:  # each layer scored during its turn: its weights are not read a second time
            scored: dict = {}

            def score(li, layer, live):
                scored[li] = LAYER_SCORERS[method](layer, adapter, structure, live, li, hidden)

            activation_stats(model, adapter, windows, batch_size, execution, after_layer=score)
            pairs = [scored[li] for li in range(len(adapter.layers(model)))]
            return torch.stack([h for h, _ in pairs]), torch.stack([f for _, f in pairs])
    if needs == "activations":
        stats = stats if stats is not None else activation_stats(model, adapter, windows, batch_size, execution)
    elif needs == "grads":
        stats = _weight_grads(model, adapter, windows, batch_size)
    else:
        stats = {}
    return scorer(model, adapter, structure, stats, hidden)
