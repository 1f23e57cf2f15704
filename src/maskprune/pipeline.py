"""The one recipe: load -> attach -> learn -> cut -> export -> verify -> evaluate -> report.

The output folder is written under a temporary name beside ``out`` and renamed only when every
step, the parity check included, has passed; a failure leaves no folder that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from . import __version__
from . import distributed as D
from .arch import count_parameters, get_adapter
from .compensate import add_biases_, layer_deltas
from .config import PruneConfig
from .cut import cut_mass_share
from .data import calibration_windows, wikitext2_test_text
from .errors import MaskPruneError
from .evaluate import perplexity, tokenize_windows
from .export import fold_and_slice_, harden_, masked_logits, save_and_verify, verify_parity
from .learned import check_checkpoints, checkpoint_dir, learn_and_plan
from .learner import DTYPES, autocast_dtype, resolve_dtype
from .masks import Structure
from .modelcard import write_model_card
from .models import load_model
from .oneshot import score_and_plan
from .outputs import Phases, check_output_path, default_out, staging
from .report import make_report
from .selection import rebuild_for_export, weight_dtype
from .sinks import ExtraSinks
from .zeroshot import resolve_tasks, run_zeroshot

__all__ = ["prune", "check_output_path", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MaskPruneError(f"device {name!r} is not available", fix="use --device cpu")
    return dev


def prune(cfg: PruneConfig, *, progress: bool = True) -> dict:
    """Run the whole pipeline; return the report (also written as ``maskprune_report.json``).

    Under a launcher (``torchrun``, ``accelerate launch``) every process calls this; the process group it
    joins is destroyed before it returns or raises (a group the caller created is left alone)."""
    try:
        return _prune(cfg, progress=progress)
    finally:
        D.shutdown()


def _prune(cfg: PruneConfig, *, progress: bool = True) -> dict:
    cfg.validate()
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    device = resolve_device(cfg.device)
    if cfg.dtype == "auto":  # settled once, so the report, checkpoints and every phase see the same dtype
        cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, device))
    D.init_from_env(device)
    main = D.is_main()
    check_output_path(out, cfg.overwrite)
    ExtraSinks.check(cfg.trackers)
    if main:
        check_checkpoints(out, cfg)
    D.barrier()
    if cfg.eval_tasks:
        resolve_tasks(cfg.eval_tasks)
        if cfg.eval_data_dir is not None:
            from .zeroshot import load_local_rows

            for t in resolve_tasks(cfg.eval_tasks):
                load_local_rows(t, cfg.eval_data_dir)  # a missing or malformed file fails now, not after learning
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    phases = Phases()
    t_start = time.perf_counter()

    with phases("load"):
        wdtype = weight_dtype(cfg)
        loaded = load_model(
            cfg.model,
            gguf_file=cfg.gguf_file,
            trust_remote_code=cfg.trust_remote_code,
            device=torch.device("cpu") if cfg.fsdp and D.world() > 1 else device,
            dtype=wdtype,
        )
        # under FSDP the whole model stays in host memory until fully_shard moves each process's shard to
        # its device; the dense evaluation then runs on rank 0 before sharding, on the host
    model, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(model.config.model_type)
    structure = Structure.of(model, adapter, cfg.gqa_policy)
    budget = cfg.budget_for(structure.dense_params)
    _check_budget(structure, budget, cfg)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    for name in ("seq_len", "eval_seq_len") if cfg.eval_data != "none" else ("seq_len",):
        if max_pos is not None and getattr(cfg, name) > max_pos:
            raise MaskPruneError(
                f"{name} {getattr(cfg, name)} is above the model's context",
                expected=f"at most max_position_embeddings = {max_pos}",
                fix=f"lower --{name.replace('_', '-')}",
            )

    with phases("data"):
        windows = calibration_windows(
            cfg.calib, tok, seq_len=cfg.seq_len, num_windows=cfg.calib_samples, config=cfg.calib_config
        )
        eval_windows, bos = (None, "")
        if cfg.eval_data != "none":
            eval_windows, bos = tokenize_windows(wikitext2_test_text(cfg.eval_data), tok, cfg.eval_seq_len)
    if cfg.method == "maskprune" and windows.shape[0] < cfg.batch_size:
        raise MaskPruneError(
            f"the calibration text gives {windows.shape[0]} windows of {cfg.seq_len} tokens, fewer "
            f"than one batch of {cfg.batch_size}",
            fix="give more calibration text, or lower --batch-size / --seq-len",
        )
    amp = autocast_dtype(cfg.dtype)
    log.info(
        "model %s: %s layers, %d params; budget %d (%.1f%% removed); %d calibration windows "
        "of %d tokens; %d steps of batch %d",
        loaded.source,
        structure.num_layers,
        structure.dense_params,
        budget,
        100 * (1 - budget / structure.dense_params),
        windows.shape[0],
        cfg.seq_len,
        cfg.steps,
        cfg.batch_size,
    )

    def ppl(m: torch.nn.Module, desc: str) -> dict | None:
        if eval_windows is None or not main:
            return None
        with phases(f"eval_{desc}"):
            return perplexity(
                m,
                eval_windows,
                batch_size=cfg.batch_size,
                max_windows=cfg.eval_max_windows,
                autocast_dtype=amp,
                bos=bos,
                progress=progress,
                desc=desc,
            ).to_dict()

    report: dict = {
        "maskprune_version": __version__,
        "config": cfg.to_dict(),
        "model": {"source": loaded.source, "path": loaded.path, "model_type": model.config.model_type},
        "machine": {
            **machine_info(device),
            "processes": D.world(),
            "sharding": "fsdp2" if cfg.fsdp and D.world() > 1 else "replicated",
        },
    }
    ppl_dense = ppl(model, "dense")
    tasks = resolve_tasks(cfg.eval_tasks) if cfg.eval_tasks else []

    def zeroshot(m: torch.nn.Module, desc: str) -> dict | None:
        if not tasks or not main:
            return None
        with phases(f"zeroshot_{desc}"):
            return run_zeroshot(
                m,
                tok,
                tasks,
                data_dir=cfg.eval_data_dir,
                limit=cfg.eval_limit,
                batch_size=cfg.batch_size,
                progress=progress,
            )

    zs_dense = zeroshot(model, "dense")

    ckpt_dir = checkpoint_dir(out)
    with staging(out, cfg.overwrite) if main else contextlib.nullcontext(None) as tmp:
        metrics_path = ckpt_dir / "metrics.jsonl"
        if main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        if cfg.method == "maskprune":
            outcome = learn_and_plan(
                cfg, model, adapter, structure, windows, budget, device, main, progress, phases, ckpt_dir, metrics_path
            )
            if not main:  # rank 0 alone cuts, exports, evaluates and writes
                log.info("rank %d done learning", D.rank())
                return {"rank": D.rank(), "final_state": outcome.state.to_dict()}
            shutil.copy2(metrics_path, tmp / "metrics.jsonl")
        else:
            outcome = score_and_plan(cfg, model, adapter, structure, windows, budget, device, phases)
            if wdtype != torch.float32:  # fold and verify in fp32, as for the learned masks
                outcome.model, outcome.masks = rebuild_for_export(
                    cfg, outcome.model, adapter, structure, outcome.masks, device, main
                )
        model, masks, state, plan, kept = outcome.model, outcome.masks, outcome.state, outcome.plan, outcome.kept
        with phases("cut"):
            soft_head, soft_ffn = masks.head.detach().clone(), masks.ffn.detach().clone()
            mass = {"head": cut_mass_share(soft_head, kept.head), "ffn": cut_mass_share(soft_ffn, kept.ffn)}
        ppl_before_cut = ppl(model, "before_cut")
        harden_(masks, kept)
        ppl_after_cut = ppl(model, "after_cut")
        probe = windows[:2, : min(cfg.seq_len, 64)]
        reference = masked_logits(model, probe)

        with phases("export"):
            masks.detach()
            base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
            deltas = (
                layer_deltas(base, adapter, structure.head, outcome.means, kept, outcome.compensation)
                if outcome.compensation
                else None
            )
            fold_and_slice_(base, adapter, structure.head, soft_head, soft_ffn, kept)
            # The fold is checked in fp32 (the model here is fp32: learned so, or rebuilt for the export):
            # merging LoRA and folding masks reorder fp32 sums; through SmolLM2's 30 layers (activation
            # outliers ~1e2) that measured up to 1.2e-4 of the largest logit (L0 masks, whose sampled gates
            # grow LoRA more). 1e-3 stays far below what a folding bug does (a wrong head or channel moves
            # logits by O(1)). Then the finished model is cast to the export dtype, saved, reloaded with
            # plain from_pretrained and compared with itself in memory.
            parity = verify_parity(base, probe, reference, tolerance=1e-3)
            if deltas is not None:  # after the parity check: the compensation changes the function on purpose
                add_biases_(base, adapter, deltas, outcome.compensation)
            edtype = _export_dtype(cfg, loaded.source_dtype)
            for (
                prm
            ) in base.parameters():  # parameters only: buffers (rotary inv_freq) stay as from_pretrained builds them
                prm.data = prm.data.to(edtype)
            base.config.dtype = edtype
            roundtrip = save_and_verify(base, tok, tmp, probe, masked_logits(base, probe), tolerance=1e-5)
        exported = count_parameters(base)
        if exported != plan.params + outcome.extra_params:
            raise MaskPruneError(
                "internal accounting error: exported parameter count differs from the plan",
                expected=str(plan.params + outcome.extra_params),
                found=str(exported),
            )
        ppl_exported = ppl(base, "exported")
        zs_exported = zeroshot(base, "exported")
        prunable_kept = structure.prunable_params - (structure.dense_params - exported)
        report.update(
            {
                "params": {
                    "dense": structure.dense_params,
                    "budget": budget,
                    "exported": exported,
                    "sparsity": 1 - exported / structure.dense_params,
                    "prunable_dense": structure.prunable_params,
                    "prunable_exported": prunable_kept,
                    "prunable_sparsity": 1 - prunable_kept / structure.prunable_params,
                    "budget_slack": budget - exported,
                },
                "shape": {
                    "num_hidden_layers": structure.num_layers,
                    "num_attention_heads": base.config.num_attention_heads,
                    "num_key_value_heads": base.config.num_key_value_heads,
                    "head_dim": base.config.head_dim,
                    "intermediate_size": base.config.intermediate_size,
                    "dense": {
                        "num_attention_heads": structure.head.num_attention_heads,
                        "num_key_value_heads": structure.head.num_key_value_heads,
                        "intermediate_size": structure.ffn.units_per_row,
                    },
                    "gqa_policy": cfg.gqa_policy,
                    "unit_layout": {
                        "head": {
                            "rows": structure.head.rows,
                            "units_per_row": structure.head.units_per_row,
                            "params_per_unit": structure.head.params_per_unit,
                        },
                        "ffn": {
                            "rows": 1,
                            "units_per_row": structure.ffn.units_per_row,
                            "params_per_unit": structure.ffn.params_per_unit,
                        },
                    },
                },
                "cut": plan.to_dict(),
                "split_search": outcome.split,
                "calibration": outcome.calibration,
                "bias_compensation": (
                    {
                        "o_proj": outcome.compensation.attn,
                        "down_proj": outcome.compensation.mlp,
                        "params": outcome.extra_params,
                        "protocol": "FLAP: mean calibration input of the cut units through o_proj / down_proj",
                    }
                    if outcome.compensation
                    else None
                ),
                "kept_units": kept.to_lists(),
                "method": cfg.method,
                "final_state": (
                    {"sigma": state.sigma, "y": state.y, "z": state.z, "steps": state.step}
                    if state is not None
                    else None
                ),
                "cut_mask_mass_share": mass,
                "masks": {"head": soft_head[:, :, :].tolist(), "ffn_summary": _summary(soft_ffn)},
                "perplexity": {
                    "protocol": "WikiText-2 raw test, non-overlapping windows, exp(mean NLL)",
                    "dense": ppl_dense,
                    "before_cut": ppl_before_cut,
                    "after_cut": ppl_after_cut,
                    "exported": ppl_exported,
                },
                "zeroshot": {"dense": zs_dense, "exported": zs_exported} if tasks else None,
                "parity": parity.to_dict(),
                "roundtrip": {**roundtrip.to_dict(), "dtype": str(edtype).replace("torch.", "")},
                "seconds": {**phases.seconds, "total": round(time.perf_counter() - t_start, 3)},
            }
        )
        (tmp / "maskprune_report.json").write_text(json.dumps(report, indent=1))
        torch.save({"head": soft_head, "ffn": soft_ffn}, tmp / "masks.pt")
        write_model_card(tmp, report)
        if cfg.report and cfg.method == "maskprune":  # the figures are of the learning run
            with phases("report"):
                make_report(tmp)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is complete; its checkpoints are spent
    log.info(
        "wrote %s: %d -> %d parameters (%.1f%% removed), %d heads / %d KV / FFN %d per layer",
        out,
        structure.dense_params,
        exported,
        100 * report["params"]["sparsity"],
        base.config.num_attention_heads,
        base.config.num_key_value_heads,
        base.config.intermediate_size,
    )
    report["out"] = str(out)
    return report


def _export_dtype(cfg: PruneConfig, source_dtype: torch.dtype | None) -> torch.dtype:
    """The saved checkpoint's dtype: ``auto`` is the dtype the source checkpoint declares (fp32 when it
    declares none or another), so a bf16 model comes out bf16 and an fp32 one fp32 whatever learning used."""
    if cfg.export_dtype == "auto":
        return source_dtype if source_dtype in DTYPES.values() else torch.float32
    return DTYPES[cfg.export_dtype]


def _summary(t: torch.Tensor) -> dict:
    flat = t.reshape(t.shape[0], -1)
    return {"mean_per_layer": flat.mean(1).tolist(), "frac_below_0.1_per_layer": (flat < 0.1).float().mean(1).tolist()}


def _check_budget(structure: Structure, budget: int, cfg: PruneConfig) -> None:
    if budget >= structure.dense_params:
        raise MaskPruneError(
            "the budget removes nothing",
            expected=f"fewer than the dense {structure.dense_params:,} parameters",
            found=f"{budget:,}",
            fix="raise --sparsity or lower --budget-params",
        )
    floor = structure.min_params()
    if budget < floor:
        raise MaskPruneError(
            "the budget is below what a layer-uniform cut can reach: it would remove every unit of "
            "a kind in every layer",
            expected=f"at least {floor:,} parameters (sparsity at most "
            f"{1 - floor / structure.dense_params:.3f}; embeddings and norms are not pruned)",
            found=f"{budget:,} ({1 - budget / structure.dense_params:.3f} sparsity)",
            fix="lower --sparsity",
        )


def machine_info(device: torch.device) -> dict:
    """Platform, versions, device and threads: recorded in every report and results file."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    try:
        import peft
        import transformers  # noqa: E401

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":  # pragma: no cover
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
