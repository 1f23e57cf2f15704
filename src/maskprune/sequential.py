"""Layer-by-layer calibration of the activation metrics (Wanda-sp, FLAP), as their reference code does.

One pass over the calibration windows scores every layer on the activations of the *dense* model. The
reference implementations of Wanda-sp and FLAP instead prune one layer at a time: layer ``l`` is scored
on the inputs that the already pruned layers ``0 .. l-1`` produce (and, for FLAP, with their bias
compensation in place), its units are cut, and its outputs become the next layer's inputs. The later
layers then see the distribution they will see after the export.

Cost: two forwards of every layer over the calibration windows (one to score, one to propagate), i.e.
about two model forwards, plus the first layer's inputs held in memory (``windows x seq_len x hidden``
in the model's dtype: 75 MB for 256 x 128 tokens of SmolLM2 in fp32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import DecoderAdapter
from .baselines import LAYER_SCORERS, watch_inputs
from .compensate import Parts, layer_delta
from .cut import CutPlan, hard_masks, kept_indices
from .masks import MaskSet
from .offload import held, home_device
from .passes import Execution, LayerInputs, layer_output, patched_forward, resident
from .structure import Structure

log = logging.getLogger(__name__)

__all__ = ["layerwise_scores", "reconstruct_layerwise_", "reconstruct_to_dense_"]


@torch.no_grad()
def layerwise_scores(
    method: str,
    model: nn.Module,
    adapter: DecoderAdapter,
    structure: Structure,
    masks: MaskSet,
    plan: CutPlan,
    windows: torch.Tensor,
    *,
    batch_size: int,
    compensate: Parts = Parts(False, False),
    execution: Execution | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Scores of ``method`` (wanda-sp or flap) for every layer, each on the inputs of the already cut prefix.

    Layer ``l`` is scored, its lowest ``plan.k_head`` / ``plan.k_ffn`` units per row are cut through
    ``masks`` (attached to ``model``; set back to 1 at the end) and, with ``compensate``, its cut units' mean
    contribution is added back, before its outputs feed layer ``l + 1``. Returns head scores ``[L, rows,
    U_h]``, FFN scores ``[L, 1, U_f]`` and the activation statistics they came from (per-layer token
    counts), from which :func:`maskprune.baselines.input_means` gives the compensation's means. ``execution``:
    where the pass runs (default: resident on the model's device). Long because score, cut and propagate must
    happen per layer in one loop, with every hook removed in one finally."""
    scorer = LAYER_SCORERS[method]
    execution = execution or resident(model)
    stats: dict = {"sum": {}, "sumsq": {}, "count": {}}
    heads, ffns, bias_hooks = [], [], []
    try:
        for li, layer, inputs in execution.layerwise(model, adapter, windows, batch_size, f"{method} layer by layer"):
            stats["count"][li] = 0

            handles = watch_inputs(stats, adapter, layer, li)
            try:
                inputs.run(layer, li)
                stats["count"][li] += sum(h.shape[0] * h.shape[1] for h in inputs.hidden)
            finally:
                for h in handles:
                    h.remove()
            h_score, f_score = scorer(layer, adapter, structure, stats, li)
            heads.append(h_score)
            ffns.append(f_score)
            kept_h = kept_indices(h_score[None], plan.k_head)[0]  # [rows, U_h - k]
            kept_f = kept_indices(f_score[None], plan.k_ffn)[0]  # [1, U_f - k]
            masks.head.data[li] = hard_masks(torch.ones_like(h_score), kept_h).to(masks.head.device)
            masks.ffn.data[li] = hard_masks(torch.ones_like(f_score), kept_f).to(masks.ffn.device)
            if compensate:
                bias_hooks += _compensation_hooks(layer, adapter, structure, stats, li, kept_h, kept_f, compensate)
            inputs.advance_(layer, li)
    finally:
        for h in bias_hooks:
            h.remove()
        masks.head.data.fill_(1.0)
        masks.ffn.data.fill_(1.0)
    return torch.stack(heads), torch.stack(ffns), stats


