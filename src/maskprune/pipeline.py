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
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from . import __version__
from . import distributed as D
from .arch import count_parameters, get_adapter
from .baselines import activation_stats, input_means, unit_scores
from .checkpoint import config_fingerprint, list_checkpoints, load_latest, save_checkpoint
from .compensate import Parts, add_biases_, compensation_parts, extra_params, layer_deltas
from .config import PruneConfig
from .cut import CutPlan, candidate_splits, cut_mass_share, kept_indices, plan_cut
from .data import calibration_windows, wikitext2_test_text
from .errors import MaskPruneError
from .evaluate import perplexity, tokenize_windows
from .export import KeptUnits, fold_and_slice_, harden_, masked_logits, save_and_verify, select_units, verify_parity
from .learner import DTYPES, Learner, attach_lora, autocast_dtype, resolve_dtype
from .mask_optim import prior_masks
from .masks import MaskSet, Structure
from .modelcard import write_model_card
from .models import load_model
from .report import make_report
from .sequential import layerwise_scores
from .sinks import ExtraSinks
from .split import SplitResult, search_split
from .zeroshot import resolve_tasks, run_zeroshot

__all__ = ["prune", "check_output_path", "resolve_device"]

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MaskPruneError(f"device {name!r} is not available", fix="use --device cpu")
    return dev


def default_out(cfg: PruneConfig) -> Path:
    name = Path(cfg.model.rstrip("/")).name.replace(".gguf", "") or "model"
    tag = f"s{round(cfg.sparsity * 100)}" if cfg.budget_params is None else f"b{cfg.budget_params}"
    return Path("runs") / f"{name}-{tag}"


