"""Mask state, the hooks that apply it, the teacher bypass, and parameter accounting.

Masks scale a unit's *output*: a head's mask multiplies its slice of o_proj's input (the
concatenated head outputs), an FFN channel's mask multiplies its entry of down_proj's input
(``act(gate(x)) * up(x)``). Both are forward pre-hooks on the *outer* module, i.e. on peft's LoRA
wrapper when LoRA is attached, so base and LoRA paths are masked together.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .arch import HeadLayout
from .structure import Structure

__all__ = [
    "MaskSet",
    "bypass",
    "MASK_TYPES",
    "hard_concrete_mean",
    "hard_concrete_sample",
    "polarized",
    "POLARIZATION_EPS",
]

MASK_TYPES = ("uniform", "l0", "polarization")

# Hard-concrete constants of Louizos et al. (2018), as CoFi and NutePrune use them.
L0_BETA, L0_GAMMA, L0_ZETA = 2.0 / 3.0, -0.1, 1.1
POLARIZATION_EPS = (1e-2, 1e-5)  # eps falls geometrically from the first to the second over the run
L0_INIT = 3.0  # log alpha at start: the deterministic gate is 1 (clip(sigmoid(3) * 1.2 - 0.1) = 1.0)


def hard_concrete_mean(log_alpha: torch.Tensor) -> torch.Tensor:
    """Deterministic hard-concrete gate (the test-time mask): ``clip(sigmoid(la) (zeta - gamma) + gamma, 0, 1)``."""
    return (torch.sigmoid(log_alpha) * (L0_ZETA - L0_GAMMA) + L0_GAMMA).clamp(0.0, 1.0)


def hard_concrete_sample(log_alpha: torch.Tensor) -> torch.Tensor:
    """One reparameterised sample of the hard-concrete gate (differentiable in ``log_alpha``)."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1.0 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / L0_BETA)
    return (s * (L0_ZETA - L0_GAMMA) + L0_GAMMA).clamp(0.0, 1.0)


def polarized(theta: torch.Tensor, eps: float) -> torch.Tensor:
    """GDP's polarising gate (Guo et al. 2021): ``theta^2 / (theta^2 + eps)``, in [0, 1), monotone in
    ``|theta|``; as ``eps`` falls toward 0 every non-zero gate tends to 1, so gates end near 0 or 1."""
    t2 = theta * theta
    return t2 / (t2 + eps)