def _compensation_hooks(layer, adapter, structure, stats, li, kept_h, kept_f, parts: Parts) -> list:
    """Forward hooks that add the cut units' mean contribution to o_proj / down_proj outputs of this layer."""
    n = stats["count"][li]
    means = {r: stats["sum"][(li, r)] / n for r in ("o", "down")}
    deltas = layer_delta(layer, adapter, structure.head, means, kept_h, kept_f, parts)

    def add(delta):
        def fn(_m, _args, out):
            return out + delta.to(out.dtype)

        return fn

    return [adapter.proj(layer, role).register_forward_hook(add(delta)) for role, delta in deltas.items()]


@torch.no_grad()
def reconstruct_layerwise_(
    model: nn.Module,
    adapter: DecoderAdapter,
    layout,
    kept,
    windows: torch.Tensor,
    *,
    batch_size: int,
    ridge: float,
    execution: Execution | None = None,
) -> dict:
    """Re-fit, layer by layer on the inputs of the already cut (and re-fit) prefix, the kept input columns of every
    o_proj and down_proj (:func:`maskprune.reconstruct.refit_kept_columns`): o_proj first, then down_proj on the
    inputs the re-fit attention gives, then the layer's outputs feed the next layer. ``model`` carries hard masks
    (attached, cut units at 0) and fp32 weights, changed in place. Returns the report's account: the relative
    output error of each projection before and after the fit, per layer.

    Passes per layer, where what they keep fits ``MERGE_BYTES`` each (probed once per run on the first layer's first
    batch, :func:`_probe`; else as in brackets): one to o_proj's input, which keeps that input (the attention's
    context); one whole, for down_proj's Gram, whose attention is replayed from the kept context through the re-fit
    o_proj (the context does not depend on o_proj: the queries, keys, values and scores are not computed again)
    [the attention computed again]; and, where down_proj's output is added to the layer's output times a constant
    ``c`` (1, or Granite's ``residual_multiplier``), none more: that pass keeps the kept down_proj inputs ``a_K``
    and the outputs, and the next layer's inputs are the outputs plus ``c (W'_K - W_K) a_K`` (the same hidden states
    as running the re-fit layer again, up to fp32 rounding) [a third pass, its attention replayed too]."""
    from .reconstruct import refit_with_errors

    def fit_(proj, grams: list, cols: torch.Tensor, role: str) -> torch.Tensor:
        """Re-fit ``proj``'s kept columns in place; returns the change ``W'_K - W_K``."""
        fitted, before, after = refit_with_errors(proj.weight, grams, cols, ridge)  # lets the Gram go first
        errors[f"{role}_before"].append(before)
        errors[f"{role}_after"].append(after)
        change = fitted - proj.weight[:, cols]
        proj.weight[:, cols] = fitted
        return change

    execution = execution or resident(model)
    errors: dict[str, list] = {"o_before": [], "o_after": [], "down_before": [], "down_after": []}
    probe: _Probe | None = None  # the family's layers share it: probed on the first
    for li, layer, inputs in execution.layerwise(model, adapter, windows, batch_size, "reconstruct layer by layer"):
        calls = inputs.calls(li)
        o_proj, down = adapter.proj(layer, "o"), adapter.proj(layer, "down")
        device = o_proj.weight.device
        if probe is None:
            (h, *rest), kwargs = calls[0]
            probe = _probe(layer, adapter, ((h.to(device), *rest), kwargs))
        tokens = sum(args[0].shape[:-1].numel() for args, _ in calls)
        q_keep, _ = layout.kept_heads(kept.head[li])
        o_cols, d_cols = layout.columns(q_keep).to(device), kept.ffn[li, 0].to(device)
        replay = probe.attention is not None and tokens * o_proj.weight.shape[1] * 4 <= MERGE_BYTES
        contexts: list[torch.Tensor] | None = [] if replay else None
        fit_(o_proj, [_input_gram(layer, o_proj, calls, contexts=contexts)], o_cols, "o")
        merged = _Outputs() if probe.scale is not None and tokens * d_cols.numel() * 4 <= MERGE_BYTES else None
        with _replayed(adapter.attn(layer), o_proj, contexts, probe.attention):
            change = fit_(down, [_input_gram(layer, down, calls, keep=d_cols, outputs=merged)], d_cols, "down")
            if merged is None:
                inputs.advance_(layer, li)
        del contexts
        if merged is not None:
            delta = change.T * probe.scale  # [|K|, out]
            outs = [h + (a @ delta).reshape(h.shape).to(h.dtype) for h, a in zip(merged.hidden, merged.kept)]
            inputs.carried_(outs, li, merged.tuple_output)
            del merged, outs
    return {
        "protocol": "ridge re-fit of the kept o_proj / down_proj columns to the uncut outputs, layer by layer on "
        "the cut prefix; error = |W'_K a_K - W a|^2 / |W a|^2 on the calibration windows",
        "ridge": ridge,
        "windows": int(windows.shape[0]),
        "relative_error": errors,
    }