def check_output_path(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, exists (without --overwrite) or sits in a read-only folder."""
    if out.is_file():
        raise MaskPruneError(f"--out {str(out)!r} is a file", expected="a folder path", fix="choose another --out")
    if out.exists() and not overwrite:
        raise MaskPruneError(
            f"output folder {str(out)!r} already exists", fix="pass --overwrite to replace it, or choose another --out"
        )
    parent = out.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise MaskPruneError(
            f"cannot write the output folder {str(out)!r}",
            found=f"{str(probe)!r} is not a writable folder",
            fix="choose an --out in a writable location",
        )


@contextmanager
def _staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` on success, removed on failure."""
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.absolute().parent))
    try:
        yield tmp
        if out.exists() and overwrite:
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _Phases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        log.info("phase %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t, 3)


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
        _check_checkpoints(out, cfg)
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
    phases = _Phases()
    t_start = time.perf_counter()

    with phases("load"):
        wdtype = _weight_dtype(cfg)
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
    with _staging(out, cfg.overwrite) if main else contextlib.nullcontext(None) as tmp:
        metrics_path = ckpt_dir / "metrics.jsonl"
        if main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        if cfg.method == "maskprune":
            outcome = _learn_and_plan(
                cfg, model, adapter, structure, windows, budget, device, main, progress, phases, ckpt_dir, metrics_path
            )
            if not main:  # rank 0 alone cuts, exports, evaluates and writes
                log.info("rank %d done learning", D.rank())
                return {"rank": D.rank(), "final_state": outcome.state.to_dict()}
            shutil.copy2(metrics_path, tmp / "metrics.jsonl")
        else:
            outcome = _score_and_plan(cfg, model, adapter, structure, windows, budget, device, phases)
            if wdtype != torch.float32:  # fold and verify in fp32, as for the learned masks
                outcome.model, outcome.masks = _rebuild_for_export(
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


def _learn_and_plan(
    cfg: PruneConfig,
    model,
    adapter,
    structure: Structure,
    windows: torch.Tensor,
    budget: int,
    device: torch.device,
    main: bool,
    progress: bool,
    phases: "_Phases",
    ckpt_dir: Path,
    metrics_path: Path,
):
    """MaskPrune: LoRA + masks learned by the minimax loop; the cut plan from the learned s."""
    metrics_file = open(metrics_path if main else os.devnull, "a", encoding="utf-8")
    trackers = ExtraSinks(cfg.trackers if main else (), str(ckpt_dir / "tensorboard"), cfg.to_dict())
    try:
        prior = None
        if cfg.mask_init != "ones" and not cfg.resume:  # a resumed run takes its masks from the checkpoint
            with phases("prior"):
                prior = unit_scores(
                    cfg.mask_init, model, adapter, structure, windows[: cfg.prior_samples], batch_size=cfg.batch_size
                )
        if cfg.lora:
            model = attach_lora(
                model,
                cfg.lora_targets,
                rank=cfg.lora_rank,
                alpha=cfg.lora_alpha,
                adapter_names={r: getattr(adapter, f"{r}_name") for r in ("q", "k", "v", "o", "gate", "up", "down")},
            )
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        sharded = cfg.fsdp and D.world() > 1
        if sharded:
            D.shard_fsdp(model, adapter.layers(model))
        masks = MaskSet(structure, cfg.mask_type).to(device).attach(model)
        if prior is not None:
            for kind, scores in zip(("head", "ffn"), prior):
                masks.set_values_(kind, prior_masks(scores, cfg.mask_init_spread))
        split_path = ckpt_dir / "split_search.json"
        split: SplitResult | None = None
        if prior is not None and cfg.resolved_split_search():
            with phases("split"):
                split = _search_split(cfg, model, masks, structure, prior, windows, budget, device)
            if main:
                split_path.write_text(json.dumps(split.to_dict(), indent=1))
        bar = tqdm(total=cfg.steps, desc="learn masks", disable=not (progress and main), dynamic_ncols=True)

        learn_start = [time.perf_counter(), 0]

        def on_step(m: dict) -> None:
            metrics_file.write(json.dumps(m) + "\n")
            trackers.write(m)
            learn_start[1] += 1
            if cfg.compile and learn_start[1] == 3:  # the first steps compiled; time the next three
                learn_start[0] = time.perf_counter()
            if learn_start[1] == (6 if cfg.compile else 3):  # say up front how long this will take
                per_step = (time.perf_counter() - learn_start[0]) / 3
                remaining = per_step * (cfg.steps - m["step"] - 1)
                log.info(
                    "mask learning: %.1f s/step, about %.0f min left for %d steps (then cut, export, eval)",
                    per_step,
                    remaining / 60,
                    cfg.steps,
                )
            bar.update(1)
            if m["step"] % cfg.log_every == 0:
                bar.set_postfix(
                    loss=f"{m['loss']:.3f}",
                    s_head=f"{m['sigma_head']:.2f}",
                    s_ffn=f"{m['sigma_ffn']:.2f}",
                    y=f"{m['y']:.2g}",
                    z=f"{m['z']:.2g}",
                    size=f"{m['size_at_cut'] / 1e6:.1f}M/{budget / 1e6:.1f}M",
                )

        learner = Learner(model, masks, windows, cfg, budget, on_step=on_step)
        if split is not None:  # the run starts from the measured split (the freeze plans this head count)
            learner.state.sigma["head"] = split.best.k_head / structure.head.units_per_row
        if cfg.resume:
            _resume(learner, ckpt_dir, cfg, metrics_path if main else None, metrics_file)
            bar.update(learner.state.step)

        def write_checkpoint(lrn: Learner) -> None:
            state_dict = lrn.state_dict()  # every process: a collective when FSDP shards LoRA
            if not main:
                return
            metrics_file.flush()
            os.fsync(metrics_file.fileno())
            payload = {**state_dict, "config": config_fingerprint(cfg.to_dict()), "budget": budget}
            path = save_checkpoint(ckpt_dir, payload, lrn.state.step, cfg.keep_checkpoints)
            log.info("checkpoint %s", path)

        with phases("learn"), _stop_on_signals() as stop:
            state = learner.run(
                checkpoint=write_checkpoint, every=cfg.checkpoint_every, should_stop=lambda: stop["requested"]
            )
        bar.close()
    finally:
        metrics_file.close()
        trackers.close()
    masks.materialize_()  # L0 / polarization parameters -> their deterministic mask values
    if sharded or _weight_dtype(cfg) != torch.float32:
        model, masks = _rebuild_for_export(cfg, model, adapter, structure, masks, device, main)
    plan = plan_cut(
        structure,
        sigma_head=state.sigma["head"],
        budget=budget,
        head_multiple=cfg.head_multiple,
        ffn_multiple=cfg.ffn_multiple,
    )
    split_dict = json.loads(split_path.read_text()) if main and split_path.exists() else None
    return Outcome(model, masks, state, plan, select_units(masks, plan), split=split_dict)


def _search_split(
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


def _rebuild_for_export(
    cfg: PruneConfig, model, adapter, structure: Structure, masks: MaskSet, device: torch.device, main: bool
):
    """A fresh fp32 model for the cut and the export: base weights reloaded from the source in fp32, the
    learned LoRA (gathered whole when FSDP sharded it; every process takes part) and masks attached.

    Used when learning ran on half-precision or sharded weights: merging LoRA into bf16 weights rounds
    away most of its update (a LoRA delta is far below a bf16 weight's ulp) and SmolLM2's activation
    outliers turned that into logit errors of 5 on 36 (measured), so merge, fold and the parity check
    happen in fp32 and only the finished model is cast to ``export_dtype``. Sharded runs rebuild in host
    memory (the model needed sharding); others on ``device``. Other ranks get ``(None, masks)``."""
    lora = {n: D.full(p.detach()).float().cpu() for n, p in model.named_parameters() if "lora_" in n}
    if not main:
        return None, masks
    learned = {k: p.detach().float().cpu().clone() for k, p in masks.by_kind().items()}
    masks.detach()
    sharded = any(D.is_sharded(p) for p in model.parameters())
    del model
    where = torch.device("cpu") if sharded else device
    fresh = load_model(
        cfg.model, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code, device=where, dtype=torch.float32
    ).model
    if lora:
        fresh = attach_lora(
            fresh,
            cfg.lora_targets,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            adapter_names={r: getattr(adapter, f"{r}_name") for r in ("q", "k", "v", "o", "gate", "up", "down")},
        )
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


def _export_dtype(cfg: PruneConfig, source_dtype: torch.dtype | None) -> torch.dtype:
    """The saved checkpoint's dtype: ``auto`` is the dtype the source checkpoint declares (fp32 when it
    declares none or another), so a bf16 model comes out bf16 and an fp32 one fp32 whatever learning used."""
    if cfg.export_dtype == "auto":
        return source_dtype if source_dtype in DTYPES.values() else torch.float32
    return DTYPES[cfg.export_dtype]


def _weight_dtype(cfg: PruneConfig) -> torch.dtype:
    """Dtype of the frozen base weights while learning: ``auto`` is the autocast dtype (bf16 by default, on
    CPU and GPU alike: no per-forward cast of every frozen weight, half the memory; the export reloads the
    source in fp32 for the merge and the fold, see :func:`_rebuild_for_export`), fp32 when autocast is off."""
    if cfg.weight_dtype != "auto":
        return DTYPES[cfg.weight_dtype]
    return autocast_dtype(cfg.dtype) or torch.float32


def _score_and_plan(
    cfg: PruneConfig,
    model,
    adapter,
    structure: Structure,
    windows: torch.Tensor,
    budget: int,
    device: torch.device,
    phases: "_Phases",
):
    """A one-shot baseline: unit scores on the calibration windows, the same uniform cut (the head share
    ``head_cut_fraction``, or measured by the split search), FLAP's bias compensation where it applies."""
    calib = windows[: cfg.calib_samples]
    compensate = cfg.bias_compensation == "on" or (cfg.bias_compensation == "auto" and cfg.method == "flap")
    layerwise = cfg.resolved_layerwise_calibration()
    scores = stats = split = None
    sigma_head = cfg.head_cut_fraction
    if cfg.resolved_split_search() or not layerwise:  # the one-pass scores
        with phases("score"):
            stats = activation_stats(model, adapter, calib, cfg.batch_size) if compensate else None
            scores = unit_scores(cfg.method, model, adapter, structure, calib, batch_size=cfg.batch_size, stats=stats)
    masks = MaskSet(structure).to(device).attach(model)  # all ones: nothing to fold
    if cfg.resolved_split_search():
        with phases("split"):
            split = _search_split(cfg, model, masks, structure, scores, windows, budget, device)
        sigma_head = split.best.k_head / structure.head.units_per_row
    plan = plan_cut(
        structure, sigma_head=sigma_head, budget=budget, head_multiple=cfg.head_multiple, ffn_multiple=cfg.ffn_multiple
    )
    parts, extra = Parts(False, False), 0
    if compensate:
        parts = compensation_parts(cfg.bias_compensation, cfg.method, adapter, plan)
        for _ in range(3):  # the biases' own parameters come out of the budget (they depend on the kept counts)
            extra = extra_params(structure, model.config, adapter, parts, plan) if parts else 0
            replanned = plan_cut(
                structure,
                sigma_head=plan.k_head / structure.head.units_per_row,
                budget=budget - extra,
                head_multiple=cfg.head_multiple,
                ffn_multiple=cfg.ffn_multiple,
            )
            replanned = dataclasses.replace(replanned, budget=budget)
            if replanned == plan:
                break
            plan = replanned
        extra = extra_params(structure, model.config, adapter, parts, plan) if parts else 0
    if layerwise:
        with phases("score_layerwise"):
            *scores, stats = layerwise_scores(
                cfg.method, model, adapter, structure, masks, plan, calib, batch_size=cfg.batch_size, compensate=parts
            )
    kept = KeptUnits(kept_indices(scores[0], plan.k_head), kept_indices(scores[1], plan.k_ffn))
    return Outcome(
        model,
        masks,
        None,
        plan,
        kept,
        split=split.to_dict() if split is not None else None,
        compensation=parts,
        means=input_means(stats) if parts else None,
        extra_params=extra,
        calibration="layerwise" if layerwise else "one-pass",
    )


def checkpoint_dir(out: Path) -> Path:
    """Where a run keeps its checkpoints and metrics until it completes: ``<out>.checkpoints``."""
    return out.with_name(out.name + ".checkpoints")


def _check_checkpoints(out: Path, cfg: PruneConfig) -> None:
    """Refuse to silently mix runs: resume needs a checkpoint, a fresh run needs none (or --overwrite)."""
    ckpt_dir = checkpoint_dir(out)
    found = list_checkpoints(ckpt_dir)
    if cfg.resume and not found:
        raise MaskPruneError(
            f"--resume: no checkpoint in {str(ckpt_dir)!r}",
            fix="run without --resume to start, or pass the same --out as the interrupted run",
        )
    if not cfg.resume and ckpt_dir.exists():
        if not cfg.overwrite:
            raise MaskPruneError(
                f"an earlier, unfinished run left checkpoints in {str(ckpt_dir)!r}",
                fix="pass --resume to continue it, or --overwrite to start over",
            )
        shutil.rmtree(ckpt_dir)


def _resume(learner: Learner, ckpt_dir: Path, cfg: PruneConfig, metrics_path: Path | None, metrics_file) -> None:
    loaded = load_latest(ckpt_dir)
    if loaded is None:
        raise MaskPruneError(
            f"--resume: every checkpoint in {str(ckpt_dir)!r} is unreadable", fix="pass --overwrite to start over"
        )
    payload, path = loaded
    mine, theirs = config_fingerprint(cfg.to_dict()), payload.get("config", {})
    # a key the checkpoint does not know was added to maskprune since; it matches if left at its default
    defaults = config_fingerprint(PruneConfig().to_dict())
    theirs = {**{k: defaults[k] for k in mine if k not in theirs and k in defaults}, **theirs}
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        raise MaskPruneError(
            "--resume: the configuration differs from the interrupted run's",
            found=", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in diff),
            fix="resume with the same settings, or --overwrite to start over",
        )
    learner.load_state_dict(payload)
    step = learner.state.step
    if metrics_path is None:
        return
    # keep the metrics of the steps the checkpoint covers, drop any written after it
    metrics_file.flush()
    lines = metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] < step]
    metrics_file.seek(0)
    metrics_file.truncate()
    metrics_file.writelines(kept)
    log.info("resumed from %s at step %d", path.name, step)


@contextmanager
def _stop_on_signals() -> Iterator[dict]:
    """SIGINT / SIGTERM ask the learner to checkpoint and stop after the current step."""
    flag = {"requested": False}

    def handler(signum, _frame) -> None:
        if flag["requested"]:  # a second signal: stop now
            raise KeyboardInterrupt
        flag["requested"] = True
        log.warning("signal %d: writing a checkpoint after this step, then stopping", signum)

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


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
