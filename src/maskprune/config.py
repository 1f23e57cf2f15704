"""One typed, validated configuration for a run, in groups.

Each concern is one frozen dataclass that validates itself: what is cut and how much (:class:`CutConfig`), how
the learned selection is made (:class:`SelectionConfig`), distillation and LoRA (:class:`TrainingConfig`), the
calibration data (:class:`DataConfig`), the runtime (:class:`RuntimeConfig`), the evaluation
(:class:`EvalConfig`), the output (:class:`OutputConfig`) and the model itself (:class:`SourceConfig`).
:class:`PruneConfig` holds one of each and the rules that span groups. A field's help text is its metadata
(``--help`` shows it). Keys are flat and unique across groups, so a YAML file may list them flat (every
existing file) or under their group's name; command-line flags are the flat keys.

Values come from defaults, then a YAML file (``--config``), then command-line flags. Unknown keys
and values of the wrong type are errors, and every problem is reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import yaml

from .arch import ROLES
from .errors import MaskPruneError
from .llamacpp import GGUF_TYPES

log = logging.getLogger("maskprune")

__all__ = [
    "PruneConfig",
    "cut_first_config",
    "SourceConfig",
    "CutConfig",
    "SelectionConfig",
    "TrainingConfig",
    "DataConfig",
    "RuntimeConfig",
    "EvalConfig",
    "OutputConfig",
    "GROUPS",
    "GROUP_OF",
    "load_config",
    "DEFAULT_MODEL",
    "PAPER_RECIPE",
    "DISTILL_SETTINGS",
    "PRUNE_ONLY",
    "DISTILL_ONLY",
    "distill_overrides",
    "prune_overrides",
    "options_help",
    "is_switch",
    "field_hint",
]

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MINUTES = 10.0
"""The time budget of a run that distils with a fixed selection where no step count is given (``minutes``)."""

DEFAULT_TEACHER_TOPK = 256
"""The teacher's top-k a distillation of logits alone keeps where ``teacher_topk`` is not given (at most the
vocabulary; 0: the full vocabulary). Measured at equal tokens against the full vocabulary (SmolLM2-135M at 20 %, 3
seeds, perplexity and accuracy; ``bench/teacher_topk.py``, docs/results.md): 256 holds quality within the seed
spread (its top 256 hold ~93 % of the teacher's probability there), 64 (~86 %) was worse in every pair."""

DISTILL_SETTINGS: dict[str, Any] = {
    "method": "maskprune",
    "mask_init": "ones",
    "freeze_share": 0.0,
    "split_search": False,
}
"""What ``maskprune distill`` (and prune's recovery after the cut, whatever method cut) sets: the learner runs
and the student's structure is kept as it is (every unit, masks at 1, frozen), so every step is distillation of
its weights."""


def options_help(exclude: frozenset[str] = frozenset()) -> str:
    """Every option by group with its default and help: the API's docstrings (``help(maskprune.prune)``)."""
    lines = []
    for name, cls in GROUPS.items():
        lines.append(f"{name} ({' '.join(cls.__doc__.split())})")
        for f in dataclasses.fields(cls):
            if f.name not in exclude:
                text = " ".join(f.metadata.get("help", "").replace("``", "`").split())
                lines.append(f"    {f.name} = {f.default!r}: {text}")
    return "\n".join(lines)


def _opt(default: Any, help: str, *, only: str | None = None) -> Any:
    """A config field with its help text (shown by ``--help``) as metadata; ``only``: the one command
    (``prune`` or ``distill``) that takes it."""
    return dataclasses.field(default=default, metadata={"help": " ".join(help.split()), "only": only})


class _Group:
    """What every group has: its own checks and a plain mapping of its values."""

    ONLY: ClassVar[str | None] = None  # the one command whose options the whole group is

    def problems(self) -> list[str]:
        """Every range or consistency problem within the group (empty: valid)."""
        return []

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)
        }


def is_switch(hint: Any) -> bool:
    """Whether a field of type ``hint`` is an on/off switch (``bool``, or ``bool | None`` where unset is the
    default): a ``--x`` / ``--no-x`` flag, ``x=True`` / ``x=False`` in the API."""
    return hint is bool or set(typing.get_args(hint)) == {bool, type(None)}


def field_hint(name: str) -> Any:
    """The type of the flat key ``name``."""
    return typing.get_type_hints(GROUPS[GROUP_OF[name]])[name]


def _at_least_one(group: _Group, names: tuple[str, ...]) -> list[str]:
    return [f"{n} must be >= 1, found {getattr(group, n)}" for n in names if getattr(group, n) < 1]


def _non_negative(group: _Group, names: tuple[str, ...]) -> list[str]:
    return [
        f"{n} must be a finite number >= 0, found {v}"
        for n in names
        if not ((v := getattr(group, n)) >= 0.0 and math.isfinite(v))
    ]


@dataclass(frozen=True)
class SourceConfig(_Group):
    """The model to prune (or the student to distil) and, for ``distill``, its teacher."""

    model: str = _opt(
        DEFAULT_MODEL,
        """Local HF folder, hub id, ``.gguf`` file, or ``smollm2-135m`` (the embedded default).""",
    )
    gguf_file: str | None = _opt(
        None,
        """GGUF file name inside ``model`` when ``model`` is a folder or hub repo holding GGUF files.""",
    )
    teacher: str | None = _opt(
        None,
        """``maskprune distill``: the dense model the student (``model``, a pruned checkpoint) is distilled from:
    a folder, hub id, GGUF file or ``smollm2-135m``. Its tokenizer and family must match the student's.""",
        only="distill",
    )
    teacher_gguf_file: str | None = _opt(
        None,
        """GGUF file name inside ``teacher`` when ``teacher`` is a folder or hub repo holding GGUF files.""",
        only="distill",
    )
    trust_remote_code: bool = _opt(
        False,
        """Allow model code from the hub (off: only stock transformers classes run).""",
    )

    @property
    def has_teacher(self) -> bool:
        """A ``maskprune distill`` run: no cut, the student learns from a separate teacher."""
        return self.teacher is not None


PRUNE_AXES: tuple[str, ...] = ("heads", "ffn", "hidden", "layers")
"""The axes a cut may shrink (``prune_axes``)."""


