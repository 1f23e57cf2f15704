"""Importance of the whole-model axes: each decoder layer (depth) and each hidden channel (width of the residual
stream), measured on calibration windows; and what one unit of each costs in parameters.

- A layer's score is the KL of the model's next-token distribution with that layer skipped (its input passed
  through) to the dense one: what removing it alone costs, measured on the output, as ShortGPT / Minitron's
  depth ablations do (a cosine between a layer's input and output is cheaper but blind to the head).
- A hidden channel's score aggregates the activations of every norm over the residual stream (Minitron's
  embedding-channel importance): per norm, the channel's RMS output over all tokens divided by the norm's mean
  RMS, summed over the norms (each norm weighs alike whatever its scale).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import DecoderAdapter, count_parameters
from .losses import KLDirection, kl_divergence, summed_nll
from .offload import held
from .passes import Execution, resident
from .surgery import INPUT_ROLES, OUTPUT_ROLES, residual_norm_modules

__all__ = [
    "kl_to",
    "fit_to",
    "fit_of_batches",
    "hidden_channel_scores",
    "NormEnergies",
    "layer_skip_kl",
    "reference_and_layer_skip_kl",
    "teacher_logits",
    "layer_params",
    "hidden_channel_params",
]

log = logging.getLogger(__name__)


@torch.no_grad()
def teacher_logits(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    autocast: torch.dtype | None,
    *,
    execution: Execution | None = None,
) -> list:
    """The model's logits on ``windows`` batch by batch (bf16 on the host: a reference to compare cuts with).
    ``execution``: where the pass runs (default: resident on the model's device)."""
    from .arch import adapter_for

    execution = execution or resident(model)
    passes = execution.logits(model, adapter_for(model), windows, batch_size, autocast=autocast)
    return [logits.to(torch.bfloat16).cpu() for _, logits in passes]


@torch.no_grad()
def kl_to(
    model: nn.Module,
    windows: torch.Tensor,
    reference: list,
    batch_size: int,
    *,
    direction: KLDirection,
    autocast: torch.dtype | None,
    execution: Execution | None = None,
) -> float:
    """Mean per-token KL between ``model``'s distribution and ``reference`` (from :func:`teacher_logits`)."""
    return fit_to(
        model, windows, reference, batch_size, direction=direction, autocast=autocast, nll=False, execution=execution
    )[0]


@torch.no_grad()
def fit_to(
    model: nn.Module,
    windows: torch.Tensor,
    reference: list,
    batch_size: int,
    *,
    direction: KLDirection,
    autocast: torch.dtype | None,
    nll: bool = True,
    execution: Execution | None = None,
) -> tuple[float, float | None]:
    """From one forward: the mean per-token KL to ``reference`` (:func:`teacher_logits`) and, with ``nll``, the
    mean next-token NLL of ``model`` on ``windows`` themselves (what perplexity measures, where the KL also weighs
    the reference's whole distribution). ``execution``: where the pass runs (default: resident)."""
    from .arch import adapter_for

    execution = execution or resident(model)
    ctx = torch.autocast(execution.device.type, dtype=autocast or torch.float32, enabled=autocast is not None)
    with ctx:
        batches = execution.logits(model, adapter_for(model), windows, batch_size, autocast=autocast)
        return fit_of_batches(batches, windows, reference, batch_size, direction=direction, nll=nll)


def fit_of_batches(
    batches, windows: torch.Tensor, reference: list, batch_size: int, *, direction: KLDirection, nll: bool = True
) -> tuple[float, float | None]:
    """:func:`fit_to` from ``(batch index, logits)`` pairs already computed (a pass's, or a streamed replay's): the
    mean per-token KL to ``reference`` and, with ``nll``, the mean next-token NLL on ``windows``."""
    kl, summed, tokens, targets = 0.0, 0.0, 0, 0
    for j, student in batches:
        device = student.device
        batch = windows[j * batch_size : (j + 1) * batch_size].to(device)
        kl += float(kl_divergence(student, reference[j].to(device), direction=direction)) * batch.numel()
        tokens += batch.numel()
        if nll:
            flat = student[:, :-1].reshape(-1, student.shape[-1])
            summed += float(summed_nll(flat, batch[:, 1:].reshape(-1)))
            targets += flat.shape[0]
    return kl / max(1, tokens), (summed / max(1, targets) if nll else None)


def layer_skip_kl(
    model: nn.Module,
    adapter: DecoderAdapter,
    windows: torch.Tensor,
    reference: list,
    batch_size: int,
    *,
    direction: KLDirection = "teacher_student",
    autocast: torch.dtype | None = None,
    execution: Execution | None = None,
) -> torch.Tensor:
    """``[L]``: the KL to ``reference`` (the dense logits) with each layer skipped alone (higher = keep), every skip in
    one pass sharing the dense prefix (:func:`_layer_skip_kl_together`), resident or streamed."""
    ex = execution or resident(model)
    return _layer_skip_kl_together(model, adapter, windows, reference, batch_size, direction, autocast, ex)[0]


def reference_and_layer_skip_kl(
    model: nn.Module,
    adapter: DecoderAdapter,
    windows: torch.Tensor,
    batch_size: int,
    *,
    direction: KLDirection = "teacher_student",
    autocast: torch.dtype | None = None,
    execution: Execution | None = None,
) -> tuple[list, torch.Tensor]:
    """``(the dense logits per batch, as :func:`teacher_logits` gives them; the layer-skip KLs to them)`` from one
    pass: the dense model's own run through the layers is the skips' shared prefix, so its logits cost a head, not
    a forward."""
    ex = execution or resident(model)
    kls, reference = _layer_skip_kl_together(model, adapter, windows, None, batch_size, direction, autocast, ex)
    return reference, kls


@torch.no_grad()
def _layer_skip_kl_together(
    model: nn.Module, adapter: DecoderAdapter, windows, reference: list | None, batch_size: int, direction, autocast, ex
) -> tuple[torch.Tensor, list]:
    """:func:`layer_skip_kl` in one pass: each layer is visited (read from disk, where it waits there) once and runs
    on the dense hidden states and on those of every model that skipped an earlier layer; the model that skips
    layer ``i`` starts from layer ``i``'s inputs (a skipped layer passes its input through), so the dense prefix is
    shared. Layer runs fall from ``L`` passes of ``L`` layers to ``L (L + 1) / 2``, layer reads to ``L``; the
    variants' hidden states are held at once (``L`` times a pass's). The same numbers as skipping each layer in its
    own pass (tested): every layer runs on the same batches and inputs. Returns ``(KLs, reference)``; where
    ``reference`` is None it is the dense run's own logits (bf16 on the host, as :func:`teacher_logits`)."""
    layers = adapter.layers(model)
    cast = torch.autocast(ex.device.type, dtype=autocast or torch.float32, enabled=autocast is not None)
    with cast:
        dense = ex.capture(model, adapter, windows, batch_size)
        skipped: list = []  # skipped[i]: the model without layer i, carried to the layer visited now
        bar = tqdm(layers, desc="layer importance", disable=not log.isEnabledFor(logging.INFO))
        for li, layer in enumerate(bar):
            with ex.onloaded(layer):
                for k, v in enumerate(skipped):  # in place: each variant's last states freed once carried on
                    skipped[k] = v.advanced(layer, li)
                following = dense.advanced(layer, li)
            skipped.append(dataclasses.replace(dense, layer=li + 1))  # layer li's input, passed through
            dense = following
        scores = []
        with held(adapter.lm_head(model)):  # the head read once for every variant
            if reference is None:
                reference = [
                    logits.to(torch.bfloat16).cpu()
                    for _, logits in dense.replay(model, adapter, model, windows, batch_size)
                ]
            tuple_output = dense.tuple_output
            del dense  # the dense states go before the variants' logits
            for v in skipped:
                v.tuple_output = tuple_output
                replayed = v.replay(model, adapter, model, windows, batch_size)
                scores.append(
                    fit_of_batches(replayed, windows, reference, batch_size, direction=direction, nll=False)[0]
                )
    return torch.tensor(scores), reference


class NormEnergies:
    """Forward hooks on every norm over the residual stream (:func:`maskprune.surgery.residual_norm_modules` order)
    that sum, per channel, the squares of each norm's input and output over the tokens of the passes they watch:
    what :func:`hidden_channel_scores` ranks the channels by. Attach, run passes, :meth:`detach`, read
    :meth:`scores`."""

    def __init__(self, model: nn.Module, adapter: DecoderAdapter) -> None:
        self.hidden = int(model.config.hidden_size)
        norms = residual_norm_modules(model, adapter)
        self.out_sq = [torch.zeros(self.hidden, dtype=torch.float64) for _ in norms]
        self.in_sq = [torch.zeros(self.hidden, dtype=torch.float64) for _ in norms]
        self._handles = [n.register_forward_hook(self._hook(k)) for k, n in enumerate(norms)]

    def _hook(self, k: int):
        def fn(_m, args, out):
            self.out_sq[k] += out.detach().double().pow(2).reshape(-1, self.hidden).sum(0).cpu()
            self.in_sq[k] += args[0].detach().double().pow(2).reshape(-1, self.hidden).sum(0).cpu()

        return fn

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def scores(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``([hidden], energies)``: per channel, the sum over the norms of the channel's RMS output relative to the
        norm's mean channel RMS (higher = keep); per norm, the summed square of each input channel (what
        :func:`maskprune.surgery.rescale_norms_` needs)."""
        rms = torch.stack(self.out_sq).sqrt()  # [norms, hidden] (the token count is common and cancels)
        return (rms / rms.mean(dim=1, keepdim=True).clamp_min(1e-30)).sum(0).float(), self.in_sq


@torch.no_grad()
def hidden_channel_scores(
    model: nn.Module,
    adapter: DecoderAdapter,
    windows: torch.Tensor,
    batch_size: int,
    *,
    execution: Execution | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:meth:`NormEnergies.scores` of one pass over ``windows``: per channel its score over the norms (higher =
    keep), per norm its inputs' summed squares."""
    watch = NormEnergies(model, adapter)
    try:
        (execution or resident(model)).forward(model, adapter, windows, batch_size)
    finally:
        watch.detach()
    return watch.scores()


def layer_params(model: nn.Module, adapter: DecoderAdapter) -> int:
    """Parameters of one decoder layer (all layers of a supported family have the same)."""
    return count_parameters(adapter.layers(model)[0])


def hidden_channel_params(model: nn.Module, adapter: DecoderAdapter, num_layers: int | None = None) -> int:
    """Parameters one hidden channel owns in a model of ``num_layers`` layers (default: the model's): its
    embedding column (and the LM head's, untied), the final norm's entry, and per layer the columns of every
    projection reading the residual, the rows of every projection writing it and the norms' entries."""
    hidden = int(model.config.hidden_size)
    emb, head = adapter.embedding(model), adapter.lm_head(model)
    total = emb.weight.shape[0] + (head.weight.shape[0] if head is not None and head.weight is not emb.weight else 0)
    total += _norm_entries(adapter.final_norm(model))
    layer = adapter.layers(model)[0]
    per_layer = sum(adapter.proj(layer, r).weight.shape[0] for r in INPUT_ROLES)
    for r in OUTPUT_ROLES:
        lin = adapter.proj(layer, r)
        per_layer += lin.weight.shape[1] + (1 if getattr(lin, "bias", None) is not None else 0)
    per_layer += sum(_norm_entries(n) for _, n in adapter.residual_norms(layer, hidden))
    return total + per_layer * (len(adapter.layers(model)) if num_layers is None else num_layers)


def _norm_entries(norm: nn.Module) -> int:
    return sum(1 for name in ("weight", "bias") if getattr(norm, name, None) is not None)