class MaskSet(nn.Module):
    """Masks for every layer: ``head`` ``[L, rows, U_head]`` and ``ffn`` ``[L, 1, U_ffn]``, fp32.

    ``mask_type`` says what the parameters are and how a mask value is made from them:

    - ``uniform`` (MaskPrune): the parameter *is* the mask, in [0, 1], init 1.
    - ``l0``: hard-concrete log-alphas (Louizos et al.); training forwards sample a gate, the
      deterministic gate :func:`hard_concrete_mean` is the mask value everywhere else.
    - ``polarization``: GDP gates ``theta^2 / (theta^2 + eps)`` with ``theta`` in [0, 1], init 1, and
      ``eps`` lowered by the learner over the run (:attr:`eps`).

    :meth:`values` gives the mask values of a kind; :meth:`materialize_` turns any type into
    ``uniform`` holding those values, so the cut and the export only ever see values in [0, 1].
    """

    def __init__(self, structure: Structure, mask_type: str = "uniform") -> None:
        super().__init__()
        if mask_type not in MASK_TYPES:
            raise ValueError(f"unknown mask type {mask_type!r}; expected one of {MASK_TYPES}")
        s = structure
        self.structure = s
        self.mask_type = mask_type
        init = L0_INIT if mask_type == "l0" else 1.0
        self.head = nn.Parameter(torch.full((s.num_layers, s.head.rows, s.head.units_per_row), init))
        self.ffn = nn.Parameter(torch.full((s.num_layers, s.ffn.rows, s.ffn.units_per_row), init))
        self.eps = 1e-2
        """Polarization temperature (the learner anneals it)."""
        self.enabled = True
        self._handles: list[RemovableHandle] = []
        self.train(False)  # stochastic L0 gates only while the learner runs (it calls .train())

    def by_kind(self) -> dict[str, nn.Parameter]:
        """The raw parameters per kind (the masks themselves for ``uniform``)."""
        return {"head": self.head, "ffn": self.ffn}

    def gate(self, theta: torch.Tensor, *, sample: bool = False) -> torch.Tensor:
        """Mask values from parameters ``theta`` (any slice); ``sample``: a stochastic L0 gate."""
        if self.mask_type == "uniform":
            return theta
        if self.mask_type == "l0":
            return hard_concrete_sample(theta) if sample else hard_concrete_mean(theta)
        return polarized(theta, self.eps)

    def values(self, kind: str) -> torch.Tensor:
        """Deterministic mask values of one kind, ``[L, rows, U]`` (differentiable)."""
        return self.gate(self.by_kind()[kind])

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep parameters in their domain: [0, 1] for uniform and polarization, [-10, 10] for L0."""
        lo, hi = (-10.0, 10.0) if self.mask_type == "l0" else (0.0, 1.0)
        for p in self.by_kind().values():
            p.clamp_(lo, hi)

    @torch.no_grad()
    def set_values_(self, kind: str, values: torch.Tensor) -> None:
        """Set the parameters of one kind so that its deterministic mask values are ``values`` (in [0, 1])."""
        v = values.to(self.by_kind()[kind].device, torch.float32).clamp(0.0, 1.0)
        if self.mask_type == "l0":  # invert hard_concrete_mean (values at 1 map to the start value)
            u = ((v - L0_GAMMA) / (L0_ZETA - L0_GAMMA)).clamp(1e-6, 1 - 1e-6)
            v = torch.minimum(torch.log(u) - torch.log1p(-u), torch.full_like(v, L0_INIT))
        elif self.mask_type == "polarization":  # invert theta^2 / (theta^2 + eps), theta <= 1
            v = torch.where(v >= 1.0, torch.ones_like(v), (v * self.eps / (1.0 - v).clamp_min(1e-12)).sqrt())
        self.by_kind()[kind].copy_(v)

    @torch.no_grad()
    def materialize_(self) -> None:
        """Replace the parameters by their deterministic mask values and become ``uniform``."""
        if self.mask_type == "uniform":
            return
        for kind, p in self.by_kind().items():
            p.copy_(self.values(kind))
        self.mask_type = "uniform"

    # ---- hooks -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "MaskSet":
        """Register the pre-hooks on every layer's o_proj and down_proj (outermost module)."""
        self.detach()
        adapter, head = self.structure.adapter, self.structure.head
        for idx, layer in enumerate(adapter.layers(model)):
            self._handles.append(adapter.head_mask_site(layer).register_forward_pre_hook(self._head_hook(idx, head)))
            self._handles.append(adapter.ffn_mask_site(layer).register_forward_pre_hook(self._ffn_hook(idx)))
            for name, role in adapter.width_norms:
                norm = adapter.width_norm(layer, name)
                self._handles.append(norm.register_forward_hook(self._width_norm_hook(idx, head, role)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _head_hook(self, idx: int, layout: HeadLayout):
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            if not self.enabled:
                return None
            x = args[0]  # [B, T, n_heads * head_dim]
            m = layout.query_head_mask(self.gate(self.head[idx], sample=self.training)).to(x.dtype)  # [n_heads]
            x = (
                x.unflatten(-1, (layout.num_attention_heads, layout.head_dim))  # [B,T,H,D]
                * m[:, None]
            ).flatten(-2)  # [B, T, H*D]
            return (x, *args[1:])

        return hook

    def _width_norm_hook(self, idx: int, layout: HeadLayout, role: str):
        """A norm over the whole q (k) width computed over the columns of the heads still there (mask != 0):
        what the sliced model's norm computes. While every head is there it is the stock norm, untouched."""
        adapter = self.structure.adapter

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled:
                return None
            with torch.no_grad():
                alive = layout.query_head_mask(self.gate(self.head[idx], sample=False)) != 0  # [n_heads]
                if role != "q":  # a KV head is there while any query head of its group is
                    alive = alive.view(layout.num_key_value_heads, -1).any(-1)
                if bool(alive.all()):
                    return None
                keep = alive.repeat_interleave(layout.head_dim)
            return adapter.kept_width_norm(module, args[0], keep)

        return hook

    def _ffn_hook(self, idx: int):
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            if not self.enabled:
                return None
            x = args[0]  # [B, T, d_ff]
            return (x * self.gate(self.ffn[idx, 0], sample=self.training).to(x.dtype), *args[1:])

        return hook


@contextlib.contextmanager
def bypass(model: nn.Module, masks: MaskSet | None) -> Iterator[None]:
    """The teacher: the same module with masks off and LoRA adapters disabled (no second copy)."""
    was = masks.enabled if masks is not None else True
    lora_ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        if masks is not None:
            masks.enabled = False
        with lora_ctx:
            yield
    finally:
        if masks is not None:
            masks.enabled = was