@dataclass(frozen=True)
class CutConfig(_Group):
    """What is cut and how much: the budget, the unit kinds and their rounding, the one-shot method, how the
    budget is split between heads and FFN channels, and FLAP's compensation."""

    ONLY: ClassVar[str | None] = "prune"

    sparsity: float | None = _opt(
        0.2,
        """Target share of all parameters removed, 1 - M_pruned / M_dense, in (0, 1).""",
    )
    budget_params: int | None = _opt(
        None,
        """Absolute parameter budget; overrides ``sparsity`` when given.""",
    )
    method: Literal["maskprune", "magnitude", "taylor", "wanda-sp", "flap"] = _opt(
        "maskprune",
        """``maskprune``: the recipe's selection (by default a one-shot Wanda-sp prior, fixed at step 0, then every
    step distils the pruned structure; ``--recipe paper`` learns the masks), or a one-shot metric alone through
    the same uniform cut (add ``--recover-steps`` to distil after it).""",
    )
    gqa_policy: Literal["query", "kv_group"] = _opt(
        "query",
        """GQA unit: one query head per KV group (``query``) or a whole KV group (``kv_group``).""",
    )
    prune_axes: tuple[str, ...] | None = _opt(
        None,
        """What the cut may shrink, among heads, ffn, hidden (the residual stream's width: embeddings, norms, every
    projection's input or output side, the LM head) and layers (whole decoder layers). With hidden or layers the
    shape is searched (docs/method.md, "The shape search"): candidate shapes that give part of the budget to
    depth and to width, each ranked by the KL of its cut model to the dense one; ffn always fills the rest.
    Hidden and layers apply to a cut made before training (the default recipe, which cuts first, and
    ``--method`` baselines). null (default): all four where the default recipe cuts first, heads and ffn
    elsewhere (the baselines as published; the masked path cuts heads and ffn only).""",
    )
    hidden_multiple: int = _opt(
        8,
        """Round the kept hidden width to a multiple of this (a hidden cut only).""",
    )
    shape_trial_steps: int = _opt(
        0,
        """Steps of a short distillation of each of the ``shape_finalists`` best-ranked shapes, the winner then
    chosen by held-out KL after it (Minitron: rankings before training can mislead). 0 (default): the KL right
    after the cut decides.""",
    )
    shape_finalists: int = _opt(
        3,
        """How many of the best-ranked shapes the short distillation compares (with ``shape_trial_steps`` > 0).""",
    )
    keep_hidden: int | None = _opt(
        None,
        """Hidden width to keep, instead of searching it (needs hidden in ``prune_axes``; heads and FFN channels
    fill the rest of the budget).""",
    )
    keep_layers: int | None = _opt(
        None,
        """Decoder layers to keep (the most important by skip-KL), instead of searching the depth (needs layers in
    ``prune_axes``).""",
    )
    head_multiple: int = _opt(
        1,
        """Round the kept head count (per KV group under ``query``) to a multiple of this.""",
    )
    ffn_multiple: int = _opt(
        1,
        """Round the kept FFN width to a multiple of this (8 or 64 for fast kernels).""",
    )
    head_cut_fraction: float = _opt(
        0.0,
        """Share of head units cut per row where the split is neither searched nor learned (FFN channels fill
    the rest of the budget): ``--method`` baselines, and the learned method with ``--no-split-search`` (its
    start; the paper's recipe moves it).""",
    )
    split_search: bool | None = _opt(
        None,
        """Choose how the cut divides the budget between heads and FFN channels by measurement: cut the
    one-shot order's lowest units at every head count the budget allows (FFN channels fill the rest) and
    keep the split whose cut model has the lowest KL to the dense one on ``split_search_samples`` windows
    (docs/method.md). null (default): on for the learned method with a one-shot prior (``mask_init`` not
    ``ones``), off for ``--method`` baselines (they cut ``head_cut_fraction``) and the paper's recipe
    (it learns the split).""",
    )
    split_search_samples: int = _opt(
        4,
        """Calibration windows (the first ones) the split search measures each candidate split on.""",
    )
    shape_screen_samples: int = _opt(
        1,
        """Windows (the first of the ``split_search_samples``) on which the shape search first measures every split
    of every candidate shape; only those within ``shape_screen_margin`` times the lowest KL there are measured on
    the rest, and rank. 0: every split on every window.""",
    )
    shape_screen_margin: float = _opt(
        1.5,
        """How far above the lowest screening KL a split may be and still be measured on every window (a ratio,
    >= 1; docs/method.md, "The shape search", says what it was checked on).""",
    )
    layerwise_calibration: bool | None = _opt(
        None,
        """Score ``wanda-sp`` / ``flap`` one layer at a time on the inputs of the already cut (and compensated)
    layers before it, as their reference code does, instead of in one pass over the dense model. null
    (default): on for those two ``--method`` baselines.""",
    )
    cut_samples: int | None = _opt(
        None,
        """Calibration windows (the first ones) that choose and fit a one-shot cut: the unit scores, the shape
    search's channel scores and the re-fit's Gram matrices (a few hundred suffice; training may use many more).
    null: ``calib_samples``, at most 256 (128k tokens at the default 512-token windows); where the default recipe
    cuts first, ``prior_samples``, as the masked path scores its prior.""",
    )
    reconstruct: bool | None = _opt(
        None,
        """After a one-shot cut, re-fit the kept columns of every o_proj and down_proj by ridge regression to the
    uncut layer's outputs, layer by layer on the cut prefix, over the calibration windows (docs/method.md, "A
    reconstructed cut"). Replaces FLAP's bias compensation (off when this is on). null (default): on where the
    default recipe cuts first (measured: 22 % lower perplexity before training at 20 %, 5 % after equal steps),
    off for ``--method`` baselines (they run as published unless ``--reconstruct`` asks).""",
    )
    reconstruct_target: Literal["self", "dense"] = _opt(
        "self",
        """What the re-fit reproduces: each projection's own uncut outputs on the cut prefix (``self``), or the
    dense model's, run alongside (``dense``: also corrects the cut prefix's drift and, where down_proj writes the
    residual stream directly, the residual a hidden or depth cut changed, dropped layers' contributions
    included; holds an fp32 copy of the dense model while it fits). One-shot cuts only.""",
    )
    reconstruct_ridge: float = _opt(
        1e-2,
        """Ridge of the re-fit, relative to the mean squared kept input (larger: closer to the original weights).""",
    )
    bias_compensation: Literal["auto", "on", "off"] = _opt(
        "auto",
        """FLAP's bias compensation for one-shot baselines: the mean calibration input of every cut channel and
    head, through o_proj / down_proj, becomes a bias of those projections (the export sets the config's
    ``attention_bias`` / ``mlp_bias``, which also gives q/k/v and gate/up zero biases; they count in the
    budget). ``auto``: on for ``--method flap`` where the architecture's stock config can hold those biases;
    ``on``: every one-shot method (an error where the config cannot hold them); ``off``: never.""",
    )

    def budget_for(self, dense_params: int) -> int:
        """The parameter budget of a model of ``dense_params``: ``budget_params``, else the sparsity's share."""
        if self.budget_params is not None:
            return int(self.budget_params)
        assert self.sparsity is not None
        return int(math.floor(dense_params * (1.0 - self.sparsity)))

    def resolved_layerwise_calibration(self) -> bool:
        """``layerwise_calibration``, or its default: on for the wanda-sp and flap baselines."""
        if self.layerwise_calibration is not None:
            return self.layerwise_calibration
        return self.method in ("wanda-sp", "flap")

    def problems(self) -> list[str]:
        problems = _at_least_one(
            self, ("head_multiple", "ffn_multiple", "hidden_multiple", "split_search_samples", "shape_finalists")
        )
        if self.budget_params is None:
            if self.sparsity is None or not (0.0 < self.sparsity < 1.0):
                problems.append(
                    f"sparsity must be in (0, 1) (the share of parameters removed), "
                    f"found {self.sparsity!r}: pass e.g. --sparsity 0.5"
                )
        elif self.budget_params <= 0:
            problems.append(f"budget_params must be a positive parameter count, found {self.budget_params}")
        if self.shape_screen_samples < 0:
            problems.append(f"shape_screen_samples must be >= 0 (0: no screening), found {self.shape_screen_samples}")
        if not self.shape_screen_margin >= 1.0:
            problems.append(f"shape_screen_margin must be a ratio >= 1, found {self.shape_screen_margin}")
        if self.cut_samples is not None and self.cut_samples < 1:
            problems.append(f"cut_samples must be a positive window count, found {self.cut_samples}")
        if self.shape_trial_steps < 0:
            problems.append(f"shape_trial_steps must be >= 0, found {self.shape_trial_steps}")
        axes = PRUNE_AXES if self.prune_axes is None else self.prune_axes  # null: checked once resolved
        for key, axis in (("keep_hidden", "hidden"), ("keep_layers", "layers")):
            value = getattr(self, key)
            if value is not None and (value < 1 or axis not in axes):
                problems.append(f"{key} must be a positive count with {axis} in prune_axes, found {value}")
        unknown = [a for a in axes if a not in PRUNE_AXES]
        if unknown or "ffn" not in axes:
            problems.append(
                f"prune_axes must be among {','.join(PRUNE_AXES)} and include ffn (it fills the budget), found "
                f"{','.join(axes) or 'none'}: e.g. --prune-axes heads,ffn,hidden,layers"
            )
        if not 0.0 <= self.head_cut_fraction < 1.0:
            problems.append(
                f"head_cut_fraction must be in [0, 1) (of each row's head units), found {self.head_cut_fraction}"
            )
        if self.layerwise_calibration and self.method not in ("wanda-sp", "flap"):
            problems.append(
                f"layerwise_calibration applies to the activation metrics (--method wanda-sp or flap), found method "
                f"{self.method!r}: drop --layerwise-calibration"
            )
        if self.reconstruct and self.bias_compensation == "on":
            problems.append(
                "reconstruct re-fits the kept weights instead of FLAP's bias compensation: drop "
                "--bias-compensation on (or --reconstruct)"
            )
        if not (self.reconstruct_ridge >= 0.0 and math.isfinite(self.reconstruct_ridge)):
            problems.append(f"reconstruct_ridge must be a finite number >= 0, found {self.reconstruct_ridge}")
        if self.bias_compensation == "on" and self.method == "maskprune":
            problems.append(
                "bias_compensation 'on' applies to one-shot baselines (--method flap, wanda-sp, ...): the learned "
                "method distils the cut model instead; drop --bias-compensation or pick a --method"
            )
        return problems


