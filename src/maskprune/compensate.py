"""FLAP's bias compensation (An et al., 2024): what the cut units contributed on average becomes a bias.

A cut FFN channel ``j`` fed ``x_j * W_down[:, j]`` into the residual stream; its mean over the calibration
tokens, ``mean(x_j) * W_down[:, j]``, is a constant vector that the cut would otherwise lose. Summed over the
cut channels of a layer it becomes down_proj's bias; the same for the cut heads' columns of o_proj. The
stock Llama config holds such biases only through ``mlp_bias`` / ``attention_bias``, which also give
gate/up (q/k/v) biases: those are zero, and every one of them counts in the parameter budget.

Pure functions (:func:`bias_delta`, :func:`extra_params`) plus one in-place step on the exported model
(:func:`add_biases_`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import DecoderAdapter, HeadLayout
from .cut import CutPlan
from .errors import MaskPruneError
from .structure import Structure

__all__ = ["Parts", "compensation_parts", "bias_delta", "extra_params", "layer_delta", "layer_deltas", "add_biases_"]


@dataclass(frozen=True)
class Parts:
    """Which projections get a compensating bias: o_proj (cut heads) and/or down_proj (cut channels)."""

    attn: bool
    mlp: bool

    def __bool__(self) -> bool:
        return self.attn or self.mlp


def compensation_parts(mode: str, method: str, adapter: DecoderAdapter, plan: CutPlan) -> Parts:
    """The parts to compensate for ``bias_compensation`` ``mode`` (auto, on, off) and the planned cut.

    ``auto``: FLAP only, the parts the architecture's stock config can hold. ``on``: any one-shot method;
    an error if a part with cut units cannot be held. A part with nothing cut is never compensated."""
    if mode == "off" or (mode == "auto" and method != "flap") or method == "maskprune":
        return Parts(False, False)
    want = Parts(attn=plan.k_head > 0, mlp=plan.k_ffn > 0)
    can = Parts(attn=adapter.attn_bias_flag is not None, mlp=adapter.mlp_bias_flag is not None)
    if mode == "on" and ((want.attn and not can.attn) or (want.mlp and not can.mlp)):
        part = "o_proj" if want.attn and not can.attn else "down_proj"
        raise MaskPruneError(
            f"bias compensation: the stock {adapter.model_type} architecture has no {part} bias to hold it",
            fix="use --bias-compensation auto (compensates what the architecture can hold) or off",
        )
    return Parts(attn=want.attn and can.attn, mlp=want.mlp and can.mlp)


def bias_delta(weight: torch.Tensor, mean_in: torch.Tensor, kept_cols: torch.Tensor) -> torch.Tensor:
    """``W[:, cut] @ mean_in[cut]``: the mean output of the input columns not in ``kept_cols``.

    weight ``[out, in]``, mean_in ``[in]``, kept_cols ``[in']`` (long); returns ``[out]`` (fp32)."""
    cut = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    cut[kept_cols.to(weight.device)] = False
    return weight.float()[:, cut] @ mean_in.float().to(weight.device)[cut]


def _kept_head_counts(layout: HeadLayout, k_head: int) -> tuple[int, int]:
    """Query and KV heads per layer after cutting ``k_head`` units of every row."""
    kept = torch.arange(k_head, layout.units_per_row).expand(layout.rows, -1)
    q, kv = layout.kept_heads(kept)
    return len(q), len(kv)


def extra_params(structure: Structure, config, adapter: DecoderAdapter, parts: Parts, plan: CutPlan) -> int:
    """Parameters the compensating biases add to the plan's model (biases the dense model lacked)."""
    s, extra = structure, 0
    hidden = adapter.shape(config)["hidden_size"]
    if parts.mlp and not adapter.has_bias(config, "mlp"):
        extra += s.num_layers * (2 * (s.ffn.units_per_row - plan.k_ffn) + hidden)
    if parts.attn and not adapter.has_bias(config, "attn"):
        n_q, n_kv = _kept_head_counts(s.head, plan.k_head)
        extra += s.num_layers * ((n_q + 2 * n_kv) * s.head.head_dim + hidden)
    return extra


def layer_delta(
    layer: nn.Module, adapter: DecoderAdapter, layout: HeadLayout, means: dict, kept_head, kept_ffn, parts: Parts
) -> dict[str, torch.Tensor]:
    """The biases to add to one dense layer's o_proj (``"o"``) and down_proj (``"down"``) for the units it loses:
    ``means`` the mean input of ``"o"`` / ``"down"``; kept units ``[rows, U_h - k]`` and ``[1, U_f - k]``."""
    d: dict[str, torch.Tensor] = {}
    if parts.mlp:
        d["down"] = bias_delta(adapter.proj(layer, "down").weight, means["down"], kept_ffn[0])
    if parts.attn:
        q_keep, _ = layout.kept_heads(kept_head)
        d["o"] = bias_delta(adapter.proj(layer, "o").weight, means["o"], layout.columns(q_keep))
    return d


@torch.no_grad()
def layer_deltas(
    model: nn.Module, adapter: DecoderAdapter, layout: HeadLayout, means: dict, kept, parts: Parts
) -> list[dict[str, torch.Tensor]]:
    """:func:`layer_delta` of every layer of the dense ``model``; ``means[(layer, role)]`` the mean inputs."""
    return [
        layer_delta(
            layer, adapter, layout, {r: means.get((li, r)) for r in ("o", "down")}, kept.head[li], kept.ffn[li], parts
        )
        for li, layer in enumerate(adapter.layers(model))
    ]


def _with_bias(old: nn.Linear, add: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device, dtype=old.weight.dtype)
    new.weight.data.copy_(old.weight.data)
    bias = old.bias.data.float() if old.bias is not None else torch.zeros(old.out_features, device=old.weight.device)
    if add is not None:
        bias = bias + add.to(bias.device)
    new.bias.data.copy_(bias.to(old.weight.dtype))
    new.requires_grad_(old.weight.requires_grad)
    return new


@torch.no_grad()
def add_biases_(model: nn.Module, adapter: DecoderAdapter, deltas: list[dict[str, torch.Tensor]], parts: Parts) -> None:
    """On the sliced stock model: add the deltas to o_proj / down_proj biases and give the other
    projections of a compensated block zero biases, then set the config flag so a plain
    ``from_pretrained`` builds the same modules."""
    for layer, d in zip(adapter.layers(model), deltas):
        if parts.attn:
            attn = adapter.attn(layer)
            for role, name in (
                ("q", adapter.q_name),
                ("k", adapter.k_name),
                ("v", adapter.v_name),
                ("o", adapter.o_name),
            ):
                setattr(attn, name, _with_bias(adapter.proj(layer, role), d.get(role)))
        if parts.mlp:
            mlp = adapter.mlp(layer)
            for role, name in (("gate", adapter.gate_name), ("up", adapter.up_name), ("down", adapter.down_name)):
                setattr(mlp, name, _with_bias(adapter.proj(layer, role), d.get(role)))
    adapter.set_bias_(model.config, attn=parts.attn, mlp=parts.mlp)
