"""Merge LoRA, fold the kept masks into weights that are linear in them, slice, and save a stock
Hugging Face checkpoint; then reload it with plain ``from_pretrained`` and verify parity.

Folding (docs/method.md, "The fold and the export"): a head's mask goes into its o_proj input columns
(valid for every policy: o_proj is linear in each head's output), an FFN channel's mask into its
down_proj column (never gate_proj, whose output passes through the activation).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import DecoderAdapter, HeadLayout, adapter_for
from .cut import KeptUnits, hard_masks
from .errors import ParityError
from .masks import MaskSet
from .offload import disk_weights, held, home_device

__all__ = ["masked_logits", "fold_and_slice_", "save_and_verify", "ParityReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    ref_max_abs: float
    tolerance: float

    def to_dict(self) -> dict[str, float]:
        return {"max_abs_diff": self.max_abs_diff, "ref_max_abs": self.ref_max_abs, "tolerance": self.tolerance}


@torch.no_grad()
def harden_(masks: MaskSet, kept: KeptUnits) -> None:
    """Set every cut unit's mask to 0 (kept units keep their learned values)."""
    masks.head.copy_(hard_masks(masks.head, kept.head))
    masks.ffn.copy_(hard_masks(masks.ffn, kept.ffn))


@torch.no_grad()
def masked_logits(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[B, T, V]`` of ``model`` as it stands (hooks on), for the parity check."""
    device = home_device(model)
    return model(input_ids=probe.to(device), use_cache=False).logits.float().cpu()


def _sliced_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    new.requires_grad_(old.weight.requires_grad)
    return new


@torch.no_grad()
def fold_and_slice_(
    model: nn.Module,
    adapter: DecoderAdapter,
    layout: HeadLayout,
    head_masks: torch.Tensor,
    ffn_masks: torch.Tensor,
    kept: KeptUnits,
) -> None:
    """In place on a stock (LoRA-merged, hook-free) model: fold masks, slice, update the config.

    head_masks ``[L, rows, U_h]``, ffn_masks ``[L, 1, U_f]``: the learned values (cut units are
    dropped whatever their value).
    """
    d = layout.head_dim
    n_q = n_kv = d_ff = 0
    for li, layer in enumerate(adapter.layers(model)):
        with held(layer):  # where the weights wait on disk: read, folded and sliced, written
            attn, mlp = adapter.attn(layer), adapter.mlp(layer)
            q, k, v, o = (adapter.proj(layer, r) for r in ("q", "k", "v", "o"))
            dev = o.weight.device
            q_keep, kv_keep = layout.kept_heads(kept.head[li])
            qmask = layout.query_head_mask(head_masks[li]).to(o.weight.dtype).to(dev)  # [n_heads]
            col_scale = qmask.repeat_interleave(d)  # [n_heads * d]
            q_rows, kv_rows = layout.columns(q_keep, dev), layout.columns(kv_keep, dev)
            o_w = (o.weight * col_scale[None, :])[:, q_rows]  # [hidden, n_q' * d]
            setattr(attn, adapter.o_name, _sliced_linear(o, o_w, o.bias))
            for name, mod, rows in (
                (adapter.q_name, q, q_rows),
                (adapter.k_name, k, kv_rows),
                (adapter.v_name, v, kv_rows),
            ):
                setattr(
                    attn, name, _sliced_linear(mod, mod.weight[rows], mod.bias[rows] if mod.bias is not None else None)
                )
            adapter.slice_width_norms_(layer, q_rows, kv_rows)

            gate, up, down = (adapter.proj(layer, r) for r in ("gate", "up", "down"))
            ch = kept.ffn[li, 0].to(down.weight.device)  # [d_ff']
            fm = ffn_masks[li, 0].to(down.weight.dtype).to(down.weight.device)  # [d_ff]
            down_w = (down.weight * fm[None, :])[:, ch]  # [hidden, d_ff']
            setattr(mlp, adapter.down_name, _sliced_linear(down, down_w, down.bias))
            for name, mod in ((adapter.gate_name, gate), (adapter.up_name, up)):
                setattr(mlp, name, _sliced_linear(mod, mod.weight[ch], mod.bias[ch] if mod.bias is not None else None))
            n_q, n_kv, d_ff = len(q_keep), len(kv_keep), int(ch.numel())
            adapter.set_layer_shape_(layer, n_heads=n_q, n_kv=n_kv, d_ff=d_ff)
    adapter.set_shape_(model.config, n_heads=n_q, n_kv=n_kv, d_ff=d_ff, head_dim=d)


def verify_parity(
    model: nn.Module,
    probe: torch.Tensor,
    reference: torch.Tensor,
    *,
    tolerance: float = 1e-4,
    what: str = "the folded and sliced model",
) -> ParityReport:
    """Logits of ``model`` (in memory) against ``reference``; :class:`ParityError` beyond
    ``tolerance * max(1, max|reference|)``."""
    out = masked_logits(model, probe)
    ref_max = float(reference.abs().max())
    diff = float((out - reference).abs().max())
    report = ParityReport(diff, ref_max, tolerance * max(1.0, ref_max))
    if not diff <= report.tolerance:
        raise ParityError(
            f"{what} does not reproduce the masked model",
            expected=f"max |logit difference| <= {report.tolerance:.3g}",
            found=f"{diff:.3g}",
            fix="this is a maskprune bug: please report it with the model type",
        )
    log.info("parity verified (%s): max |logit diff| %.3g (tolerance %.3g)", what, diff, report.tolerance)
    return report


class ShardWriter:
    """Tensors written as they come into safetensors shards of about ``shard_bytes`` (a tensor larger alone gets its
    own), renamed at :meth:`close` to transformers' ``model-0000i-of-0000n.safetensors`` and indexed in
    ``model.safetensors.index.json``: the layout ``save_pretrained`` writes, so ``from_pretrained`` loads it stock.
    Holds at most one shard's tensors."""

    def __init__(self, folder: Path, shard_bytes: int = 2**30) -> None:
        self.folder, self.shard_bytes = Path(folder), shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        self.pending[name] = t
        self.size += t.numel() * t.element_size()
        self.total += t.numel() * t.element_size()
        if self.size >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            file = f"shard-{len(self.files) + 1:05d}.safetensors"
            save_file(self.pending, str(self.folder / file), metadata={"format": "pt"})
            self.files.append(file)
            self.weight_map.update(dict.fromkeys(self.pending, file))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self.files)
        final = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(self.files)}
        for old, new in final.items():
            (self.folder / old).rename(self.folder / new)
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": {k: final[f] for k, f in sorted(self.weight_map.items())},
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_streamed(model: nn.Module, folder: Path, shard_bytes: int = 2**30) -> None:
    """Save a model whose weights wait on disk (:mod:`maskprune.offload`) as a stock sharded safetensors checkpoint
    (:class:`ShardWriter`): each module read once, in order, and its tensors written. Tensors shared by several
    names (a tied LM head) are written once, under the first name, as ``save_pretrained`` does."""
    writer = ShardWriter(folder, shard_bytes)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    resident = model.state_dict(keep_vars=True)
    for module, keys in _save_groups(model):
        with held(module):
            state = module.state_dict() if module is not model else resident
            for key, local in keys:
                writer.add(key, state[local])
    writer.close()