@dataclass(frozen=True)
class SelectionConfig(_Group):
    """How the learned method chooses the units: the recipe, the masks and their prior, the mask optimizer,
    and the minimax rates of Algorithm 1 (docs/method.md)."""

    ONLY: ClassVar[str | None] = "prune"

    recipe: Literal["maskprune", "paper"] = _opt(
        "maskprune",
        """``maskprune``: the measured default (masks start from a one-shot prior, a per-layer second moment,
    the selection frozen after ``freeze_share`` and the rest of the steps spent on LoRA distillation of
    the pruned structure). ``paper``: the paper's recipe as written (sets mask_init ones, mask_optimizer
    adamw, mask_lr 0.01, mask_lr_schedule constant, freeze_share 1, warmup_share 0.7, kl_direction
    student_teacher unless given explicitly). docs/method.md says why they differ.""",
    )
    mask_type: Literal["uniform", "l0", "polarization"] = _opt(
        "uniform",
        """Mask parametrisation inside the same minimax loop: MaskPrune's [0, 1] masks (``uniform``),
    hard-concrete L0 gates, or GDP polarization gates (the paper's table 3 comparison).""",
    )
    mask_init: Literal["ones", "wanda-sp", "flap", "taylor", "magnitude"] = _opt(
        "wanda-sp",
        """Start of the masks: all at 1 (the paper), or ordered by a one-shot score on the calibration windows
    (the most important unit of a row at 1, the least at 1 - mask_init_spread). The learned method only:
    ``--method`` baselines ignore it.""",
    )
    mask_init_spread: float = _opt(
        0.1,
        """Range of the initial masks under a one-shot prior, in [0, 1).""",
    )
    prior_samples: int = _opt(
        32,
        """Calibration windows the one-shot prior is scored on (the first ones; at most ``calib_samples``): 16k
    tokens at the default window length.""",
    )
    mask_optimizer: Literal["layer-adam", "adamw"] = _opt(
        "layer-adam",
        """Mask optimizer: Adam with one second moment per layer (a unit's step follows its gradient's size
    relative to its layer's), or AdamW per mask (the paper: every mask moves about lr per step).""",
    )
    mask_lr: float | None = _opt(
        None,
        """Mask learning rate (the paper: 1e-2). null (default): mask_init_spread / sqrt(selection steps), so the
    random walk that gradient noise gives the masks over the selection phase stays within the prior's spread
    while a unit whose gradient keeps its sign can still cross it (docs/method.md).""",
    )
    mask_lr_schedule: Literal["cosine", "constant"] = _opt(
        "cosine",
        """Mask learning rate over the selection phase: half a cosine to 0 at the freeze, or constant.""",
    )
    cut_first: bool | None = _opt(
        None,
        """Where the selection is fixed at step 0 (a one-shot prior, ``freeze_share`` 0, ``--recipe maskprune``),
    cut first and distil the sliced model: the prior's units by the measured split (and ``--prune-axes``, the
    re-fit of ``--reconstruct``) are cut and exported, then ``steps`` steps of distillation train that smaller
    model, each step cheaper than the masked full-width model's (docs/method.md, "Distilling the sliced
    model"). null (default): on wherever the selection is fixed at step 0 and the run is one process (measured
    to buy lower perplexity in the same minutes: docs/results.md); a learned selection (``--recipe paper``,
    ``--freeze-share`` > 0) and data-parallel launches keep the masked path, as does ``--no-cut-first``.""",
    )
    freeze_share: float = _opt(
        0.0,
        """Share of the steps after which the selection is frozen: the cut is planned from the state then, the
    planned units set to 0, and the remaining steps train LoRA by distillation on that structure. 0 (default):
    the one-shot prior's selection from the start, every step spent on recovery (docs/method.md says why);
    0.6: masks learned for 60 percent of the steps first; 1: never (the paper: masks learned until the cut).""",
    )
    eta1: float = _opt(
        0.1,
        """Proximal decay rate: the ceil(s) smallest masks are scaled by 1 / (1 + 2 eta1 y).""",
    )
    eta2: float = _opt(
        0.02,
        """Rate of the straight-through step on the sparsity fractions.""",
    )
    eta3: float = _opt(
        0.5,
        """Ascent rate of the sparsity multiplier y.""",
    )
    eta4: float = _opt(
        5.0,
        """Ascent rate of the resource multiplier z (size measured as a share of the dense size).""",
    )
    resource_weight: Literal["share", "unit", "flat"] = _opt(
        "share",
        """How the resource term pushes each kind's sparsity: by its share of the model (``share``), per
    parameter of one unit as the paper's raw gradient (``unit``: heads first), or equally (``flat``).""",
    )
    y_init: float = _opt(
        0.0,
        """Initial sparsity multiplier y (with eta3 = 0: a fixed multiplier, the ablation of the ascent).""",
    )
    z_init: float = _opt(
        0.0,
        """Initial resource multiplier z (with eta4 = 0: fixed).""",
    )
    cut_ramp: bool = _opt(
        True,
        """Between the end of the budget warm-up and the freeze, cap the masks of the units to be cut by a ceiling
    falling linearly from 1 to 0, so the cut is reached gradually and costs nothing at the freeze (without it,
    the mass the proximal step has not yet removed is cut in one jump). Needs freeze_share < 1.""",
    )
    warmup_share: float = _opt(
        0.3,
        """Share of the steps over which the budget falls from the dense size to the target (best before
    ``freeze_share``, so the masks hold the target for a while before the selection is frozen).""",
    )
    ffn_prox_start: int = _opt(
        10,
        """The FFN proximal step is taken every k steps, k falling linearly from this ...""",
    )
    ffn_prox_end: int = _opt(
        1,
        """... to this over the run (the paper: 10 -> 1).""",
    )

    def problems(self) -> list[str]:
        problems = _at_least_one(self, ("prior_samples", "ffn_prox_start", "ffn_prox_end"))
        problems += _non_negative(self, ("eta1", "eta2", "eta3", "eta4", "y_init", "z_init"))
        if self.mask_lr is not None and not (self.mask_lr > 0.0 and math.isfinite(self.mask_lr)):
            problems.append(f"mask_lr must be a finite number > 0 or null (automatic), found {self.mask_lr}")
        if not 0.0 < self.warmup_share <= 1.0:
            problems.append(f"warmup_share must be in (0, 1], found {self.warmup_share}")
        if not 0.0 <= self.freeze_share <= 1.0:
            problems.append(f"freeze_share must be in [0, 1] (1: never freeze), found {self.freeze_share}")
        if not 0.0 <= self.mask_init_spread < 1.0:
            problems.append(f"mask_init_spread must be in [0, 1), found {self.mask_init_spread}")
        return problems


