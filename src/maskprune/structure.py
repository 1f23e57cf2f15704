"""What can be pruned in a model and what it costs: the unit layouts of every kind and the parameter
accounting (dense size, size after a cut, the resource weights of the sigma step)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .arch import DecoderAdapter, FFNLayout, GQAPolicy, HeadLayout, count_parameters
from .surgery import config_accepts

__all__ = ["Structure"]


@dataclass(frozen=True)
class Structure:
    """What can be pruned in a model and what it costs: the layouts and the dense size."""

    adapter: DecoderAdapter
    head: HeadLayout
    ffn: FFNLayout
    num_layers: int
    dense_params: int
    head_cuts: tuple[int, ...] | None = None
    """Head units per row the cut may remove (None: any): those whose head count the family's config accepts
    with this hidden size (Llama's and Gemma's configs refuse a hidden size that is not a multiple of the heads)."""

    @classmethod
    def of(cls, model: nn.Module, adapter: DecoderAdapter, policy: GQAPolicy) -> "Structure":
        layers = adapter.layers(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        dense = count_parameters(base) - _lora_parameters(base)
        head = adapter.head_layout(base, policy)
        return cls(adapter, head, adapter.ffn_layout(base), len(layers), dense, _head_cuts(base.config, head))

    def head_cut_allowed(self, k: int) -> bool:
        return self.head_cuts is None or k in self.head_cuts

    @property
    def prunable_params(self) -> int:
        return self.num_layers * (
            self.head.units * self.head.params_per_unit + self.ffn.units * self.ffn.params_per_unit
        )

    def params_after(self, k_head: float, k_ffn: float) -> float:
        """Model size with ``k_*`` units cut per row in every layer (floats allowed: M(s))."""
        removed = self.num_layers * (
            self.head.rows * k_head * self.head.params_per_unit + self.ffn.rows * k_ffn * self.ffn.params_per_unit
        )
        return self.dense_params - removed

    def resource_weight(self, kind: str, mode: str) -> float:
        """Weight ``c`` of the resource term in the ``sigma`` step of one kind (see ``optim``).

        ``share``: the share of the dense size that this kind's prunable units hold
        (``-dM/dsigma / M``), so a kind that holds more of the model shrinks faster;
        ``unit``: one unit's parameters over the mean of all prunable units (the paper's
        per-parameter gradient, which cuts big units, heads, first); ``flat``: 1 for every kind
        (kinds compete on mask values alone).
        """
        lay = self.head if kind == "head" else self.ffn
        if mode == "share":
            return self.num_layers * lay.units * lay.params_per_unit / self.dense_params
        if mode == "unit":
            mean = self.prunable_params / (self.num_layers * (self.head.units + self.ffn.units))
            return lay.params_per_unit / mean
        if mode == "flat":
            return 1.0
        raise ValueError(f"unknown resource weighting {mode!r}")

    def min_params(self) -> int:
        """Smallest size the uniform cut can reach (one unit left per row of every kind)."""
        return int(self.params_after(self.head.units_per_row - 1, self.ffn.units_per_row - 1))


def _head_cuts(config, head: HeadLayout) -> tuple[int, ...] | None:
    """The cuts per row whose head counts the config accepts (None when it accepts every one)."""
    ok = []
    for k in range(head.units_per_row):
        n_heads, n_kv = head.heads_after(k)
        if config_accepts(config, num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head.head_dim):
            ok.append(k)
    return None if len(ok) == head.units_per_row else tuple(ok)


def _lora_parameters(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
