"""The export stage: LoRA merged, masks folded, the model sliced to the kept units and checked against the masked
model, FLAP's biases added, cast, saved, reloaded and checked again; and the report's account of the result."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..arch import count_parameters
from ..compensate import add_biases_, layer_deltas
from ..cut import cut_mass_share
from ..dtypes import DTYPES
from ..errors import MaskPruneError
from ..export import ParityReport, fold_and_slice_, masked_logits, save_and_verify, verify_parity
from .context import RunContext
from .outcome import Outcome

__all__ = ["Exported", "export", "structure_sections", "selection_sections"]


@dataclasses.dataclass
class Exported:
    model: torch.nn.Module
    parity: ParityReport  # of the fold
    roundtrip: ParityReport  # of save + reload
    dtype: torch.dtype
    params: int


def export(run: RunContext, outcome: Outcome, soft: dict, folder: Path) -> Exported:
    """Merge LoRA, fold the masks, slice, check parity with the masked model, add the compensating biases,
    cast, save to ``folder`` and check the reloaded checkpoint; the parameter count must match the plan."""
    cfg, model, kept = run.cfg, outcome.model, outcome.kept
    probe = run.windows[:2, : min(cfg.seq_len, 64)]
    reference = masked_logits(model, probe)
    with run.phases("export"):
        outcome.masks.detach()
        base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        head = run.structure.head
        deltas = (
            layer_deltas(base, run.adapter, head, outcome.means, kept, outcome.compensation)
            if outcome.compensation
            else None
        )
        fold_and_slice_(base, run.adapter, head, soft["head"], soft["ffn"], kept)
        # The fold is checked in fp32 (the model here is fp32: learned so, or rebuilt for the export):
        # merging LoRA and folding masks reorder fp32 sums; through SmolLM2's 30 layers (activation
        # outliers ~1e2) that measured up to 1.2e-4 of the largest logit (L0 masks, whose sampled gates
        # grow LoRA more). 1e-3 stays far below what a folding bug does (a wrong head or channel moves
        # logits by O(1)). Then the finished model is cast to the export dtype, saved, reloaded with
        # plain from_pretrained and compared with itself in memory.
        parity = verify_parity(base, probe, reference, tolerance=1e-3)
        if deltas is not None:  # after the parity check: the compensation changes the function on purpose
            add_biases_(base, run.adapter, deltas, outcome.compensation)
        run.adapter.fuse_(base)  # the stock layout of fused families (a no-op for the others)
        edtype = export_dtype(cfg.export_dtype, run.loaded.source_dtype)
        for prm in base.parameters():  # parameters only: buffers (rotary inv_freq) stay as from_pretrained builds them
            prm.data = prm.data.to(edtype)
        base.config.dtype = edtype
        roundtrip = save_and_verify(
            base, run.loaded.tokenizer, folder, probe, masked_logits(base, probe), tolerance=1e-5
        )
    exported = count_parameters(base)
    if exported != outcome.plan.params + outcome.extra_params:
        raise MaskPruneError(
            "internal accounting error: exported parameter count differs from the plan",
            expected=str(outcome.plan.params + outcome.extra_params),
            found=str(exported),
        )
    return Exported(base, parity, roundtrip, edtype, exported)


def structure_sections(run: RunContext, outcome: Outcome, base: torch.nn.Module) -> dict:
    """The report's ``params`` and ``shape``: sizes against the budget, and the exported shape."""
    s, cfg = run.structure, run.cfg  # the structure of the model the heads / FFN cut was planned on
    exported = count_parameters(base)
    shape = run.adapter.shape(base.config)
    dense = outcome.shape.dense if outcome.shape is not None else None  # before the shape search's cut
    dense_params = dense["params"] if dense else s.dense_params
    prunable_kept = s.prunable_params - (s.dense_params - exported)
    layout = {
        kind: {"rows": lay.rows, "units_per_row": lay.units_per_row, "params_per_unit": lay.params_per_unit}
        for kind, lay in (("head", s.head), ("ffn", s.ffn))
    }
    return {
        "params": {
            "dense": dense_params,
            "budget": run.budget,
            "exported": exported,
            "sparsity": 1 - exported / dense_params,
            "prunable_dense": s.prunable_params,
            "prunable_exported": prunable_kept,
            "prunable_removed_share": 1 - prunable_kept / s.prunable_params,
            "budget_slack": run.budget - exported,
        },
        "shape": {
            "num_hidden_layers": s.num_layers,
            "hidden_size": shape["hidden_size"],
            **{k: shape[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")},
            "dense": {
                "num_hidden_layers": dense["num_hidden_layers"] if dense else s.num_layers,
                "hidden_size": dense["hidden_size"] if dense else shape["hidden_size"],
                "num_attention_heads": s.head.num_attention_heads,
                "num_key_value_heads": s.head.num_key_value_heads,
                "intermediate_size": s.ffn.units_per_row,
            },
            "gqa_policy": cfg.gqa_policy,
            "unit_layout": layout,
        },
    }


def selection_sections(run: RunContext, outcome: Outcome, soft: dict) -> dict:
    """The report's account of how the units were chosen: the cut, the split, the compensation, the masks."""
    state, kept = outcome.state, outcome.kept
    comp = outcome.compensation
    return {
        "cut": outcome.plan.to_dict(),
        "split_search": outcome.split,
        "shape_search": outcome.shape.to_dict() if outcome.shape is not None else None,
        "calibration": outcome.calibration,
        "bias_compensation": (
            {
                "o_proj": comp.attn,
                "down_proj": comp.mlp,
                "params": outcome.extra_params,
                "protocol": "FLAP: mean calibration input of the cut units through o_proj / down_proj",
            }
            if comp
            else None
        ),
        "kept_units": kept.to_lists(),
        "scores": outcome.scores,
        "method": run.cfg.method,
        "final_state": (
            {"sigma": state.sigma, "y": state.y, "z": state.z, "steps": state.step} if state is not None else None
        ),
        "cut_mask_mass_share": {
            "head": cut_mass_share(soft["head"], kept.head),
            "ffn": cut_mass_share(soft["ffn"], kept.ffn),
        },
        "masks": {"head": soft["head"].tolist(), "ffn_summary": _summary(soft["ffn"])},
    }


def export_dtype(name: str, source_dtype: torch.dtype | None) -> torch.dtype:
    """The saved checkpoint's dtype: ``auto`` is the dtype the source checkpoint declares (fp32 when it
    declares none or another), so a bf16 model comes out bf16 and an fp32 one fp32 whatever learning used."""
    if name == "auto":
        return source_dtype if source_dtype in DTYPES.values() else torch.float32
    return DTYPES[name]


def _summary(t: torch.Tensor) -> dict:
    flat = t.reshape(t.shape[0], -1)
    return {"mean_per_layer": flat.mean(1).tolist(), "frac_below_0.1_per_layer": (flat < 0.1).float().mean(1).tolist()}