@dataclass(frozen=True)
class TrainingConfig(_Group):
    """Distillation and LoRA: how many steps, which weights learn, and the loss."""

    steps: int = _opt(
        400,
        """Training steps of batch ``batch_size``: LoRA distillation of the pruned structure (the default recipe), or
    mask learning then distillation (``--freeze-share`` > 0, ``--recipe paper``). The paper: 7 epochs of 20k x
    512 tokens at batch 16. 0 (the default recipe only): its cut alone, shaped and re-fit, no distillation. With
    ``minutes``: the most steps the budget may buy.""",
    )
    minutes: float | None = _opt(
        None,
        """Time budget of the whole run, in minutes (evaluations and export included): the run measures its own
    pace (the cut, then its first distillation steps, re-measured as it goes) and sets the distillation's step
    count so that it ends by then, at most ``steps``. Applies where the run distils with a fixed selection (the
    default recipe, which cuts first; ``maskprune distill``). null: ``steps`` fixes the count. Where neither
    ``steps``, ``recover_steps`` nor ``minutes`` is given, such a run takes 10 minutes, at most one pass over the
    calibration windows (``calib_samples / batch_size`` steps; a window seen again buys little). A faster machine
    buys more steps: the report and the model card record the budget, the steps run and the minutes taken.""",
    )
    recover_steps: int = _opt(
        0,
        """``maskprune prune``: steps of recovery after the cut, i.e. ``maskprune distill``'s training of the
    exported model from the dense ``model`` (LoRA merged, or ``--full``) before the result is written; the
    calibration, batch, seq_len and LoRA options are prune's. 0: no recovery (the default; the README says
    what recovery buys).""",
        only="prune",
    )
    full: bool = _opt(
        False,
        """Train every weight of the model (fp32 master weights) instead of LoRA adapters (``maskprune distill``).""",
    )
    lora: bool = _opt(
        True,
        """Train LoRA adapters with the masks (merged into the weights at export).""",
    )
    lora_rank: int = _opt(
        8,
        """Rank of every LoRA adapter.""",
    )
    lora_alpha: float = _opt(
        16.0,
        """LoRA scaling numerator: the update is (lora_alpha / lora_rank) * B A.""",
    )
    lora_lr: float = _opt(
        1e-3,
        """LoRA learning rate (AdamW, no weight decay; the paper: 1e-3).""",
    )
    lora_lr_schedule: Literal["constant", "cosine"] = _opt(
        "constant",
        """Learning rate of the trained weights (LoRA, or every weight with ``--full``) over the steps: constant
    (the paper's), or half a cosine from ``lora_lr`` to 0 at the last step. At the budgets measured the cosine
    lost: the distillation is still far from its teacher when the steps end, and halving the mean rate halves
    its progress (docs/method.md, "Learning rate of the distillation").""",
    )
    lora_targets: tuple[str, ...] = _opt(
        ("q", "k", "v", "o", "gate", "up", "down"),
        """Projections that get LoRA, by role: q, k, v, o, gate, up, down.""",
    )
    distill: bool = _opt(
        True,
        """Distil from the unpruned model (teacher forward every step). Off (``--no-distill``): the loss is
    the language-modelling cross-entropy on the calibration text alone and no teacher forward runs.""",
        only="prune",
    )
    alpha: float = _opt(
        0.0,
        """Weight of the layer-wise hidden-state MSE in the distillation loss.""",
    )
    layer_mse_norm: Literal["teacher", "none"] = _opt(
        "teacher",
        """Each layer's MSE divided by the teacher's mean square there (scale-free), or raw as the paper writes it.""",
    )
    kl_direction: Literal["student_teacher", "teacher_student"] = _opt(
        "teacher_student",
        """KL(p_t || p_s) (the default, see docs/method.md), or KL(p_s || p_t) as the paper writes it.""",
    )
    ce_weight: float = _opt(
        0.0,
        """Weight of an added language-modelling cross-entropy term.""",
    )
    teacher_topk: int | None = _opt(
        None,
        """Distil from the teacher's ``K`` most likely tokens and the mass of the rest (``0``: the full vocabulary).
    null: ``DEFAULT_TEACHER_TOPK`` (at most the vocabulary) where the run distils the teacher's logits alone
    (``alpha`` 0: the default recipe's steps after its cut, prune's ``recover_steps``, ``maskprune distill``), 0
    elsewhere (the measurement behind the default: docs/results.md). The teacher's top-``K`` log-probabilities
    are cached on disk window by window (keyed by the teacher, ``K``, the dtype and each window's tokens; under
    ``$MASKPRUNE_TEACHER_CACHE`` where set): a run computes the windows it draws, and later runs that draw them (a
    sweep's other sizes, resumes, other seeds where they overlap) read them, without loading the teacher where
    every window is cached (``teacher_cache``); the loss is the exact KL over the ``K`` tokens and
    the tail (``losses.topk_kl``), and so is the validation's ``val_kl``.""",
    )

    def problems(self) -> list[str]:
        problems = _at_least_one(self, ("lora_rank",))
        if self.steps < 0:
            problems.append(f"steps must be >= 1 (0: the default recipe's cut alone), found {self.steps}")
        unknown = [r for r in self.lora_targets if r not in ROLES]
        if unknown or not self.lora_targets:
            problems.append(
                f"lora_targets must be projection roles among {','.join(ROLES)}, found "
                f"{','.join(self.lora_targets) or 'none'}: e.g. --lora-targets q,k,v,o"
            )
        problems += _non_negative(self, ("lora_lr", "alpha", "ce_weight"))
        if self.recover_steps < 0:
            problems.append(f"recover_steps must be >= 0, found {self.recover_steps}")
        if not self.distill and (self.alpha > 0.0 or self.ce_weight > 0.0):
            problems.append(
                f"distill is off, so there is no teacher for alpha={self.alpha} (layer MSE) and the "
                f"loss is the cross-entropy alone (ce_weight={self.ce_weight} is implied): drop "
                "--alpha/--ce-weight or drop --no-distill"
            )
        if self.minutes is not None and not (self.minutes > 0.0 and math.isfinite(self.minutes)):
            problems.append(f"minutes must be a time budget > 0 (null: --steps fixes the count), found {self.minutes}")
        return problems


