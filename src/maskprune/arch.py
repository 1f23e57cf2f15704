"""Architecture adapters: the only place Hugging Face attribute names appear.

An adapter tells the rest of maskprune where a decoder's layers, attention and FFN projections are,
and :class:`UnitLayout` declares, once, which rows and columns move together when a unit is cut.
Masks, hooks, parameter accounting and the export all read the same layout.

Units (see docs/method.md, "Units and sizes"). A mask of one kind in one layer has shape
``[rows, units_per_row]``; the sparsity ``s`` counts units cut *per row*, so every row of every
layer keeps the same number of units:

* FFN: one row of ``intermediate_size`` channels; a channel is a gate/up row and a down column.
* MHA (``num_key_value_heads == num_attention_heads``): one row of heads; a head is its q, k, v rows
  and its o_proj columns (both GQA policies reduce to this).
* GQA, ``query`` policy: ``num_key_value_heads`` rows of ``r`` query heads each; a unit is one query
  head (q rows, o_proj columns). Every KV group keeps the same number of query heads.
* GQA, ``kv_group`` policy: one row of ``num_key_value_heads`` groups; a unit is a KV group with its
  k, v rows, its ``r`` query heads and their o_proj columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from .errors import UnsupportedModelError

__all__ = [
    "GQAPolicy",
    "UnitLayout",
    "HeadLayout",
    "FFNLayout",
    "DecoderAdapter",
    "get_adapter",
    "SUPPORTED_MODEL_TYPES",
    "count_parameters",
]

GQAPolicy = Literal["query", "kv_group"]


@dataclass(frozen=True)
class UnitLayout:
    """Shape of one kind of mask in one layer and what one unit costs in parameters."""

    kind: str
    rows: int
    units_per_row: int
    params_per_unit: int

    @property
    def units(self) -> int:
        return self.rows * self.units_per_row


@dataclass(frozen=True)
class HeadLayout(UnitLayout):
    """Attention units: how a ``[rows, units_per_row]`` mask maps onto query and KV heads."""

    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    policy: str = "query"

    @property
    def group_size(self) -> int:
        """Query heads per KV head (``r``)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def unit_is_kv_group(self) -> bool:
        """True where a unit owns whole KV heads (MHA, or GQA under ``kv_group``)."""
        return self.group_size == 1 or self.policy == "kv_group"

    def heads_after(self, k: int) -> tuple[int, int]:
        """``(num_attention_heads, num_key_value_heads)`` of a layer with ``k`` units cut in every row."""
        if self.unit_is_kv_group:  # one row of whole KV groups (MHA: one head each)
            kv = self.units_per_row - k
            return kv * self.group_size, kv
        return self.rows * (self.units_per_row - k), self.num_key_value_heads

    def query_head_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Expand a unit mask ``[..., rows, units_per_row]`` to ``[..., num_attention_heads]``.

        Query head ``h`` belongs to KV head ``h // r`` (transformers' ``repeat_kv`` order).
        """
        flat = mask.reshape(*mask.shape[:-2], self.units)  # [..., rows * units_per_row]
        if self.group_size > 1 and self.policy == "kv_group":
            return flat.repeat_interleave(self.group_size, dim=-1)  # [..., n_kv * r]
        return flat

    def columns(self, heads: list[int], device: torch.device | None = None) -> torch.Tensor:
        """Indices of whole heads' rows (q/k/v) or columns (o_proj) in a ``[heads * head_dim]`` axis."""
        d = self.head_dim
        return torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long, device=device)

    def kept_heads(self, kept_units: torch.Tensor) -> tuple[list[int], list[int]]:
        """Query and KV head indices kept, given kept unit indices ``[rows, k]`` (sorted).

        Returns ``(query_heads, kv_heads)`` in ascending order, so grouped order is preserved.
        """
        r = self.group_size
        if self.group_size == 1:
            heads = sorted(int(u) for u in kept_units.reshape(-1))
            return heads, heads
        if self.policy == "kv_group":
            groups = sorted(int(u) for u in kept_units.reshape(-1))
            return [g * r + i for g in groups for i in range(r)], groups
        query = sorted(int(g * r + u) for g in range(self.rows) for u in kept_units[g])
        return query, list(range(self.num_key_value_heads))


