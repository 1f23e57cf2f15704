"""Cuts across the whole model: decoder layers (depth) and hidden channels (the residual stream's width).

Both are applied in place, so the model becomes the stock model of the smaller shape (``num_hidden_layers`` or
``hidden_size`` changed, every per-layer config list kept consistent) and saves and reloads with plain
``from_pretrained``. What they must compute is defined by :func:`emulated_cut`: the uncut model with the cut
emulated by hooks (a dropped layer passes its input through; a cut channel is zero in the residual stream and
every norm over the residual normalises over the kept channels alone). :func:`cut_parity` compares the two.

Forwards that depend on ``hidden_size`` keep parity by folding a factor into weights: Gemma's embedding scale
``sqrt(hidden_size)`` becomes ``sqrt(kept)``, so the embedding is multiplied by ``sqrt(hidden / kept)``; where the
LM head is tied to it, the final norm's scale is divided by the same factor (the logits see ``norm * head``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from typing import Iterator, Sequence

import torch
from torch import nn

from .arch import DecoderAdapter, _base_linear
from .errors import MaskPruneError
from .offload import held, home_device
from .passes import patched_forward

log = logging.getLogger(__name__)

__all__ = [
    "drop_layers_",
    "slice_hidden_",
    "layer_pattern",
    "canonical_layer_pattern",
    "config_accepts",
    "residual_norm_modules",
    "rescale_norms_",
    "emulated_cut",
    "cut_parity",
    "INPUT_ROLES",
    "OUTPUT_ROLES",
]

INPUT_ROLES = ("q", "k", "v", "gate", "up")
"""Projections that read the residual stream (their input columns are hidden channels)."""
OUTPUT_ROLES = ("o", "down")
"""Projections that write the residual stream (their output rows are hidden channels)."""


def drop_layers_(model: nn.Module, adapter: DecoderAdapter, keep: Sequence[int]) -> None:
    """Keep only the decoder layers ``keep`` (indices into the current layers), in order. Every config list with
    one entry per layer (``layer_types``, SmolLM3's ``no_rope_layers``, ...) keeps the kept layers' entries, and
    the modules' ``layer_idx`` (the KV cache's slot) is renumbered."""
    layers = adapter.layers(model)
    n = len(layers)
    kept = sorted(set(int(i) for i in keep))
    if not kept or kept[0] < 0 or kept[-1] >= n:
        raise MaskPruneError(
            "a depth cut must keep at least one layer", expected=f"indices in [0, {n})", found=str(kept)
        )
    owner = adapter.base(model)
    setattr(owner, adapter.layers_path.split(".")[-1], nn.ModuleList([layers[i] for i in kept]))
    for new_idx, layer in enumerate(adapter.layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = model.config
    for key in list(config.to_dict()):
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == n and key != "num_hidden_layers":
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)


def residual_norm_modules(model: nn.Module, adapter: DecoderAdapter) -> list[nn.Module]:
    """Every norm over the residual stream, layer by layer, then the final norm (the order energies are kept in)."""
    hidden = int(model.config.hidden_size)
    norms = [n for layer in adapter.layers(model) for _, n in adapter.residual_norms(layer, hidden)]
    return norms + [adapter.final_norm(model)]


def rescale_norms_(model: nn.Module, adapter: DecoderAdapter, energies: list[torch.Tensor], keep: torch.Tensor) -> None:
    """Before a hidden cut: scale every norm over the residual by ``rms_kept / rms_all`` of its calibration
    input (``energies``: per norm, the summed square of each input channel), so that the norm over the kept
    channels alone gives its output the scale it had over all of them, on average. (A norm over the kept
    channels divides by their RMS, larger than the whole stream's when the cut channels carried little.)"""
    norms = residual_norm_modules(model, adapter)
    if len(norms) != len(energies):
        raise MaskPruneError("internal error: norm energies do not match the model's norms")
    hidden = int(model.config.hidden_size)
    k = keep.numel()
    for norm, e in zip(norms, energies):
        e = e.double()
        total = float(e.sum())
        if total <= 0.0:
            continue
        factor = ((float(e[keep.to(e.device)].sum()) / k) / (total / hidden)) ** 0.5
        _scale_norm_(adapter, norm, factor)


def layer_pattern(config) -> list[tuple]:
    """Per layer, the values of every config list with one entry per layer (``layer_types``, ``no_rope_layers``,
    ...), in key order; empty tuples where the config has none."""
    n = int(config.num_hidden_layers)
    keys = _per_layer_keys(config)
    return [tuple(getattr(config, k)[i] for k in keys) for i in range(n)]


def canonical_layer_pattern(config, num_layers: int) -> list[tuple] | None:
    """The per-layer pattern (see :func:`layer_pattern`) that the family's config derives for a model of
    ``num_layers`` layers when none is given, i.e. what an engine that recomputes it from the layer index
    computes; None where the config derives none (every choice of layers is then consistent)."""
    keys = _per_layer_keys(config)
    if not keys:
        return None
    fresh = rebuilt_config(config, **{k: None for k in keys}, num_hidden_layers=num_layers)
    if fresh is None:  # pragma: no cover - a config that cannot derive its lists
        return None
    lists = [getattr(fresh, k, None) for k in keys]
    if any(v is None or len(v) != num_layers for v in lists):
        return None
    return [tuple(v[i] for v in lists) for i in range(num_layers)]


def rebuilt_config(config, **changes):
    """A fresh config of the family's class from ``config`` with ``changes`` (the class derives what is left
    unset, e.g. per-layer lists set to None, and validates the rest); None where it refuses them."""
    values = config.to_dict()
    values.update(changes)
    values.pop("quantization_config", None)
    try:
        return type(config)(**values)
    except Exception as e:  # noqa: BLE001 - ValueError, TypeError or huggingface_hub's StrictDataclassError
        log.debug("config refuses %s: %s", changes, e)
        return None


def config_accepts(config, **changes) -> bool:
    """Whether the family's config class accepts ``config`` with ``changes`` (e.g. ``hidden_size``,
    ``num_attention_heads``): transformers' validation (Llama's and Gemma's ``hidden_size`` must be a multiple of
    ``num_attention_heads``, even with an explicit ``head_dim``) refuses to save or load a checkpoint that breaks
    it, so a cut may only choose shapes it accepts."""
    return rebuilt_config(config, **changes) is not None


def _per_layer_keys(config) -> list[str]:
    n = int(config.num_hidden_layers)
    return sorted(
        k for k in config.to_dict() if isinstance(getattr(config, k, None), list) and len(getattr(config, k)) == n
    )


def slice_hidden_(model: nn.Module, adapter: DecoderAdapter, keep: torch.Tensor) -> None:
    """Keep only the hidden channels ``keep`` (sorted indices) everywhere in the residual stream: the embedding's
    and the LM head's columns (a tied head stays tied), every projection that reads it (input columns) or writes
    it (output rows, biases), every norm over it; ``hidden_size`` in the config. Fused families must be unfused
    (:meth:`DecoderAdapter.unfuse_`) first."""
    config = model.config
    hidden = int(config.hidden_size)
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values.unique()
    if keep.numel() == 0 or int(keep[0]) < 0 or int(keep[-1]) >= hidden:
        raise MaskPruneError("a hidden cut must keep at least one channel", expected=f"indices in [0, {hidden})")
    head_dim = adapter.shape(config)["head_dim"]  # before hidden_size changes (Llama derives it from hidden)
    emb, head = adapter.embedding(model), adapter.lm_head(model)
    with held(head):
        tied = head is not None and head.weight is emb.weight
    with held(emb):  # where the weights wait on disk, each module is read for its cut, then written (one at a time)
        ratio = _embed_scale_ratio_(emb, hidden, keep.numel())
        sliced = emb.weight.detach()[:, keep.to(emb.weight.device)]
        _set(emb, "weight", sliced.mul_(ratio) if ratio != 1.0 else sliced)
        del sliced
        emb.embedding_dim = keep.numel()
        if tied:
            head.weight = emb.weight
            _scale_norm_(adapter, adapter.final_norm(model), 1.0 / ratio)
    if head is not None and not tied:
        with held(head):
            _set(head, "weight", head.weight.detach()[:, keep.to(head.weight.device)])
    if head is not None:
        head.in_features = keep.numel()
    for layer in adapter.layers(model):
        with held(layer):
            _slice_layer_hidden_(layer, adapter, keep, hidden)
    _slice_norm_(adapter.final_norm(model), keep)
    config.hidden_size = keep.numel()
    config.head_dim = head_dim


def _slice_layer_hidden_(layer: nn.Module, adapter: DecoderAdapter, keep: torch.Tensor, hidden: int) -> None:
    """One decoder layer's share of :func:`slice_hidden_`."""
    for role in INPUT_ROLES:
        lin = _base_linear(adapter.proj(layer, role))
        _set(lin, "weight", lin.weight.detach()[:, keep.to(lin.weight.device)])
        lin.in_features = keep.numel()
    for role in OUTPUT_ROLES:
        lin = _base_linear(adapter.proj(layer, role))
        _set(lin, "weight", lin.weight.detach()[keep.to(lin.weight.device)])
        if lin.bias is not None:
            _set(lin, "bias", lin.bias.detach()[keep.to(lin.bias.device)])
        lin.out_features = keep.numel()
    for _, norm in adapter.residual_norms(layer, hidden):
        _slice_norm_(norm, keep)


def _embed_scale_ratio_(emb: nn.Module, hidden: int, kept: int) -> float:
    """Gemma's embedding multiplies by ``sqrt(hidden_size)``, which a stock reload recomputes from the config:
    set it to ``sqrt(kept)`` and return ``sqrt(hidden / kept)``, the factor the weights must carry. 1 for an
    embedding without such a scale (or with one that does not depend on the width)."""
    scale = getattr(emb, "scalar_embed_scale", None)
    if scale is None or not math.isclose(float(scale), hidden**0.5, rel_tol=1e-6):
        return 1.0
    emb.scalar_embed_scale = kept**0.5
    if isinstance(getattr(emb, "embed_scale", None), torch.Tensor):
        emb.embed_scale.fill_(kept**0.5)
    return (hidden / kept) ** 0.5


def _slice_norm_(norm: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        p = getattr(norm, name, None)
        if isinstance(p, torch.Tensor):
            _set(norm, name, p.detach()[keep.to(p.device)])
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (keep.numel(),)
    if hasattr(norm, "hidden_size"):
        norm.hidden_size = keep.numel()


def _scale_norm_(adapter: DecoderAdapter, norm: nn.Module, factor: float) -> None:
    """Multiply a norm's output by ``factor`` through its weight (``offset + w`` -> ``factor * (offset + w)``)."""
    off = adapter.norm_offset
    _set(norm, "weight", (norm.weight.detach() + off) * factor - off)
    if getattr(norm, "bias", None) is not None:
        _set(norm, "bias", norm.bias.detach() * factor)


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """``module.name`` replaced by ``value`` as a parameter of its own storage (a copy only where ``value`` is a
    view: at 8B, a second copy of a sliced embedding is 2 GB)."""
    old = getattr(module, name)
    own = value.contiguous()
    if own._base is not None or own.data_ptr() == old.data_ptr():
        own = own.clone()
    setattr(module, name, nn.Parameter(own, requires_grad=old.requires_grad))


class _KeptChannelNorm(nn.Module):
    """A norm over the residual computed on the kept channels only (the wrapped norm's own forward on a sliced
    copy); zero on the cut channels."""

    def __init__(self, norm: nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        self.inner = copy.deepcopy(norm)
        _slice_norm_(self.inner, keep)
        self.register_buffer("keep", keep.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape)
        out[..., self.keep] = self.inner(x[..., self.keep])
        return out


@contextlib.contextmanager
def emulated_cut(
    model: nn.Module,
    adapter: DecoderAdapter,
    *,
    keep_layers: Sequence[int] | None = None,
    keep_hidden: torch.Tensor | None = None,
) -> Iterator[nn.Module]:
    """The uncut ``model`` computing what the cut model must: dropped layers pass their input through, cut hidden
    channels are zero in the residual stream (embedding and layer outputs masked) and the norms over it normalise
    over the kept channels. Restored on exit."""
    hooks: list = []
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    layers = adapter.layers(model)
    hidden = int(model.config.hidden_size)
    passing = contextlib.ExitStack()  # the dropped layers' forwards, put back on exit
    try:
        if keep_layers is not None:
            kept = set(int(i) for i in keep_layers)
            for i, layer in enumerate(layers):
                if i not in kept:  # not run at all (nor read, where its weights wait on disk)
                    passing.enter_context(patched_forward(layer, _pass_through, unread=True))
        if keep_hidden is not None:
            keep = torch.as_tensor(keep_hidden, dtype=torch.long).sort().values
            emb = adapter.embedding(model)
            mask = torch.zeros(hidden, dtype=emb.weight.dtype, device=home_device(emb))
            mask[keep.to(mask.device)] = 1

            def zero_cut(_m, _args, out):
                return out * mask.to(out.dtype)

            hooks.append(emb.register_forward_hook(zero_cut))
            for layer in layers:
                for role in OUTPUT_ROLES:
                    hooks.append(adapter.proj(layer, role).register_forward_hook(zero_cut))
                for name, norm in adapter.residual_norms(layer, hidden):
                    swapped.append((layer, name, norm))
            base = adapter.base(model)
            swapped.append((base, "norm", adapter.final_norm(model)))
            for owner, name, norm in swapped:
                setattr(owner, name, _KeptChannelNorm(norm, keep.to(norm.weight.device)))
        yield model
    finally:
        for h in hooks:
            h.remove()
        for owner, name, norm in swapped:
            setattr(owner, name, norm)
        passing.close()


def _pass_through(*args, **kwargs):
    """A dropped layer's forward: its input, unchanged."""
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def cut_parity(reference: torch.Tensor, model: nn.Module, probe: torch.Tensor) -> float:
    """Largest absolute logit difference between ``reference`` (the emulated cut's logits on ``probe``) and the
    cut model's, relative to the largest reference logit."""
    logits = model(input_ids=probe.to(home_device(model))).logits.float().cpu()
    return float((logits - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