@dataclass(frozen=True)
class DataConfig(_Group):
    """The calibration windows the run learns from, the batch, the seed and the held-out validation windows."""

    calib: str = _opt(
        "default",
        """Calibration text: ``default`` (shipped C4 sample), a .txt/.jsonl/.json(.gz) file or folder, or
    a hub dataset id (``allenai/c4``).""",
    )
    calib_config: str | None = _opt(
        None,
        """Hub dataset configuration name (e.g. ``en`` for allenai/c4).""",
    )
    calib_samples: int = _opt(
        512,
        """Number of token windows packed from the calibration text. Training draws batches by epochs over a
    permutation of them; the default gives each of the default run's steps fresh windows (400 x 1): a
    window seen again buys little on held-out text (docs/method.md, "Fresh windows").""",
    )
    seq_len: int = _opt(
        512,
        """Tokens per calibration window. Distilling on windows shorter than the contexts the model is used at
    leaves its long-context behaviour untrained: measured, 512-token windows against 128 at the same 512 tokens
    a step gave a 9 % lower perplexity at 2048 tokens (docs/method.md, "Window length").""",
    )
    batch_size: int = _opt(
        1,
        """Windows per learning step (one 512-token window: 512 tokens a step).""",
    )
    seed: int = _opt(
        0,
        """Seed of the batch order and the LoRA initialisation (the calibration windows do not depend on it).""",
    )
    val_every: int | None = _opt(
        None,
        """Every N learning or distillation steps, and after the last, score ``val_windows`` held-out
    calibration windows: KL to the teacher (the training loss's direction) and the student's perplexity, in
    metrics.jsonl (``val_kl``, ``val_ppl``), the progress bar, the report's ``validation`` and its figure. The
    held-out windows are the ones after the training windows in the calibration text and scoring draws no
    randomness, so training is the same with or without it. null (default): every steps / 8 steps when the
    calibration text holds ``val_windows`` windows beyond ``calib_samples`` (the shipped sample does), else
    off; 0: off.""",
    )
    val_windows: int = _opt(
        4,
        """How many held-out calibration windows ``val_every`` scores (taken after the ``calib_samples``).""",
    )

    def problems(self) -> list[str]:
        problems = _at_least_one(self, ("calib_samples", "seq_len", "batch_size", "val_windows"))
        if self.val_every is not None and self.val_every < 0:
            problems.append(f"val_every must be >= 0 (0: no validation) or null (automatic), found {self.val_every}")
        return problems


@dataclass(frozen=True)
class RuntimeConfig(_Group):
    """Where and how the run computes: device, dtypes, threads, compilation, processes, checkpoints, logging."""

    device: str = _opt(
        "auto",
        """``auto`` (cuda if available), ``cpu`` or ``cuda[:N]``.""",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _opt(
        "auto",
        """Autocast dtype of the forward passes (masks, s, y, z and optimizer state stay fp32). ``auto``: bf16 where
    the hardware computes it natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX), fp32 elsewhere.""",
    )
    weight_dtype: Literal["auto", "fp32", "bf16", "fp16"] = _opt(
        "auto",
        """Dtype of the frozen base weights while learning: ``auto`` is the autocast dtype (half the memory and no
    per-forward cast of every frozen weight under bf16), fp32 when autocast is off. Learning weights never
    reach the checkpoint: the export reloads the source in fp32 for the merge and the fold.""",
    )
    threads: int | None = _opt(
        None,
        """torch CPU threads (default: torch's choice).""",
    )
    streaming: Literal["auto", "on", "off"] = _opt(
        "auto",
        """Where each pass of the cut over the model runs (scores, hidden energies, layer importance, the shape
    search's KLs, the re-fit, the perplexity evaluations): ``off``, the whole model resident on the device; ``on``,
    one decoder layer at a time, each fed the arguments the model itself passes it, the activations between
    layers kept in the autocast dtype (the model is still loaded whole: weights are not streamed from host memory
    or disk yet); ``auto``: on where the run's plan (``maskprune plan``) says a resident run does not fit in
    ``max_memory``.""",
    )
    max_memory: str | None = _opt(
        None,
        """The memory the run may use, as ``24GB``, ``80GiB`` or a number of bytes: ``prune`` refuses, before any heavy
    work, a run whose plan needs more, with what to switch on. Default: the memory free on the machine (on a GPU
    run, the device's free memory).""",
    )
    gradient_checkpointing: bool = _opt(
        False,
        """Recompute each layer's activations in the backward pass (less memory, about a third more compute).""",
    )
    compile: bool = _opt(
        False,
        """Run the learning step's teacher and student forward passes through ``torch.compile`` (inductor):
    elementwise work (mask hooks, LoRA scaling, RMSNorm, rotary) is fused. One process only. It costs a
    one-off compile of minutes on a CPU, so it pays on long runs only (README, Performance); the rest of the
    run (cut, export, evaluation) stays eager.""",
    )
    fsdp: bool = _opt(
        False,
        """With several processes: shard base weights, LoRA and optimizer state with torch FSDP2 (one unit per
    decoder layer) instead of replicating them; masks stay replicated. Rank 0 reloads the model whole
    for the export.""",
    )
    sync_check_every: int = _opt(
        10,
        """With several processes: compare masks, s, y and z across ranks every N steps.""",
    )
    resume: bool = _opt(
        False,
        """Continue from the newest valid checkpoint in ``<out>.checkpoints``.""",
    )
    checkpoint_every: int = _opt(
        25,
        """Write a learner checkpoint every N steps (and on SIGINT / SIGTERM); 0 disables periodic ones.""",
    )
    keep_checkpoints: int = _opt(
        2,
        """How many of the newest checkpoints to keep.""",
    )
    log_every: int = _opt(
        1,
        """Refresh the progress bar's loss and state every N steps (metrics.jsonl gets every step).""",
    )
    trackers: tuple[str, ...] = _opt(
        (),
        """Optional metric trackers besides metrics.jsonl: tensorboard, wandb (each needs its package).""",
    )
    shared_cache: str | None = _opt(
        None,
        """A folder where work that depends on the dense model, the data and the settings but not on the size is kept
    and reused by later runs: the dense evaluations, the shape search's reference logits, layer-skip KLs, metric
    statistics and channel energies (``maskprune sweep`` sets it for its sizes; null: nothing is kept).""",
        only="prune",
    )

    def problems(self) -> list[str]:
        problems = _at_least_one(self, ("keep_checkpoints", "log_every", "sync_check_every"))
        if self.max_memory is not None:
            from .memory import parse_bytes

            try:
                parse_bytes(self.max_memory)
            except ValueError as exc:
                problems.append(f"max_memory: {exc}")
        if self.checkpoint_every < 0:
            problems.append(f"checkpoint_every must be >= 0, found {self.checkpoint_every}")
        return problems


@dataclass(frozen=True)
class EvalConfig(_Group):
    """What the run measures on the dense and the exported model."""

    eval_data: str = _opt(
        "default",
        """WikiText-2 raw test: ``default`` (shipped copy), a local wiki.test.raw, ``hub``, or ``none``.""",
    )
    eval_seq_len: int = _opt(
        512,
        """Perplexity window during prune (before / just before cut / after export).""",
    )
    eval_max_windows: int | None = _opt(
        16,
        """Windows evaluated during prune (null: all). ``maskprune eval`` measures the full protocol.""",
    )
    eval_tasks: str = _opt(
        "",
        """Zero-shot lm-eval tasks run on the dense and the exported model (comma-separated, or ``paper``).""",
    )
    eval_data_dir: str | None = _opt(
        None,
        """Local task data for ``eval_tasks`` (offline); see ``maskprune eval --data-dir``.""",
    )
    eval_limit: int | None = _opt(
        None,
        """Examples per zero-shot task (null: all).""",
    )
    eval_between: bool | None = _opt(
        None,
        """Also evaluate the models between stages: just after the cut (before the re-fit) and the cut's export before
        the distillation (the report's ``after_cut`` and ``before_recovery``). Null: on for ``prune``, off for each
        size of ``maskprune sweep`` (its table measures every size). A time budget (``--minutes``) still evaluates the
        cut's export: its seconds are what the budget keeps for the final evaluation.""",
    )

    def resolved_eval_between(self) -> bool:
        return True if self.eval_between is None else self.eval_between

    def problems(self) -> list[str]:
        problems = _at_least_one(self, ("eval_seq_len",))
        if self.eval_max_windows is not None and self.eval_max_windows < 1:
            problems.append(f"eval_max_windows must be >= 1 or null, found {self.eval_max_windows}")
        return problems


@dataclass(frozen=True)
class OutputConfig(_Group):
    """What the run writes and where."""

    out: str | None = _opt(
        None,
        """Output folder for the pruned checkpoint (default: runs/<model>-<sparsity>).""",
    )
    overwrite: bool = _opt(
        False,
        """Replace ``out`` if it exists.""",
    )
    export_dtype: Literal["auto", "fp32", "bf16", "fp16"] = _opt(
        "auto",
        """Dtype of the saved checkpoint (``auto``: the dtype the source checkpoint declares, fp32 if none). Merge,
    fold and the parity check always run in fp32; only the finished model is cast.""",
    )
    gguf: str | None = _opt(
        None,
        """Also write a GGUF of the export, of this type (f16, q8_0, q4_k_m, ...; see ``maskprune export-gguf``),
    as ``<out>/<out name>-<type>.gguf``, by llama.cpp's converter (and quantizer).""",
    )
    report: bool = _opt(
        True,
        """Draw the report figures and HTML page into ``<out>/report`` at the end.""",
    )

    def problems(self) -> list[str]:
        if self.gguf is not None and self.gguf.lower() not in GGUF_TYPES:
            return [f"gguf must be one of {', '.join(GGUF_TYPES)}, found {self.gguf!r}"]
        return []


GROUPS: dict[str, type[_Group]] = {
    "source": SourceConfig,
    "cut": CutConfig,
    "selection": SelectionConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "runtime": RuntimeConfig,
    "evaluation": EvalConfig,
    "output": OutputConfig,
}
"""The configuration's groups by attribute name, in the order ``--help`` and a printed config show them."""

GROUP_OF: dict[str, str] = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}
"""The group of every flat key (``sparsity`` -> ``cut``): flat YAML keys and CLI flags are these names."""