@dataclass(frozen=True)
class FFNLayout(UnitLayout):
    """FFN channels: one row of ``intermediate_size`` units."""


def _linear_params(module: nn.Module, rows: int) -> int:
    """Weights plus bias entries that ``rows`` output rows of a linear layer own."""
    weight = module.weight
    per_row = weight.shape[1]
    bias = getattr(module, "bias", None)
    return rows * (per_row + (1 if bias is not None else 0))


def count_parameters(model: nn.Module) -> int:
    """Every parameter once; a tied embedding and LM head count once."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class DecoderAdapter:
    """Llama-style decoder: separate q/k/v/o projections and a gated FFN (gate, up, down).

    Attribute names are parameters so that a family with other names gets its own instance in
    the registry rather than a fork of the code.
    """

    model_type: str
    layers_path: str = "model.layers"
    attn_name: str = "self_attn"
    mlp_name: str = "mlp"
    q_name: str = "q_proj"
    k_name: str = "k_proj"
    v_name: str = "v_proj"
    o_name: str = "o_proj"
    gate_name: str = "gate_proj"
    up_name: str = "up_proj"
    down_name: str = "down_proj"
    attn_bias_flag: str | None = None
    """Config key that gives q/k/v/o biases in the stock model (``attention_bias``), or None if the stock
    architecture cannot carry an o_proj bias (then no bias compensation for heads)."""
    mlp_bias_flag: str | None = None
    """Config key that gives gate/up/down biases in the stock model (``mlp_bias``), or None."""
    fused: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    """Fused projections of the stock model, as (owner ``attn``/``mlp``, fused name, part roles): Phi-3's
    ``qkv_proj`` = q, k, v rows and ``gate_up_proj`` = gate, up rows. :meth:`unfuse_` splits them into the
    parts' own modules for the run (masks, LoRA, scores, slicing see a Llama layer); :meth:`fuse_` joins
    the sliced parts again before the stock checkpoint is written."""
    width_norms: tuple[tuple[str, str], ...] = ()
    """RMSNorms over a projection's whole output width (OLMo-2's ``q_norm`` over q, ``k_norm`` over k), as
    (attention attribute, role). Cutting a head changes the statistic the kept heads are normalized by, so the
    masked model computes these norms over the kept heads' columns alone (:meth:`kept_width_norm`) and the
    export slices their weights with the heads: the sliced stock model then computes exactly the same."""
    norm_offset: float = 0.0
    """The norms' weight offset: Gemma's RMSNorm scales by ``1 + weight``, the others by ``weight``. A hidden cut
    folds a scale into a norm (see :mod:`maskprune.surgery`) and needs to know which."""

    # ---- navigation -------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a causal LM (unwraps a peft model)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        obj: object = base
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        assert isinstance(obj, nn.ModuleList)
        return obj

    def attn(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn_name)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_name)

    def module_name(self, role: str) -> str:
        """The attribute name of a projection role (one of :data:`ROLES`) in this family."""
        return getattr(self, f"{role}_name")

    def proj(self, layer: nn.Module, name: str) -> nn.Module:
        """A projection by role: one of q, k, v, o, gate, up, down."""
        owner = self.mlp(layer) if name in ("gate", "up", "down") else self.attn(layer)
        return getattr(owner, getattr(self, f"{name}_name"))

    def head_mask_site(self, layer: nn.Module) -> nn.Module:
        """Module whose *input* is the concatenated per-head attention output (o_proj)."""
        return self.proj(layer, "o")

    def ffn_mask_site(self, layer: nn.Module) -> nn.Module:
        """Module whose *input* is the FFN's intermediate activation (down_proj)."""
        return self.proj(layer, "down")

    # ---- the residual stream (hidden width) --------------------------------------------------
    @staticmethod
    def _top(model: nn.Module) -> nn.Module:
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def base(self, model: nn.Module) -> nn.Module:
        """The decoder under the LM head (``model.model``), unwrapping a peft model."""
        obj: object = self._top(model)
        for part in self.layers_path.split(".")[:-1]:
            obj = getattr(obj, part)
        return obj

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return self._top(model).get_input_embeddings()

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return self._top(model).get_output_embeddings()

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.base(model).norm

    def residual_norms(self, layer: nn.Module, hidden: int) -> list[tuple[str, nn.Module]]:
        """The norms of a decoder layer over the residual width (``input_layernorm``, ``post_attention_layernorm``,
        Gemma's ``pre_/post_feedforward_layernorm``, ...): its direct children named ``*norm*`` with a weight of
        ``hidden`` entries. Norms inside attention (q/k norms) are over head widths and are not among them."""
        return [
            (name, mod)
            for name, mod in layer.named_children()
            if "norm" in name.lower() and getattr(mod, "weight", None) is not None and mod.weight.shape == (hidden,)
        ]

    # ---- fused projections (Phi-3) ----------------------------------------------------------
    def unfuse_(self, model: nn.Module) -> nn.Module:
        """Split every fused projection into its parts (in place; a no-op for unfused families). The
        fused module is replaced by a :class:`Concat` of the parts, so the stock forward is unchanged."""
        if not self.fused:
            return model
        shape = self.shape(model.config)
        for layer in self.layers(model):
            for owner_name, fused_name, roles in self.fused:
                owner = self.attn(layer) if owner_name == "attn" else self.mlp(layer)
                fused = getattr(owner, fused_name)
                if isinstance(fused, Concat):
                    continue
                sizes = [self._part_rows(shape, r) for r in roles]
                if sum(sizes) != fused.weight.shape[0]:
                    raise UnsupportedModelError(
                        f"{fused_name} has {fused.weight.shape[0]} rows, the config's shape gives {sum(sizes)}",
                        expected=f"rows of {', '.join(roles)} = {sizes}",
                    )
                ws = fused.weight.detach().split(sizes, dim=0)
                bs = fused.bias.detach().split(sizes, dim=0) if fused.bias is not None else [None] * len(roles)
                for role, w, b in zip(roles, ws, bs):
                    part = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
                    with torch.no_grad():
                        part.weight.copy_(w)
                        if b is not None:
                            part.bias.copy_(b)
                    part.weight.requires_grad_(fused.weight.requires_grad)
                    setattr(owner, self.module_name(role), part)
                setattr(owner, fused_name, Concat(owner, [self.module_name(r) for r in roles]))
        return model

    def fuse_(self, model: nn.Module) -> nn.Module:
        """Join the parts back into the stock fused projections (in place; after slicing, before saving)."""
        for layer in self.layers(model):
            for owner_name, fused_name, roles in self.fused:
                owner = self.attn(layer) if owner_name == "attn" else self.mlp(layer)
                if not isinstance(getattr(owner, fused_name), Concat):
                    continue
                parts = [_base_linear(getattr(owner, self.module_name(r))) for r in roles]
                w = torch.cat([p.weight.detach() for p in parts], dim=0)
                has_b = any(p.bias is not None for p in parts)
                fused = nn.Linear(w.shape[1], w.shape[0], bias=has_b, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    fused.weight.copy_(w)
                    if has_b:
                        fused.bias.copy_(
                            torch.cat([p.bias if p.bias is not None else w.new_zeros(p.weight.shape[0]) for p in parts])
                        )
                setattr(owner, fused_name, fused)
                for r in roles:
                    delattr(owner, self.module_name(r))
        return model

    def _part_rows(self, shape: dict[str, int], role: str) -> int:
        if role == "q":
            return shape["num_attention_heads"] * shape["head_dim"]
        if role in ("k", "v"):
            return shape["num_key_value_heads"] * shape["head_dim"]
        return shape["intermediate_size"]  # gate, up

    # ---- norms over the whole projected width (OLMo-2) ---------------------------------------
    def width_norm(self, layer: nn.Module, name: str) -> nn.Module:
        return getattr(self.attn(layer), name)

    @staticmethod
    def kept_width_norm(norm: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The RMSNorm ``norm`` of ``x`` ``[..., width]`` with its mean square over the ``keep`` columns only
        (what the sliced norm computes on the kept heads); the other columns are computed alike and unused."""
        h = x.float()
        keep = keep.to(h.device, h.dtype)
        variance = (h.pow(2) * keep).sum(-1, keepdim=True) / keep.sum()
        return (norm.weight * (h * torch.rsqrt(variance + norm.variance_epsilon))).to(x.dtype)

    def slice_width_norms_(self, layer: nn.Module, q_rows: torch.Tensor, kv_rows: torch.Tensor) -> None:
        """Keep the norm weights of the kept heads' columns (in place, with the projections' slicing)."""
        for name, role in self.width_norms:
            norm = self.width_norm(layer, name)
            rows = q_rows if role == "q" else kv_rows
            norm.weight = nn.Parameter(
                norm.weight.detach()[rows.to(norm.weight.device)].clone(), requires_grad=norm.weight.requires_grad
            )

    # ---- config: the shape keys of a stock checkpoint ---------------------------------------
    def shape(self, config) -> dict[str, int]:
        """The per-layer shape a config declares: heads, KV heads, head_dim, intermediate and hidden size,
        layers, vocabulary (defaults filled in as transformers fills them)."""
        n_heads = int(config.num_attention_heads)
        return {
            "num_hidden_layers": int(config.num_hidden_layers),
            "hidden_size": int(config.hidden_size),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or n_heads),
            "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // n_heads),
            "intermediate_size": int(config.intermediate_size),
            "vocab_size": int(config.vocab_size),
        }

    def set_layer_shape_(self, layer: nn.Module, *, n_heads: int, n_kv: int, d_ff: int) -> None:
        """Update the counts a sliced layer's modules keep besides their weights."""
        attn, mlp = self.attn(layer), self.mlp(layer)
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = n_heads // n_kv
        if hasattr(attn, "num_key_value_heads"):  # Phi-3 splits its fused qkv output by this count
            attn.num_key_value_heads = n_kv
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = d_ff

    def set_shape_(self, config, *, n_heads: int, n_kv: int, d_ff: int, head_dim: int) -> None:
        """Write the pruned shape into a config, so plain ``from_pretrained`` builds the sliced model:
        head_dim explicitly (transformers would otherwise recompute hidden // heads), and no quantization
        config (the weights are dense now)."""
        config.num_attention_heads = n_heads
        config.num_key_value_heads = n_kv
        config.intermediate_size = d_ff
        config.head_dim = head_dim
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")

    def set_bias_(self, config, *, attn: bool, mlp: bool) -> None:
        """Turn on the config keys that give the projections biases (see :attr:`attn_bias_flag`)."""
        if attn:
            setattr(config, self.attn_bias_flag, True)
        if mlp:
            setattr(config, self.mlp_bias_flag, True)

    def has_bias(self, config, part: str) -> bool:
        """Whether the dense config already gives ``part`` (``attn`` or ``mlp``) biases."""
        flag = self.attn_bias_flag if part == "attn" else self.mlp_bias_flag
        return flag is not None and bool(getattr(config, flag, False))

    # ---- structure --------------------------------------------------------------------------
    def head_layout(self, model: nn.Module, policy: GQAPolicy) -> HeadLayout:
        shape = self.shape(model.config)
        n_heads, n_kv, head_dim = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
        layer = self.layers(model)[0]
        q, k, v, o = (_base_linear(self.proj(layer, n)) for n in ("q", "k", "v", "o"))
        q_head = _linear_params(q, head_dim) + o.weight.shape[0] * head_dim  # q rows + o columns
        kv_head = _linear_params(k, head_dim) + _linear_params(v, head_dim)
        roles = {role for _, role in self.width_norms}  # a head also carries its columns of such norms
        q_head += head_dim if "q" in roles else 0
        kv_head += head_dim if "k" in roles else 0
        r = n_heads // n_kv
        if r == 1:
            rows, per_row, ppu = 1, n_heads, q_head + kv_head
        elif policy == "query":
            rows, per_row, ppu = n_kv, r, q_head
        elif policy == "kv_group":
            rows, per_row, ppu = 1, n_kv, r * q_head + kv_head
        else:  # pragma: no cover - config validation rejects this earlier
            raise ValueError(f"unknown GQA policy {policy!r}")
        return HeadLayout(
            kind="head",
            rows=rows,
            units_per_row=per_row,
            params_per_unit=ppu,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            policy=policy,
        )

    def ffn_layout(self, model: nn.Module) -> FFNLayout:
        layer = self.layers(model)[0]
        gate, up, down = (_base_linear(self.proj(layer, n)) for n in ("gate", "up", "down"))
        d_ff = int(up.weight.shape[0])
        ppu = _linear_params(gate, 1) + _linear_params(up, 1) + down.weight.shape[0]
        return FFNLayout(kind="ffn", rows=1, units_per_row=d_ff, params_per_unit=ppu)


class Concat(nn.Module):
    """A fused projection seen through its parts: the concatenation of the outputs of the owner's part
    modules, looked up by name at every call (so slicing or LoRA-wrapping a part needs no update here).
    Holds no parameters; the owner is kept outside the module tree."""

    def __init__(self, owner: nn.Module, names: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner already holds the parts
        self.names = list(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self._owner, n)(x) for n in self.names], dim=-1)