@dataclasses.dataclass(frozen=True)
class _Probe:
    """How a family's decoder layer is wired, for the re-fit: ``scale``, the constant down_proj's output reaches the
    layer's output times (None: not linearly, a norm between); ``attention``, how many outputs the attention module
    returns beside o_proj's (-1: o_proj's output alone; None: its output is not o_proj's, it is not replayed)."""

    scale: float | None
    attention: int | None


def _probe(layer: nn.Module, adapter: DecoderAdapter, call) -> _Probe:
    """:class:`_Probe` of ``layer`` on one call: down_proj's scale (:func:`_output_scale`); the attention replayed
    from o_proj's input (:func:`_replayed`) must give the layer's output exactly as the attention computed."""
    args, kwargs = call
    attn, o_proj = adapter.attn(layer), adapter.proj(layer, "o")
    seen: dict = {"ctx": []}
    handles = [
        o_proj.register_forward_pre_hook(lambda _m, a: seen["ctx"].append(a[0].detach().clone()), prepend=True),
        attn.register_forward_hook(lambda _m, _a, out: seen.__setitem__("out", out)),
    ]
    try:
        reference = layer_output(layer(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    out = seen.get("out")
    extra = len(out) - 1 if isinstance(out, tuple) else -1
    attention = None
    if len(seen["ctx"]) == 1 and out is not None:
        with _replayed(attn, o_proj, seen["ctx"], extra):
            replayed = layer_output(layer(*args, **kwargs))
        attention = extra if torch.equal(replayed, reference) else None
    return _Probe(_output_scale(layer, adapter.proj(layer, "down"), call), attention)


@contextlib.contextmanager
def _replayed(attn: nn.Module, o_proj: nn.Module, contexts: list[torch.Tensor] | None, extra: int | None):
    """While open, ``attn``'s forward is o_proj (as it is now, with its hooks) on the kept ``contexts``, one per call
    in turn (every pass calls the layer on the batches in order), followed by ``extra`` Nones where the module
    returns more (its attention weights: the decoder layers discard them); nothing changes where ``contexts`` is
    None."""
    if contexts is None or extra is None:
        yield
        return
    turn = [0]

    def forward(*_args, **_kwargs):
        ctx = contexts[turn[0] % len(contexts)]
        turn[0] += 1
        out = o_proj(ctx.to(o_proj.weight.device))
        return out if extra < 0 else (out, *([None] * extra))

    with patched_forward(attn, forward):
        yield


class _Seen(Exception):
    """Raised by a hook once it has what it needs from a layer's forward: the rest of the layer need not run."""


MERGE_BYTES = 1 << 30
"""The most bytes, each, of what the re-fit keeps of a layer over every calibration token (fp32): o_proj's inputs, to
replay the attention, and the kept down_proj inputs, to carry the layer on without a third run
(:func:`reconstruct_layerwise_`); above it, that part is computed again."""


class _Outputs:
    """What a down_proj Gram pass that runs the whole layer keeps: per batch, the layer's outputs and the kept
    columns of down_proj's input (fp32, ``[tokens, |K|]``)."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []
        self.tuple_output = False


def _input_gram(
    layer: nn.Module,
    proj: nn.Module,
    calls: list,
    *,
    keep: torch.Tensor | None = None,
    outputs: _Outputs | None = None,
    contexts: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``sum_t a(t) a(t)^T`` of ``proj``'s input over the calibration calls, before any mask (float64). Each call's
    product is taken in the input's float dtype (at least fp32: on a CPU 2-3 times the float64 rate; a sum over one
    batch's tokens) and summed over the calls in float64; the layer stops at ``proj``'s input, unless ``outputs`` is
    given: then the layer runs whole and ``outputs`` gets its outputs and the input's ``keep`` columns. ``contexts``:
    gets each call's whole input (uncut)."""
    width = proj.weight.shape[1]
    gram = torch.zeros(width, width, dtype=torch.float64, device=proj.weight.device)

    def hook(_m, args):
        if contexts is not None:
            contexts.append(args[0].detach().clone())
        x = _at_least_fp32(args[0].detach().reshape(-1, width))
        add_gram_(gram, x)
        if outputs is None:
            raise _Seen
        outputs.kept.append(x[:, keep])

    handle = proj.register_forward_pre_hook(hook, prepend=True)  # before the mask hook: the uncut input
    try:
        for args, kwargs in calls:
            with contextlib.suppress(_Seen):
                out = layer(args[0].to(proj.weight.device), *args[1:], **kwargs)
                if outputs is not None:
                    outputs.tuple_output = isinstance(out, tuple)
                    outputs.hidden.append(layer_output(out))
    finally:
        handle.remove()
    return mirror_(gram)


PRODUCT_ROWS = 1024
"""Rows of a moment accumulated at once (:func:`add_product_`)."""


def add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a^T b`` (``acc`` float64 ``[m, n]``, ``a`` ``[t, m]``, ``b`` ``[t, n]``): the product in ``a``'s dtype
    (fp32 runs 2-3 times the float64 rate on a CPU), ``PRODUCT_ROWS`` rows of ``acc`` at a time, so what is alive
    beside ``acc`` is one block of the product and of its float64 cast, never the whole product (for an 8B model's
    down_proj, a 14336 x 14336 fp32 product and its float64 cast are 2.5 GB)."""
    for i in range(0, acc.shape[0], PRODUCT_ROWS):
        acc[i : i + PRODUCT_ROWS] += a[:, i : i + PRODUCT_ROWS].T @ b


GRAM_BLOCK = 256
"""Rows of a Gram's block row accumulated at once (:func:`add_gram_`)."""


def add_gram_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """The upper block triangle of ``acc`` (float64 ``[n, n]``) ``+= x^T x`` (``x`` ``[t, n]``): each block row of
    ``GRAM_BLOCK`` rows from its diagonal block on, in ``x``'s dtype, so a symmetric Gram costs about half the product
    (for SmolLM2's down_proj at 256-row blocks, 58 % of it). :func:`mirror_` fills the blocks below the diagonal
    once the sum is complete."""
    for i in range(0, acc.shape[0], GRAM_BLOCK):
        acc[i : i + GRAM_BLOCK, i:] += x[:, i : i + GRAM_BLOCK].T @ x[:, i:]


def mirror_(acc: torch.Tensor) -> torch.Tensor:
    """``acc`` accumulated by :func:`add_gram_`, its blocks below the diagonal set from those above (in place, a
    block at a time); returns it."""
    for i in range(0, acc.shape[0], GRAM_BLOCK):
        acc[i + GRAM_BLOCK :, i : i + GRAM_BLOCK] = acc[i : i + GRAM_BLOCK, i + GRAM_BLOCK :].T
    return acc


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@torch.no_grad()
def reconstruct_to_dense_(
    model: nn.Module,
    dense: nn.Module,
    adapter: DecoderAdapter,
    layout,
    kept,
    windows: torch.Tensor,
    *,
    keep_layers: list[int],
    keep_hidden: torch.Tensor,
    batch_size: int,
    ridge: float,
) -> dict:
    """The cross-model re-fit: like :func:`reconstruct_layerwise_`, but the targets are the *dense* model's, run
    alongside on the same windows, so the fit also corrects the drift of the cut prefix and what a hidden or
    depth cut changed. ``model`` is the cut model (its layers the dense ``keep_layers``, its residual the dense
    channels ``keep_hidden``; hard masks attached, fp32), ``dense`` the uncut one (fp32; consumed: its layers run
    in place). Student layer ``j`` (dense layer ``d``):

    - o_proj is fit to dense layer ``d``'s o_proj outputs (the kept channels);
    - down_proj, where it writes straight into the layer's output (probed: an offset added to its output comes
      out unchanged), is fit so the layer's output matches the dense residual stream where the next kept layer
      reads it: layer ``d``'s output and the contributions of every dropped layer after it; elsewhere (Gemma's
      norm after the FFN) to dense layer ``d``'s down_proj outputs.

    Returns the report's account: each projection's relative error to its targets before and after the fit."""
    inputs = resident(model).capture(model, adapter, windows, batch_size)
    ref = resident(dense).capture(dense, adapter, windows, batch_size)
    dense_layers = adapter.layers(dense)
    device = home_device(model)
    keep_hidden = keep_hidden.to(device)
    errors: dict[str, list] = {"o_before": [], "o_after": [], "down_before": [], "down_after": []}
    targets: list[str] = []
    done = 0  # dense layers whose outputs ``ref`` holds
    layers = adapter.layers(model)
    bar = tqdm(layers, desc="reconstruct to the dense model", disable=not log.isEnabledFor(logging.INFO))
    for j, layer in enumerate(bar):
        d = keep_layers[j]
        following = keep_layers[j + 1] if j + 1 < len(keep_layers) else len(dense_layers)
        ref = _advance(dense_layers, range(done, d), ref)
        outs, straight, ref = _dense_outputs(dense_layers[d], d, adapter, ref, keep_hidden)
        done = d + 1
        if straight:  # the residual where the next kept layer reads it, past every dropped layer
            ref = _advance(dense_layers, range(done, following), ref)
            done = following

            def target(i, down_out, layer_out, _r=ref):
                return _r.hidden[i].to(layer_out.device)[..., keep_hidden] - (layer_out - down_out)

        else:

            def target(i, _down_out, _layer_out, _y=outs["down"]):
                return _y[i]

        with held(layer):  # where the weights wait on disk: read after the dense layers let go, re-fit, written
            q_keep, _ = layout.kept_heads(kept.head[j])
            o_proj, down = adapter.proj(layer, "o"), adapter.proj(layer, "down")
            o_cols = layout.columns(q_keep).to(device)
            calls = inputs.calls(j)
            o_target = _inputs_only(lambda i, _proj_out, _layer_out, y=outs["o"]: y[i])
            _fit_(o_proj, layer, calls, o_cols, o_target, ridge, errors, "o")
            _fit_(down, layer, inputs.calls(j), kept.ffn[j, 0].to(device), target, ridge, errors, "down")
            targets.append("residual" if straight else "projection")
            inputs.advance_(layer, j)
    return {
        "protocol": "ridge re-fit of the kept o_proj / down_proj columns to the dense model's outputs, layer by "
        "layer on the cut prefix (down_proj to the dense residual stream past any dropped layers where it writes "
        "the residual directly); error = |W'_K a_K - y|^2 / |y|^2 on the calibration windows",
        "target": "dense",
        "down_targets": targets,
        "ridge": ridge,
        "windows": int(windows.shape[0]),
        "relative_error": errors,
    }


def _advance(layers, indices, inputs: LayerInputs) -> LayerInputs:
    """``inputs`` carried through the dense ``layers[i]`` for ``i`` in ``indices``."""
    for i in indices:
        with held(layers[i]):
            inputs = inputs.advanced(layers[i], i)
    return inputs


def _dense_outputs(
    layer, li: int, adapter: DecoderAdapter, inputs: LayerInputs, keep_hidden: torch.Tensor
) -> tuple[dict, bool, LayerInputs]:
    """Dense ``layer``'s (the dense model's layer ``li``) o_proj and down_proj outputs on each batch (the kept
    channels), whether its down_proj writes the layer's output unchanged (:func:`_writes_layer_output`: a property
    of the family's layer, the same for its cut twin), and its outputs as the next layer's inputs."""
    outs: dict[str, list] = {"o": [], "down": []}

    def keep(role: str):
        return lambda _m, _a, out: outs[role].append(out[..., keep_hidden])

    with held(layer):
        straight = _writes_layer_output(layer, adapter.proj(layer, "down"), inputs.calls(li)[0])
        handles = [adapter.proj(layer, role).register_forward_hook(keep(role)) for role in ("o", "down")]
        try:
            nxt = inputs.advanced(layer, li)
        finally:
            for h in handles:
                h.remove()
    return outs, straight, nxt


def _writes_layer_output(layer, proj, call) -> bool:
    """Whether ``proj``'s output is added unchanged to ``layer``'s output (no norm or scale after it): an offset
    added to the projection's output must come out of the layer as it went in."""
    scale = _output_scale(layer, proj, call)
    return scale is not None and abs(scale - 1.0) <= 1e-3


def _output_scale(layer, proj, call) -> float | None:
    """``c`` where ``proj``'s output reaches ``layer``'s output as ``c`` times itself, added (1: unchanged; Granite's
    ``residual_multiplier``), None where something else comes between (a norm): an offset added to the
    projection's output must come out of the layer as ``c`` times the offset."""
    args, kwargs = call
    base = layer_output(layer(*args, **kwargs))
    offset: list[torch.Tensor] = []

    def add(_m, _a, out):
        wave = torch.cos(torch.arange(out.numel(), device=out.device, dtype=out.dtype)).reshape(out.shape)
        offset.append(wave * out.abs().mean().clamp_min(1e-3))  # deterministic: the run's RNG stays untouched
        return out + offset[0]

    handle = proj.register_forward_hook(add)
    try:
        moved = layer_output(layer(*args, **kwargs))
    finally:
        handle.remove()
    if moved.shape != offset[0].shape:
        return None
    delta, wave = (moved - base).double(), offset[0].double()
    scale = float((delta * wave).sum() / (wave * wave).sum())
    if abs(scale) < 1e-6 or (delta - scale * wave).abs().max() > 1e-3 * abs(scale) * wave.abs().max():
        return None
    return scale


def _fit_(proj, layer, calls: list, cols: torch.Tensor, target, ridge: float, errors: dict, role: str) -> None:
    """Accumulate the kept inputs' Gram and cross moments with ``target(i, proj_out, layer_out)`` over the calls,
    re-fit ``proj``'s kept columns in place and record its error before and after. Each call's products are taken in
    fp32 and summed in float64 (:func:`_input_gram`); where the target needs neither the projection's output nor the
    layer's (``target.inputs_only``), the layer stops at the projection's input."""
    from .reconstruct import refit_to_targets, target_error

    k = cols.numel()
    gram = torch.zeros(k, k, dtype=torch.float64, device=cols.device)
    cross = torch.zeros(proj.weight.shape[0], k, dtype=torch.float64, device=cols.device)
    sq = torch.zeros((), dtype=torch.float64, device=cols.device)
    seen: dict[str, torch.Tensor] = {}
    inputs_only = getattr(target, "inputs_only", False)

    def grab_in(_m, args):
        seen["a"] = args[0].detach()
        if inputs_only:
            raise _Seen

    def grab_out(_m, _a, out):
        seen["y"] = out.detach()

    handles = [proj.register_forward_pre_hook(grab_in, prepend=True), proj.register_forward_hook(grab_out)]
    try:
        for i, (args, kwargs) in enumerate(calls):
            out = None
            with contextlib.suppress(_Seen):
                out = layer_output(layer(*args, **kwargs))
            a = _at_least_fp32(seen["a"][..., cols].reshape(-1, k))
            y = target(i, seen.get("y"), out).reshape(-1, cross.shape[0])
            y = y.to(a.dtype)
            add_gram_(gram, a)
            add_product_(cross, y, a)
            sq += (y.double() ** 2).sum()
    finally:
        for h in handles:
            h.remove()
    mirror_(gram)
    kept_weight = proj.weight[:, cols]
    fitted = refit_to_targets(kept_weight, gram, cross, ridge)
    errors[f"{role}_before"].append(target_error(kept_weight, gram, cross, float(sq)))
    errors[f"{role}_after"].append(target_error(fitted, gram, cross, float(sq)))
    proj.weight[:, cols] = fitted.to(proj.weight.dtype)


def _inputs_only(fn):
    """Mark a target of :func:`_fit_` that reads neither the projection's output nor the layer's."""
    fn.inputs_only = True
    return fn