@dataclass(frozen=True, init=False)
class PruneConfig:
    """Everything a run needs, one typed group per concern (each validates itself; the rules that span groups
    are :meth:`problems`). ``PruneConfig(sparsity=0.5, steps=120)`` takes the flat keys; ``cfg.cut.sparsity``
    is the grouped read and ``cfg.sparsity`` the flat one. Stages receive the groups they read."""

    source: SourceConfig
    cut: CutConfig
    selection: SelectionConfig
    training: TrainingConfig
    data: DataConfig
    runtime: RuntimeConfig
    evaluation: EvalConfig
    output: OutputConfig

    def __init__(self, **values: Any) -> None:
        """Groups by name (``cut=CutConfig(...)``) and/or flat keys (``sparsity=0.5``); unknown keys raise
        TypeError as a dataclass would. Flat keys win over a group given whole."""
        unknown = sorted(set(values) - set(GROUPS) - set(GROUP_OF))
        if unknown:
            raise TypeError(f"PruneConfig got unexpected keys {unknown}")
        for name, cls in GROUPS.items():
            flat = {k: v for k, v in values.items() if GROUP_OF.get(k) == name}
            group = values.get(name) or cls()
            object.__setattr__(self, name, dataclasses.replace(group, **flat) if flat else group)

    def __getattr__(self, name: str) -> Any:
        """The flat read: ``cfg.steps`` is ``cfg.training.steps`` (only reached for names that are not groups)."""
        group = GROUP_OF.get(name)
        if group is None:
            raise AttributeError(f"PruneConfig has no option {name!r}")
        return getattr(object.__getattribute__(self, group), name)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PruneConfig":
        """A config from a flat mapping as :meth:`to_dict` writes it (a report read back): lists become the tuples
        the fields hold, keys this version does not know are dropped, missing keys take their defaults."""
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in GROUP_OF}
        return cls(**known)

    def replace(self, **flat: Any) -> "PruneConfig":
        """A copy with the flat keys in ``flat`` changed (``cfg.replace(steps=10, out="x")``)."""
        return PruneConfig(**{name: getattr(self, name) for name in GROUPS}, **flat)

    def to_dict(self) -> dict[str, Any]:
        """Every option as one flat mapping (the report's ``config``, the checkpoint fingerprint)."""
        return {k: v for name in GROUPS for k, v in getattr(self, name).to_dict().items()}

    def to_groups(self) -> dict[str, dict[str, Any]]:
        """Every option by group (a grouped YAML file)."""
        return {name: getattr(self, name).to_dict() for name in GROUPS}

    # ---- derived values that need more than one group ---------------------------------------------------
    def budget_for(self, dense_params: int) -> int:
        return self.cut.budget_for(dense_params)

    @property
    def has_teacher(self) -> bool:
        return self.source.has_teacher

    def selection_steps(self) -> int:
        """Steps on which the masks learn: until the freeze, or every step when the selection is never frozen."""
        freeze, steps = self.selection.freeze_share, self.training.steps
        return round(freeze * steps) if freeze < 1.0 else steps

    def resolved_val_every(self) -> int:
        """``val_every``, or its automatic value: 8 validations over the run (0: off)."""
        if self.data.val_every is not None:
            return self.data.val_every
        return max(1, self.training.steps // 8)

    def resolved_split_search(self) -> bool:
        """``split_search``, or its default: on for the learned method starting from a one-shot prior."""
        if self.cut.split_search is not None:
            return self.cut.split_search
        return self.cut.method == "maskprune" and self.selection.mask_init != "ones"

    def resolved_layerwise_calibration(self) -> bool:
        return self.cut.resolved_layerwise_calibration()

    def resolved_eval_between(self) -> bool:
        return self.evaluation.resolved_eval_between()

    def selection_fixed_at_start(self) -> bool:
        """Whether the default recipe's selection is the one-shot prior's, fixed at step 0 (nothing learns it)."""
        sel = self.selection
        return (
            self.cut.method == "maskprune"
            and sel.mask_init != "ones"
            and not sel.freeze_share
            and sel.recipe == "maskprune"
        )

    def resolved_prune_axes(self) -> tuple[str, ...]:
        """``prune_axes``, or its default: every axis where the default recipe cuts first, else heads and ffn."""
        if self.cut.prune_axes is not None:
            return self.cut.prune_axes
        return PRUNE_AXES if self.resolved_cut_first() else ("heads", "ffn")

    def searches_shape(self) -> bool:
        """Whether the cut searches the whole model's shape (hidden width or depth among ``prune_axes``)."""
        return bool({"hidden", "layers"} & set(self.resolved_prune_axes()))

    def distils_from_teacher(self) -> bool:
        """Whether the run distils from a separate dense teacher: `maskprune distill`, prune's ``recover_steps``, or
        the default recipe's steps after its cut."""
        return bool(
            self.source.teacher is not None
            or self.training.recover_steps
            or (self.resolved_cut_first() and self.training.steps)
        )

    def resolved_teacher_topk(self) -> int:
        """``teacher_topk``, or its default: :data:`DEFAULT_TEACHER_TOPK` where the run distils the teacher's logits
        alone (no layer MSE), 0 (the full vocabulary) elsewhere. At most the vocabulary is applied where it is known
        (``stages.teacher``)."""
        if self.training.teacher_topk is not None:
            return self.training.teacher_topk
        return DEFAULT_TEACHER_TOPK if self.distils_from_teacher() and self.training.alpha == 0 else 0

    def distils_fixed_selection(self) -> bool:
        """Whether the run's training is a distillation of a fixed structure (the default recipe cutting first, or
        ``maskprune distill``): where a time budget (``minutes``) sets the step count."""
        return self.source.teacher is not None or self.resolved_cut_first()

    def resolved_cut_first(self) -> bool:
        """``cut_first``, or its default: on where the selection is fixed at step 0, nothing else distils after the
        cut (``--recover-steps``, ``distill``) and the run is one process (a launcher keeps the masked path, which
        is data-parallel)."""
        if self.selection.cut_first is not None:
            return self.selection.cut_first
        return (
            self.selection_fixed_at_start()
            and not self.training.recover_steps
            and self.source.teacher is None
            and not self.runtime.fsdp
            and int(os.environ.get("WORLD_SIZE", "1")) == 1
        )

    def resolved_cut_samples(self) -> int:
        """Windows that choose and fit a one-shot cut: ``cut_samples``, at most ``calib_samples`` (null: at most
        256, the 128k tokens one-shot methods are calibrated on, e.g. FLAP's 1024 x 128)."""
        n = self.data.calib_samples
        return min(n, 256) if self.cut.cut_samples is None else min(self.cut.cut_samples, n)

    def resolved_mask_lr(self) -> float:
        """``mask_lr``, or the automatic rate ``mask_init_spread / sqrt(selection steps)`` (0.1 / sqrt(steps) when
        the masks start at 1 with no spread)."""
        sel = self.selection
        if sel.mask_lr is not None:
            return sel.mask_lr
        spread = sel.mask_init_spread if sel.mask_init != "ones" and sel.mask_init_spread > 0 else 0.1
        return spread / math.sqrt(max(1, self.selection_steps()))

    # ---- validation --------------------------------------------------------------------------------------
    def validate(self) -> "PruneConfig":
        """``self`` if every value is in range and the values agree; else one error listing every problem."""
        problems = self.problems()
        if problems:
            raise MaskPruneError("invalid configuration: " + "; ".join(problems))
        return self

    def problems(self) -> list[str]:
        """Every problem of every group, then the rules that span groups (empty: valid)."""
        problems = [p for name in GROUPS for p in getattr(self, name).problems()]
        return problems + _distillation_problems(self) + _method_problems(self)


def _distillation_problems(cfg: PruneConfig) -> list[str]:
    """Rules between the teacher (source), the steps and weights that learn (training) and the runtime."""
    src, tr = cfg.source, cfg.training
    problems = []
    if src.teacher is not None and (
        cfg.cut.method != "maskprune" or cfg.selection.mask_init != "ones" or cfg.selection.freeze_share
    ):
        problems.append(
            "distill runs the learned method with no mask learning (method maskprune, mask_init ones, "
            f"freeze_share 0), found method {cfg.cut.method!r}, mask_init {cfg.selection.mask_init!r}, "
            f"freeze_share {cfg.selection.freeze_share}: use `maskprune distill`, which sets them"
        )
    if (
        cfg.cut.reconstruct_target == "dense"
        and cfg.cut.reconstruct is not False
        and cfg.cut.method == "maskprune"
        and not cfg.resolved_cut_first()
    ):
        problems.append(
            "reconstruct_target dense re-fits a one-shot cut (a --method baseline, or the default run, which cuts "
            "first); learned masks are not re-fit: drop --reconstruct-target dense"
        )
    if tr.steps == 0 and cfg.cut.method == "maskprune" and not cfg.resolved_cut_first():
        problems.append(
            "steps must be >= 1, found 0 (0 is the default recipe's cut alone, shaped and re-fit, without "
            "distillation; this run learns or distils on the masked model): pass --steps N"
        )
    if tr.full and src.teacher is None and not tr.recover_steps:
        problems.append("full applies to distillation (`maskprune distill`, or prune's --recover-steps); drop --full")
    if (src.teacher is not None or tr.recover_steps) and not (tr.lora or tr.full):
        problems.append(
            "distillation trains LoRA adapters (the default) or every weight (--full); with --no-lora and "
            "no --full nothing would train: drop --no-lora or add --full"
        )
    if tr.teacher_topk is not None and tr.teacher_topk < 0:
        problems.append(f"teacher_topk must be >= 0 (0: the full vocabulary), found {tr.teacher_topk}")
    distils = cfg.distils_from_teacher()
    if tr.teacher_topk and not distils:
        problems.append(
            "teacher_topk applies to distillation from the dense model (the default recipe's steps after its cut, "
            "prune's --recover-steps, `maskprune distill`); a run that learns masks uses the model itself as its "
            "teacher: drop --teacher-topk"
        )
    if tr.teacher_topk and tr.alpha > 0:
        problems.append("teacher_topk keeps the teacher's logits only; the layer MSE (--alpha) needs its hidden "
                        "states: drop --teacher-topk or --alpha")  # fmt: skip
    if tr.recover_steps and src.teacher is not None:
        problems.append("recover_steps belongs to prune; `maskprune distill` takes --steps")
    if tr.full and cfg.runtime.fsdp:
        problems.append(
            "full with fsdp is not supported (the export would rebuild the weights from the source): "
            "drop --fsdp (data parallel works) or train LoRA"
        )
    return problems


def _method_problems(cfg: PruneConfig) -> list[str]:
    """Rules between the method (cut), the learned selection's options and the batch (data)."""
    method, sel, data = cfg.cut.method, cfg.selection, cfg.data
    problems = []
    axes = cfg.resolved_prune_axes()
    shaped = set(axes) - {"heads", "ffn"}
    for key, axis in (("keep_hidden", "hidden"), ("keep_layers", "layers")):
        if getattr(cfg.cut, key) is not None and axis not in axes and cfg.cut.prune_axes is None:
            problems.append(
                f"{key} needs {axis} in prune_axes, which this run's default leaves out ({','.join(axes)}: "
                "a --method baseline or the masked path): add --prune-axes heads,ffn,hidden,layers"
            )
    if method == "maskprune" and not cfg.resolved_cut_first() and (shaped or cfg.cut.reconstruct):
        problems.append(
            ("prune_axes hidden and layers" if shaped else "reconstruct")
            + " apply to a cut made before training: one-shot methods (--method wanda-sp, flap, ...) or the default "
            "recipe, which cuts first; the masked path (a learned selection, --no-cut-first, a data-parallel "
            "launch) cuts heads and ffn at the end and does not re-fit: "
            + ("drop them from --prune-axes" if shaped else "drop --reconstruct")
            + ", or drop what keeps the masked path (--recipe paper, --freeze-share, --no-cut-first)"
        )
    if sel.cut_first and not cfg.selection_fixed_at_start():
        problems.append(
            "cut_first distils the sliced model where the default recipe fixes the selection at step 0 (method "
            f"maskprune, a one-shot mask_init, freeze_share 0), found method {method!r}, mask_init "
            f"{sel.mask_init!r}, freeze_share {sel.freeze_share}, recipe {sel.recipe!r}: drop --cut-first (a "
            "--method with --recover-steps is the one-shot equivalent)"
        )
    if sel.cut_first and (cfg.training.recover_steps or cfg.source.teacher is not None):
        problems.append("cut_first already distils after the cut for --steps steps: drop --recover-steps")
    if method == "maskprune" and 1 <= data.calib_samples < data.batch_size:
        problems.append(
            f"batch_size {data.batch_size} is larger than calib_samples {data.calib_samples}: every "
            "step would see fewer windows than asked; lower --batch-size or raise --calib-samples"
        )
    if cfg.cut.split_search and method == "maskprune" and sel.mask_init == "ones":
        problems.append(
            "split_search needs a one-shot order of the units to cut, found mask_init 'ones': pass "
            "--mask-init wanda-sp (or flap, taylor, magnitude), or drop --split-search"
        )
    if sel.mask_type != "uniform" and method != "maskprune":
        problems.append(
            f"mask_type {sel.mask_type!r} applies to the learned method only, found method "
            f"{method!r}: drop --mask-type or use --method maskprune"
        )
    return problems


def _only(command: str) -> frozenset[str]:
    """The flat keys only ``command`` takes: a whole group's (``ONLY``) or a field's (``metadata["only"]``)."""
    return frozenset(
        f.name
        for cls in GROUPS.values()
        for f in dataclasses.fields(cls)
        if cls.ONLY == command or f.metadata.get("only") == command
    )


PRUNE_ONLY: frozenset[str] = _only("prune")
"""Options of ``maskprune prune`` that ``maskprune distill`` does not take: they choose, learn or shape the cut
(the groups ``cut`` and ``selection``, and ``recover_steps``), or switch the teacher off (``distill``): a
distillation keeps the student's structure and always learns from its teacher. Its flags are not offered; given
in the API they are refused; in a shared YAML file they are ignored with a warning."""

DISTILL_ONLY: frozenset[str] = _only("distill")
"""Options of ``maskprune distill`` that ``maskprune prune`` does not take (its teacher is the model it prunes)."""


def distill_overrides(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` of a distillation (API keywords or CLI flags) with :data:`DISTILL_SETTINGS` applied; refuses
    any of :data:`PRUNE_ONLY`, which would otherwise be silently overridden or meaningless."""
    given = sorted(set(options) & PRUNE_ONLY)
    if given:
        raise MaskPruneError(
            f"maskprune distill does not take {', '.join(given)}",
            expected="distillation options (steps, calib, calib_samples, seq_len, batch_size, lora_rank, lora_lr, "
            "full, alpha, ce_weight, kl_direction, ...): the student's structure is kept as it is",
            fix="drop them (they choose the cut: give them to `maskprune prune`)",
        )
    return {**options, **DISTILL_SETTINGS}


def prune_overrides(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` of a prune (API keywords or CLI flags); refuses any of :data:`DISTILL_ONLY` (prune's teacher
    is the model it prunes: a separate teacher is `maskprune distill`'s)."""
    given = sorted(set(options) & DISTILL_ONLY)
    if given:
        raise MaskPruneError(
            f"maskprune prune does not take {', '.join(given)}",
            expected="prune options: its teacher is the model it prunes",
            fix="distil a pruned model from a separate teacher with `maskprune distill PRUNED --teacher DENSE` "
            "(maskprune.distill(student, teacher=...))",
        )
    return dict(options)


PAPER_RECIPE: dict[str, Any] = {
    "mask_init": "ones",
    "mask_optimizer": "adamw",
    "mask_lr": 1e-2,
    "mask_lr_schedule": "constant",
    "freeze_share": 1.0,
    "warmup_share": 0.7,
    "kl_direction": "student_teacher",
    "cut_ramp": False,
}
"""``recipe: paper``: the method as the paper writes it (masks start at 1, AdamW at lr 1e-2 with no
schedule, the selection learned until the cut, KL(p_s || p_t)). Keys given explicitly still win."""


def _check_type(name: str, value: Any, hint: Any) -> tuple[Any, str | None]:
    """Coerce ``value`` to ``hint`` where it is lossless (int -> float, list -> tuple); else explain."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        errors = []
        for a in args:
            if a is type(None):
                continue
            v, err = _check_type(name, value, a)
            if err is None:
                return v, None
            errors.append(err)
        return value, errors[0]
    if origin is Literal:
        if value in args:
            return value, None
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return value, f"{name} must be one of {', '.join(map(repr, args))}, found {value!r}{hint}"
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value), None
        return value, f"{name} must be a list of strings, found {value!r}"
    if hint is bool:
        if isinstance(value, bool):
            return value, None
        return value, f"{name} must be true or false, found {value!r}"
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return value, f"{name} must be an integer, found {value!r} ({type(value).__name__})"
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        return value, f"{name} must be a number, found {value!r} ({type(value).__name__})"
    if hint is str:
        if isinstance(value, str):
            return value, None
        return value, f"{name} must be a string, found {value!r} ({type(value).__name__})"
    return value, None


def _read_yaml(file: str | Path, ignore: frozenset[str]) -> dict[str, Any]:
    """The flat keys of a YAML config file: flat keys as they are, a group's section (``cut: {sparsity: 0.5}``)
    flattened; keys in ``ignore`` dropped with a warning."""
    path = Path(file)
    if not path.is_file():
        raise MaskPruneError(
            f"config file {str(path)!r} does not exist", fix="pass the path of a YAML file to --config"
        )
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MaskPruneError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise MaskPruneError(
            f"config file {str(path)!r} must hold a mapping of keys to values", found=type(loaded).__name__
        )
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        if key in GROUPS and isinstance(value, dict):
            stray = sorted(k for k in value if GROUP_OF.get(k, key) != key)
            if stray:
                raise MaskPruneError(
                    f"config file {str(path)!r}: section {key!r} holds keys of other groups: {stray}",
                    fix="move each key under its own group (or list it flat): "
                    + ", ".join(f"{k} -> {GROUP_OF[k]}" for k in stray if k in GROUP_OF),
                )
            values.update(value)
        else:
            values[key] = value
    dropped = sorted(set(values) & ignore)
    if dropped:
        log.warning("config file %s: %s do not apply here and are ignored", path, ", ".join(dropped))
    return {k: v for k, v in values.items() if k not in ignore}


def load_config(
    file: str | Path | None = None, overrides: Mapping[str, Any] | None = None, *, ignore: frozenset[str] = frozenset()
) -> PruneConfig:
    """Defaults, then the YAML ``file``, then ``overrides`` (flags). Validated; errors all at once. Keys of the
    file in ``ignore`` (a command's options that do not apply, e.g. :data:`PRUNE_ONLY` for distill) are dropped
    with a warning, so one file can serve prune and distill."""
    values: dict[str, Any] = _read_yaml(file, ignore) if file is not None else {}
    values.update(overrides or {})
    if values.get("recipe") == "paper":
        values = {**PAPER_RECIPE, **values}
    problems: list[str] = []
    for key in sorted(set(values) - set(GROUP_OF)):
        close = difflib.get_close_matches(str(key), list(GROUP_OF), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"unknown config key {key!r}{hint}; every key: `maskprune prune --print-config`")
    clean: dict[str, Any] = {}
    for k, v in values.items():
        if k not in GROUP_OF:
            continue
        v, err = _check_type(k, v, field_hint(k))
        if err:
            problems.append(err)
        else:
            clean[k] = v
    if "budget_params" in clean and clean["budget_params"] is not None and "sparsity" not in clean:
        clean["sparsity"] = None
    config = PruneConfig(**clean)  # the values of the right type; their ranges are checked with the rest
    if not problems and not {"steps", "recover_steps"} & set(clean) and config.distils_fixed_selection():
        minutes = clean["minutes"] if "minutes" in clean else DEFAULT_MINUTES  # null given: --steps' default
        if minutes is not None:  # the budget's cap: one pass over the calibration windows
            config = config.replace(minutes=minutes, steps=max(1, config.calib_samples // config.batch_size))
    problems += config.problems()
    if problems:
        raise MaskPruneError("invalid configuration: " + "; ".join(problems))
    return config


def cut_first_config(cfg: PruneConfig) -> PruneConfig:
    """The default recipe with ``cut_first`` as the prune + recovery it is: the one-shot prior's metric cuts (one
    pass, the split measured as the masked path measures it), then ``steps`` steps distil the sliced model."""
    return cfg.replace(
        method=cfg.mask_init,
        cut_samples=cfg.cut_samples if cfg.cut_samples is not None else cfg.prior_samples,
        split_search=cfg.resolved_split_search(),
        layerwise_calibration=False,
        recover_steps=cfg.steps,
        reconstruct=cfg.reconstruct is not False,  # null: on (the default recipe's cut is re-fit)
        prune_axes=cfg.resolved_prune_axes(),
        cut_first=False,
    ).validate()