def _base_linear(module: nn.Module) -> nn.Linear:
    """The stock ``nn.Linear`` under a peft wrapper, or the module itself."""
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Linear):
        raise UnsupportedModelError(
            "maskprune can only prune plain linear projections",
            expected="torch.nn.Linear (fp32/bf16/fp16 weights)",
            found=type(base).__name__,
            fix="load the model unquantized (maskprune dequantizes GGUF files itself)",
        )
    return base


ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
"""The projection roles of a decoder layer, by which maskprune names them (the adapter maps them to modules)."""

_REGISTRY: dict[str, Callable[[], DecoderAdapter]] = {
    "llama": lambda: DecoderAdapter("llama", attn_bias_flag="attention_bias", mlp_bias_flag="mlp_bias"),
    "mistral": lambda: DecoderAdapter("mistral"),
    "qwen2": lambda: DecoderAdapter("qwen2"),
    "qwen3": lambda: DecoderAdapter("qwen3", attn_bias_flag="attention_bias"),
    # the same layout: q/k norms per head (Gemma 3) are shared by all heads and need no slicing; multipliers
    # (Granite), soft-capping and extra norms (Gemma 2) and NoPE layers (SmolLM3) do not depend on the units
    "gemma2": lambda: DecoderAdapter("gemma2", attn_bias_flag="attention_bias", norm_offset=1.0),
    "gemma3_text": lambda: DecoderAdapter("gemma3_text", attn_bias_flag="attention_bias", norm_offset=1.0),
    "granite": lambda: DecoderAdapter("granite", attn_bias_flag="attention_bias", mlp_bias_flag="mlp_bias"),
    "smollm3": lambda: DecoderAdapter("smollm3", attn_bias_flag="attention_bias", mlp_bias_flag="mlp_bias"),
    # q/k RMSNorm over the whole projected width: computed over the kept heads, sliced with them
    "olmo2": lambda: DecoderAdapter(
        "olmo2", attn_bias_flag="attention_bias", width_norms=(("q_norm", "q"), ("k_norm", "k"))
    ),
    # fused qkv_proj and gate_up_proj (gate rows first: the stock forward chunks gate, up): split for the run
    "phi3": lambda: DecoderAdapter(
        "phi3", fused=(("attn", "qkv_proj", ("q", "k", "v")), ("mlp", "gate_up_proj", ("gate", "up")))
    ),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def adapter_for(model: nn.Module) -> DecoderAdapter:
    """The adapter of a loaded model (by its ``config.model_type``)."""
    return get_adapter(model.config.model_type)


def get_adapter(model_type: str) -> DecoderAdapter:
    """The adapter for a ``config.model_type``; a clear error for anything else."""
    try:
        return _REGISTRY[model_type]()
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported",
            expected=f"one of {', '.join(SUPPORTED_MODEL_TYPES)}",
            found=repr(model_type),
            fix="use a Llama-, Mistral- or Qwen2-style decoder; other families need an adapter in maskprune/arch.py",
        ) from None