def _save_groups(model: nn.Module) -> list[tuple[nn.Module, list[tuple[str, str]]]]:
    """The checkpoint's tensors grouped by the module read to write them: each slot's owner (its keys, local to
    it), then the model for the rest; a tensor under several names once."""
    from .offload import slot_owners

    owners = slot_owners(model)  # prefix -> module, in the model's order
    full = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    groups: dict[str, list[tuple[str, str]]] = {p: [] for p in owners}
    rest: list[tuple[str, str]] = []
    for key, t in full.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        prefix = next((p for p in owners if key.startswith(p + ".")), None)
        if prefix is None:
            rest.append((key, key))
        else:
            groups[prefix].append((key, key[len(prefix) + 1 :]))
    return [(owners[p], keys) for p, keys in groups.items() if keys] + [(model, rest)]


def save_and_verify(
    model: nn.Module, tokenizer, folder: Path, probe: torch.Tensor, reference: torch.Tensor, *, tolerance: float = 1e-4
) -> ParityReport:
    """Save stock weights + tokenizer to ``folder``, reload with ``AutoModelForCausalLM``, compare.

    Raises :class:`ParityError` if the reloaded model's logits drift beyond
    ``tolerance * max(1, max|reference|)``.
    """
    from transformers import AutoModelForCausalLM

    store = disk_weights(model)
    if store is not None:
        save_streamed(model, folder)
    else:
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    dtype = next(model.parameters()).dtype
    if store is not None:  # the stock classes on the written files, their weights read a layer at a time
        from .offload import DiskWeights

        config = type(model.config).from_pretrained(folder)
        reloaded, reloaded_store = DiskWeights.build(
            config, folder, adapter_for(model), device=store.device, dtype=dtype
        )
        try:
            return verify_parity(reloaded, probe, reference, tolerance=tolerance, what="the exported checkpoint")
        finally:
            reloaded_store.close()
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(home_device(model))
    reloaded.eval()
    try:
        report = verify_parity(reloaded, probe, reference, tolerance=tolerance, what="the exported checkpoint")
    finally:
        del reloaded
    return report
