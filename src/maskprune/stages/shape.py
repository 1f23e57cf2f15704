"""The shape search: which whole-model shape a one-shot cut takes when ``prune_axes`` allows hidden width or
depth (docs/method.md, "The shape search").

Every candidate of :func:`maskprune.cut.candidate_shapes` (a share of the parameters to remove given to depth,
a share to hidden width) is emulated on the dense model by :mod:`maskprune.surgery` (the least important layers
passed through, the least important channels zeroed, :mod:`maskprune.axis_scores`), its heads and FFN channels cut
by the run's one-shot metric to the budget (every head/FFN split the budget allows when the split search is on),
and ranked by the KL of that cut model to the dense one on ``split_search_samples`` windows. The lowest wins, or,
with ``shape_trial_steps``, the best ``shape_finalists`` are each distilled that many steps and the lowest held-out
KL after it wins; the report carries every candidate's row.

Scored once: the metric's statistics (activations, or gradients) are measured in one pass over the dense model on
the cut's windows (``cut_samples``), the pass that also measures the hidden channels; every candidate's units
are scored from them over its kept channels, and the cut takes the winner's units, so the model ranked is the
model cut. Screened: every split of every candidate is first measured on the first ``shape_screen_samples``
windows; only those within ``shape_screen_margin`` times the lowest KL there are measured on the rest."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging

import torch
from tqdm.auto import tqdm

from ..axis_scores import (
    NormEnergies,
    fit_of_batches,
    fit_to,
    hidden_channel_params,
    layer_params,
    reference_and_layer_skip_kl,
    teacher_logits,
)
from ..baselines import BASELINES, LAYER_SCORERS, scoring_statistics
from ..config import DISTILL_SETTINGS
from ..cut import (
    CutPlan,
    KeptUnits,
    ShapeCandidate,
    best_layer_subsequence,
    candidate_shapes,
    candidate_splits,
    hard_masks,
    kept_indices,
    plan_cut,
)
from ..dtypes import autocast_dtype
from ..errors import MaskPruneError
from ..export import fold_and_slice_
from ..masks import MaskSet
from ..offload import held, home_device
from ..structure import Structure
from ..surgery import (
    canonical_layer_pattern,
    config_accepts,
    cut_parity,
    drop_layers_,
    emulated_cut,
    layer_pattern,
    rescale_norms_,
    residual_norm_modules,
    slice_hidden_,
)
from .context import RunContext
from .learned import build_learner

__all__ = ["ShapeChoice", "search_shape", "apply_shape_", "wants_shape_search"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ShapeChoice:
    """The chosen whole-model shape (layers and hidden channels kept), the head cut its best split takes, and
    the evidence: every candidate measured, the layers' and channels' scores, the surgery's parity."""

    keep_layers: list[int]
    keep_hidden: torch.Tensor
    k_head: int
    dense: dict  # the dense model's params, layers and hidden size
    candidates: list[dict]
    layer_kl: list[float] | None
    energies: list[torch.Tensor] | None = None  # per norm over the residual, its inputs' summed squares
    parity: float | None = None
    scores: tuple[torch.Tensor, torch.Tensor] | None = None  # the units' scores over the shape, per dense layer

    def cut_scores(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The head and FFN scores the shape was ranked with, for the model cut to it (its layers only): the cut
        keeps the units the ranking measured."""
        if self.scores is None:
            return None
        return self.scores[0][self.keep_layers], self.scores[1][self.keep_layers]

    def to_dict(self) -> dict:
        return {
            "dense": self.dense,
            "kept_layers": list(self.keep_layers),
            "hidden_size": int(self.keep_hidden.numel()),
            "head_units_cut_per_row": self.k_head,
            "candidates": self.candidates,
            "layer_skip_kl": self.layer_kl,
            "parity_max_rel_logit_diff": self.parity,
            "protocol": "each shape's heads/FFN cut by the one-shot metric (scored once, on the cut_samples "
            "windows) to the budget; KL to the dense model and the cut model's next-token NLL (nll; not used to "
            "rank) on the first split_search_samples calibration windows; screen_kl on the first "
            "shape_screen_samples of them, only the splits within shape_screen_margin times its lowest measured on "
            "the rest (kl null: screened out)",
        }


def wants_shape_search(axes: tuple[str, ...]) -> bool:
    return bool(set(axes) & {"hidden", "layers"})


@dataclasses.dataclass
class _Candidate:
    """One candidate shape under measurement: what it keeps, the head/FFN splits the budget allows on it (one row
    each in the report), and its units' scores (every dense layer's, over its kept channels) once scored."""

    keep_layers: list[int]
    keep_hidden: torch.Tensor
    splits: list[CutPlan]
    rows: list[dict]
    scores: tuple[torch.Tensor, torch.Tensor] | None = None
    screened: list[tuple[float, float]] | None = None  # (KL, NLL) of every split on the screening windows


def search_shape(ctx: RunContext) -> ShapeChoice:
    """Measure every candidate shape on the dense model of ``ctx``; the one with the lowest KL after its cut."""
    cfg, model, ad = ctx.cfg, ctx.loaded.model, ctx.adapter
    win = ctx.windows[: cfg.split_search_samples]
    autocast = autocast_dtype(cfg.dtype, ctx.device)
    n_layers, hidden = len(ad.layers(model)), int(model.config.hidden_size)
    axes = cfg.resolved_prune_axes()
    # a --keep-hidden the config refuses was refused before the run (stages.plan.check_request)
    with ctx.phases("shape_search"):
        reference, layer_kl, channels, energies, stats = _dense_facts(ctx, win, axes, autocast)
        shapes = candidate_shapes(
            removed=ctx.structure.dense_params - ctx.budget,
            num_layers=n_layers,
            hidden=hidden,
            layer_params=layer_params(model, ad),
            hidden_params=lambda layers: hidden_channel_params(model, ad, layers),
            axes=axes,
            hidden_multiple=cfg.hidden_multiple,
            hidden_ok=lambda width: config_accepts(model.config, hidden_size=width),
        )
        shapes = _fixed(shapes, cfg.keep_layers, cfg.keep_hidden, n_layers, hidden)
        rows, candidates = [], []
        twin = meta_twin(model, ad)
        for shape in shapes:
            keep_layers, keep_hidden = _keep(shape, layer_kl, channels, model.config)
            if keep_layers is None:  # no choice of layers keeps the family's per-layer pattern at this depth
                rows.append(_unmatched(shape, n_layers, keep_hidden))
                continue
            candidate = _candidate(ctx, twin, shape, keep_layers, keep_hidden)
            rows += candidate.rows
            if candidate.splits:
                candidates.append(candidate)
        _rank(ctx, candidates, win, reference, stats, energies, autocast)
        # a shape's best split stands for it
        ranked = [
            (min((r for r in c.rows if r["kl"] is not None), key=lambda r: r["kl"]), c)
            for c in candidates
            if any(r["kl"] is not None for r in c.rows)
        ]
        ranked.sort(key=lambda entry: entry[0]["kl"])
        best = ranked[0] if ranked else None
        if cfg.shape_trial_steps and len(ranked) > 1:
            best = _trials(ctx, ranked[: cfg.shape_finalists], energies)
    if best is None:
        raise _no_shape(cfg, rows)
    row, chosen = best
    log.info(
        "shape search: %s -> %d layers, hidden %d, %d head units cut per row (KL %.4f)",
        ", ".join(f"{r['layers']}L/{r['hidden_size']}h/{r['k_head']}: {r['kl']:.4f}" for r in rows if r["kl"]),
        len(chosen.keep_layers),
        chosen.keep_hidden.numel(),
        row["k_head"],
        row["kl"],
    )
    dense = {"params": ctx.structure.dense_params, "num_hidden_layers": n_layers, "hidden_size": hidden}
    lkl = layer_kl.tolist() if "layers" in axes else None
    return ShapeChoice(
        chosen.keep_layers, chosen.keep_hidden, row["k_head"], dense, rows, lkl, energies, scores=chosen.scores
    )


def _dense_facts(ctx: RunContext, win: torch.Tensor, axes, autocast) -> tuple:
    """``(reference logits, layer-skip KLs, channel scores, norm energies, metric statistics)``: what the search
    measures on the dense model, whatever the size; from the run's shared work where a run of the same model, data
    and settings measured them (:mod:`maskprune.shared`)."""
    cfg, model, ad = ctx.cfg, ctx.loaded.model, ctx.adapter
    bs, direction, n_layers = cfg.batch_size, cfg.kl_direction, len(ad.layers(model))
    ex, shared = ctx.passes, ctx.shared  # the dense model's facts: computed once per model, data and settings
    common = {"batch_size": bs, "dtype": cfg.dtype, "streamed": ex.streamed}
    if "layers" in axes:  # the dense logits from the skips' pass: its dense run is their shared prefix
        reference, layer_kl = shared.get(
            "reference_and_layer_skip_kl",
            {**common, "direction": direction},
            win,
            lambda: reference_and_layer_skip_kl(
                model, ad, win, bs, direction=direction, autocast=autocast, execution=ex
            ),
        )
    else:
        reference = shared.get(
            "reference_logits", common, win, lambda: teacher_logits(model, win, bs, autocast, execution=ex)
        )
        layer_kl = torch.zeros(n_layers)
    channels, energies, stats = shared.get(
        "dense_statistics",
        {**common, "method": cfg.method, "hidden": "hidden" in axes},
        ctx.windows[: cfg.resolved_cut_samples()],
        lambda: _dense_statistics(ctx, "hidden" in axes),
    )
    return reference, layer_kl, channels, energies, stats


def _dense_statistics(ctx: RunContext, hidden_axis: bool) -> tuple[torch.Tensor, list | None, dict | None]:
    """``(channel scores, norm energies, the metric's statistics)`` from one pass over the dense model on the cut's
    windows (``cut_samples``): the hidden channels' (where hidden is searched) and what the one-shot metric scores
    every candidate's units from (:func:`maskprune.baselines.scoring_statistics`)."""
    cfg, model, ad = ctx.cfg, ctx.loaded.model, ctx.adapter
    win = ctx.windows[: cfg.resolved_cut_samples()]
    watch = NormEnergies(model, ad) if hidden_axis else None
    try:
        stats = scoring_statistics(cfg.method, model, ad, win, cfg.batch_size, ctx.passes)
        if watch is not None and stats is None:  # a metric of the weights alone: the energies need their own pass
            ctx.passes.forward(model, ad, win, cfg.batch_size)
    finally:
        if watch is not None:
            watch.detach()
    if watch is None:
        return torch.ones(int(model.config.hidden_size)), None, stats
    channels, energies = watch.scores()
    return channels, energies, stats


def _screen_windows(cfg, n: int) -> int:
    """How many of the ``n`` ranking windows the screening pass measures (a whole number of batches); 0: no screening
    (off, or it would measure them all)."""
    if not cfg.shape_screen_samples:
        return 0
    bs = cfg.batch_size
    first = -(-cfg.shape_screen_samples // bs) * bs
    return first if first < n else 0


def _rank(ctx: RunContext, candidates: list[_Candidate], win, reference, stats, energies, autocast) -> None:
    """Each candidate's rows get their KL and NLL on ``win``. With screening (:func:`_screen_windows`), every split is
    first measured on the first windows (``screen_kl``); those within ``shape_screen_margin`` times the lowest there
    (and the best split of the best ``shape_finalists`` shapes where shape trials follow) are measured on the rest
    too, their KL and NLL the
    token-weighted means over all (what one pass over all the windows gives); the others keep ``kl`` None."""
    cfg = ctx.cfg
    bar = {"desc": "shape search", "disable": not log.isEnabledFor(logging.INFO)}
    first = _screen_windows(cfg, win.shape[0]) if candidates else 0
    if not first:
        for c in tqdm(candidates, **bar):
            for row, (kl, nll) in zip(c.rows, _measure(ctx, c, c.splits, win, reference, stats, energies, autocast)):
                row.update(kl=kl, nll=nll, windows=win.shape[0])
        return
    bs, n = cfg.batch_size, win.shape[0]
    head, rest = (win[:first], reference[: first // bs]), (win[first:], reference[first // bs :])
    for c in tqdm(candidates, desc="shape search (screen)", disable=bar["disable"]):
        c.screened = _measure(ctx, c, c.splits, *head, stats, energies, autocast)
        for row, (kl, _) in zip(c.rows, c.screened):
            row["screen_kl"] = kl
    floor = min(row["screen_kl"] for c in candidates for row in c.rows) * cfg.shape_screen_margin
    survivors = {id(row) for c in candidates for row in c.rows if row["screen_kl"] <= floor}
    bests = sorted((min(c.rows, key=lambda r: r["screen_kl"]) for c in candidates), key=lambda r: r["screen_kl"])
    survivors |= {id(row) for row in bests[: cfg.shape_finalists if cfg.shape_trial_steps else 1]}  # the trials'
    for c in tqdm(candidates, desc="shape search (measure)", disable=bar["disable"]):
        picked = [k for k, row in enumerate(c.rows) if id(row) in survivors]
        for k, row in enumerate(c.rows):
            if k not in picked:
                row.update(kl=None, nll=None, windows=first, note="screened out")
        if not picked:
            continue
        fits = _measure(ctx, c, [c.splits[k] for k in picked], *rest, stats, energies, autocast)
        for k, (kl, nll) in zip(picked, fits):
            kl0, nll0 = c.screened[k]  # equal windows: the token-weighted mean is the window-weighted one
            kl, nll = (kl0 * first + kl * (n - first)) / n, (nll0 * first + nll * (n - first)) / n
            c.rows[k].update(kl=kl, nll=nll, windows=n)


def _fixed(shapes: list[ShapeCandidate], layers: int | None, width: int | None, n_layers: int, hidden: int):
    """The candidates with the depth and / or width the user fixed (``keep_layers``, ``keep_hidden``): the
    searched ones that match, or that one shape alone."""
    if layers is None and width is None:
        return shapes
    if (layers is not None and layers > n_layers) or (width is not None and width > hidden):
        raise MaskPruneError(
            "keep_layers / keep_hidden cannot exceed the model's",
            expected=f"at most {n_layers} layers and {hidden} hidden channels",
            found=f"keep_layers {layers}, keep_hidden {width}",
        )
    drop = None if layers is None else n_layers - layers
    match = [s for s in shapes if drop in (None, s.drop_layers) and width in (None, s.hidden)]
    return match or [ShapeCandidate(drop or 0, width or hidden, None, None)]


def _keep(shape: ShapeCandidate, layer_kl: torch.Tensor, channels: torch.Tensor, config):
    """The layers and channels a shape keeps, in their original order: the channels with the highest scores; the
    layers with the highest skip-KL among the choices whose per-layer pattern (Gemma's sliding / global layers,
    SmolLM3's NoPE layers) is the one the family derives for the new depth, so engines that recompute the
    pattern from the layer index (llama.cpp) compute the same model. None for the layers where no choice has it."""
    n = layer_kl.numel()
    keep_hidden = torch.sort(channels, descending=True, stable=True).indices[: shape.hidden].sort().values
    if not shape.drop_layers:
        return list(range(n)), keep_hidden
    target = canonical_layer_pattern(config, n - shape.drop_layers)
    if target is None:
        order = torch.sort(layer_kl, descending=True, stable=True).indices[: n - shape.drop_layers]
        return sorted(order.tolist()), keep_hidden
    return best_layer_subsequence(layer_kl.tolist(), layer_pattern(config), target), keep_hidden


def _no_shape(cfg, rows: list[dict]) -> MaskPruneError:
    fixed = cfg.keep_layers is not None or cfg.keep_hidden is not None
    why = [
        f"{r['layers']} layers, hidden {r['hidden_size']}: "
        + (r.get("note") or ("removes more than the budget" if r["params"] else "leaves too little for heads and FFN"))
        for r in rows
    ]
    return MaskPruneError(
        "no candidate shape meets the parameter budget",
        found="; ".join(why),
        fix="keep more layers or hidden channels (--keep-layers / --keep-hidden)"
        if fixed
        else "ask for a lower --sparsity",
    )


def _unmatched(shape: ShapeCandidate, n_layers: int, keep_hidden: torch.Tensor) -> dict:
    return {
        "layers": n_layers - shape.drop_layers,
        "hidden_size": int(keep_hidden.numel()),
        "layer_share": shape.layer_share,
        "hidden_share": shape.hidden_share,
        "k_head": None,
        "k_ffn": None,
        "params": None,
        "kl": None,
        "note": "no choice of layers keeps the per-layer pattern the family derives for this depth",
    }


def _candidate(ctx: RunContext, twin, shape: ShapeCandidate, keep_layers, keep_hidden) -> _Candidate:
    """A candidate shape's splits (every head/FFN split the budget allows with the split search, else the run's head
    share), one report row each; none, with one row that says why, where the shape alone removes more than the
    budget or leaves too little for a head and a channel per layer. Its parameter counts come from ``twin``, the
    model on the meta device cut to the shape."""
    cfg = ctx.cfg
    s = reduced_structure(twin, ctx.adapter, keep_layers, keep_hidden, cfg.gqa_policy)
    base = {
        "layers": s.num_layers,
        "hidden_size": int(keep_hidden.numel()),
        "layer_share": shape.layer_share,
        "hidden_share": shape.hidden_share,
    }
    mult = {"head_multiple": cfg.head_multiple, "ffn_multiple": cfg.ffn_multiple}
    nothing = {**base, "k_head": None, "k_ffn": None, "params": None, "kl": None}
    none = _Candidate(keep_layers, keep_hidden, [], [nothing])
    if s.dense_params < ctx.budget:  # the shape alone removes more than asked: not comparable with the others
        none.rows[0]["params"] = s.dense_params
        return none
    try:
        if cfg.resolved_split_search():
            splits = candidate_splits(s, ctx.budget, **mult)
        else:
            splits = [plan_cut(s, sigma_head=cfg.head_cut_fraction, budget=ctx.budget, **mult)]
    except MaskPruneError:  # the shape alone leaves too little for one head and channel per layer
        return none
    rows = [{**base, "k_head": p.k_head, "k_ffn": p.k_ffn, "params": p.params, "kl": None} for p in splits]
    return _Candidate(keep_layers, keep_hidden, splits, rows)


def _measure(
    ctx: RunContext, c: _Candidate, splits: list[CutPlan], win, reference, stats, energies, autocast
) -> list[tuple[float, float]]:
    """``(KL, NLL)`` on ``win`` of candidate ``c`` cut by each of ``splits``: the dense model computes what the
    candidate's cut model would (:func:`emulated_shape`), so no copy of it is made. Its units are scored on first
    use from ``stats`` (the dense model's, :func:`_dense_statistics`) over its kept channels, and kept in ``c``."""
    cfg, model, ad = ctx.cfg, ctx.loaded.model, ctx.adapter
    ex, hidden = ctx.passes, (c.keep_hidden if c.keep_hidden.numel() < int(model.config.hidden_size) else None)
    dense = ctx.structure  # the candidate's heads and FFN channels per layer; its dropped layers pass through
    if c.scores is None and not (ex.streamed and cfg.method in LAYER_SCORERS):  # streamed: during each layer's turn
        c.scores = BASELINES[cfg.method][0](model, ad, dense, stats, hidden)
    with emulated_shape(model, ad, c.keep_layers, c.keep_hidden, energies):
        if ex.streamed:
            fits, c.scores = _splits_together(ctx, splits, win, reference, autocast, hidden, stats, c.scores)
            return fits
        head, ffn = c.scores
        masks = MaskSet(dense).to(ctx.device).attach(model)
        fits = []
        try:
            for p in splits:
                masks.set_values_("head", hard_masks(torch.ones_like(head), kept_indices(head, p.k_head)))
                masks.set_values_("ffn", hard_masks(torch.ones_like(ffn), kept_indices(ffn, p.k_ffn)))
                fits.append(
                    fit_to(
                        model,
                        win,
                        reference,
                        cfg.batch_size,
                        direction=cfg.kl_direction,
                        autocast=autocast,
                        execution=ex,
                    )  # fmt: skip
                )
        finally:
            masks.detach()
    return fits


@torch.no_grad()
def _splits_together(
    ctx: RunContext, splits, win, reference, autocast, hidden, stats, scores
) -> tuple[list[tuple[float, float]], tuple[torch.Tensor, torch.Tensor]]:
    """``(KL, NLL)`` of every split of one candidate in one streamed pass over the model emulating it, and the
    candidate's unit scores: at each layer (visited, read from disk, once) the layer is scored from ``stats`` where
    ``scores`` are not given yet (its weights in memory for its turn), and each split's model, its own hidden states
    carried from the layers before, runs with this layer's units cut by the scores. The KLs and NLLs are those of
    measuring each split in its own pass (``_measure``'s resident branch): a layer's units depend only on its own
    scores."""
    cfg, model, ad = ctx.cfg, ctx.loaded.model, ctx.adapter
    ex, s, bs = ctx.passes, ctx.structure, cfg.batch_size
    cast = torch.autocast(ex.device.type, dtype=autocast or torch.float32, enabled=autocast is not None)
    masks = MaskSet(s).to(ctx.device).attach(model)
    per_layer = []
    try:
        with cast:
            cut = [ex.capture(model, ad, win, bs)] * len(splits)  # each split's hidden states (alike until layer 0)
            for li, layer in enumerate(ad.layers(model)):
                with ex.onloaded(layer):
                    if scores is None:
                        head, ffn = LAYER_SCORERS[cfg.method](layer, ad, s, stats, li, hidden)
                    else:
                        head, ffn = scores[0][li], scores[1][li]
                    per_layer.append((head, ffn))
                    for k, p in enumerate(splits):
                        masks.head.data[li] = hard_masks(torch.ones_like(head), kept_indices(head[None], p.k_head)[0])
                        masks.ffn.data[li] = hard_masks(torch.ones_like(ffn), kept_indices(ffn[None], p.k_ffn)[0])
                        cut[k] = cut[k].advanced(layer, li)
                    masks.head.data[li] = 1.0
                    masks.ffn.data[li] = 1.0
            with held(ad.lm_head(model)):  # the head read once for every split
                fits = [
                    fit_of_batches(v.replay(model, ad, model, win, bs), win, reference, bs, direction=cfg.kl_direction)
                    for v in cut
                ]
    finally:
        masks.detach()
    return fits, (torch.stack([h for h, _ in per_layer]), torch.stack([f for _, f in per_layer]))


def meta_twin(model, adapter):
    """``model`` rebuilt from its config on PyTorch's meta device (shapes only, no storage): what a candidate
    shape's parameter counts are read from."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    adapter.unfuse_(twin)
    return twin


def reduced_structure(twin, adapter, keep_layers: list[int], keep_hidden: torch.Tensor, policy) -> Structure:
    """The structure of ``twin`` (:func:`meta_twin`) cut to a shape: a copy of it costs nothing."""
    reduced = copy.deepcopy(twin)
    reshape_(reduced, adapter, keep_layers, keep_hidden.cpu())
    return Structure.of(reduced, adapter, policy)


@contextlib.contextmanager
def emulated_shape(model, adapter, keep_layers: list[int], keep_hidden: torch.Tensor, energies):
    """The dense ``model`` computing what its cut to a shape computes, without a copy: the norms over the residual
    rescaled for the kept channels (:func:`rescale_norms_`; their weights put back on exit), then
    :func:`maskprune.surgery.emulated_cut` (dropped layers pass their input through, cut channels are zero, the
    norms normalise over the kept ones). The equality with the sliced model is :func:`apply_shape_`'s check."""
    narrower = keep_hidden.numel() < int(model.config.hidden_size)
    fewer = len(keep_layers) < len(adapter.layers(model))
    norms = residual_norm_modules(model, adapter) if narrower and energies is not None else []
    saved = [n.weight.detach().clone() for n in norms]
    try:
        if norms:
            rescale_norms_(model, adapter, energies, keep_hidden)
        with emulated_cut(
            model, adapter, keep_layers=keep_layers if fewer else None, keep_hidden=keep_hidden if narrower else None
        ):
            yield model
    finally:
        with torch.no_grad():
            for norm, weight in zip(norms, saved):
                norm.weight.copy_(weight)


def _trials(ctx: RunContext, finalists: list[tuple], energies) -> tuple:
    """The finalists each cut (sliced), distilled from the dense model for ``shape_trial_steps`` steps with the
    run's LoRA and loss, and scored by KL to the dense model on the held-out windows (the first
    ``split_search_samples`` calibration windows when the run holds none out); the one with the lowest wins.
    Each finalist's row gets ``trial_kl``."""
    cfg, dense = ctx.cfg, ctx.loaded.model
    held_out = ctx.val_windows if ctx.val_windows is not None else ctx.windows[: cfg.split_search_samples]
    trial_cfg = cfg.replace(
        **DISTILL_SETTINGS,
        teacher=cfg.model,
        steps=cfg.shape_trial_steps,
        val_every=cfg.shape_trial_steps,
        prune_axes=("heads", "ffn"),
        keep_hidden=None,
        keep_layers=None,
        reconstruct=False,
    )
    flags = [p.requires_grad for p in dense.parameters()]
    dense.requires_grad_(False)
    try:
        for row, candidate in tqdm(finalists, desc="shape trials", disable=not log.isEnabledFor(logging.INFO)):
            student = _sliced(ctx, row, candidate, energies)
            s = Structure.of(student, ctx.adapter, cfg.gqa_policy)
            build = build_learner(
                trial_cfg,
                model=student,
                adapter=ctx.adapter,
                structure=s,
                windows=ctx.windows,
                budget=s.dense_params,
                device=ctx.device,
                teacher=dense,
                val_windows=held_out,
            )
            for _ in range(cfg.shape_trial_steps):
                build.learner.step()
            row["trial_kl"] = build.learner.validate()["val_kl"]
            row["trial_held_out"] = ctx.val_windows is not None
            del build, student
    finally:
        for p, flag in zip(dense.parameters(), flags):
            p.requires_grad_(flag)
    log.info(
        "shape trials: %s", ", ".join(f"{r['layers']}L/{r['hidden_size']}h: {r['trial_kl']:.4f}" for r, *_ in finalists)
    )
    return min(finalists, key=lambda entry: entry[0]["trial_kl"])


def _sliced(ctx: RunContext, row: dict, c: _Candidate, energies):
    """A copy of the dense model cut to a candidate's shape and split (the units it was ranked with) and sliced."""
    cfg = ctx.cfg
    student = copy.deepcopy(ctx.loaded.model)
    reshape_(student, ctx.adapter, c.keep_layers, c.keep_hidden, energies)
    s = Structure.of(student, ctx.adapter, cfg.gqa_policy)
    head, ffn = c.scores[0][c.keep_layers], c.scores[1][c.keep_layers]
    kept = KeptUnits(kept_indices(head, row["k_head"]), kept_indices(ffn, row["k_ffn"]))
    fold_and_slice_(student, ctx.adapter, s.head, torch.ones_like(head), torch.ones_like(ffn), kept)
    return student


def reshape_(model, adapter, keep_layers: list[int], keep_hidden: torch.Tensor, energies=None) -> None:
    """Cut a shape in place: the norms rescaled for the kept channels (:func:`rescale_norms_`, with ``energies``),
    the layers it does not keep dropped, the hidden channels it does not keep sliced (no-ops where it keeps all)."""
    narrower = keep_hidden.numel() < int(model.config.hidden_size)
    if narrower and energies is not None:
        rescale_norms_(model, adapter, energies, keep_hidden)
    if len(keep_layers) < len(adapter.layers(model)):
        drop_layers_(model, adapter, keep_layers)
    if narrower:
        slice_hidden_(model, adapter, keep_hidden)


def apply_shape_(model, adapter, choice: ShapeChoice, probe: torch.Tensor, *, check: bool) -> None:
    """Cut ``model`` to the chosen shape in place; with ``check`` (an fp32 model), compare it with the model
    emulating the cut (norms rescaled, then :func:`emulated_cut`) on ``probe`` and record the largest relative
    logit difference in ``choice.parity``."""
    narrower = choice.keep_hidden.numel() < int(model.config.hidden_size)
    if narrower and choice.energies is not None:  # part of the cut: the emulation and the slice both see it
        rescale_norms_(model, adapter, choice.energies, choice.keep_hidden)
    reference = None
    if check:
        with (
            torch.no_grad(),
            emulated_cut(model, adapter, keep_layers=choice.keep_layers, keep_hidden=choice.keep_hidden),
        ):
            reference = model(input_ids=probe.to(home_device(model))).logits.float().cpu()
    reshape_(model, adapter, choice.keep_layers, choice.keep_hidden)  # the norms are rescaled already
    if reference is not None:
        choice.parity = cut_parity(reference, model, probe)
        if choice.parity > 1e-4:
            raise MaskPruneError(
                "internal error: the shape cut does not compute what its emulation does",
                found=f"largest relative logit difference {choice.parity:.2e}",
            )
