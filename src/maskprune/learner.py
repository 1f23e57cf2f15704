"""The mask-learning loop (docs/method.md, "One learning step"). No file I/O in here.

Per step: teacher forward (masks and LoRA off, no grad) and student forward; one AdamW step on masks
and LoRA, masks clamped to [0, 1]; the proximal step (heads every step, FFN every k steps with k
falling 10 -> 1); the straight-through step on sigma; the ascent on y and z.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import distributed as D
from . import minimax
from .config import PruneConfig
from .cut import plan_cut
from .dtypes import autocast_dtype
from .errors import Interrupted, MaskPruneError, NonFiniteError
from .losses import distillation_loss, kl_divergence, lm_cross_entropy, topk_kl
from .mask_optim import LayerAdam, cosine_factor
from .masks import POLARIZATION_EPS, MaskSet, bypass
from .structure import Structure

__all__ = ["LearnState", "Learner", "Interrupted", "attach_lora", "window_batch"]


def window_batch(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of window indices that ``step`` draws from ``n`` windows: epochs over a permutation seeded
    by ``seed`` and the epoch (a pure function, so the windows a run will draw are known before it starts)."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen)
    return order[pos * batch_size : pos * batch_size + batch_size] if n >= batch_size else order


@dataclass
class LearnState:
    """The minimax variables besides the masks (see :mod:`maskprune.minimax` for the symbols)."""

    step: int = 0
    sigma: dict[str, float] = field(default_factory=lambda: {"head": 0.0, "ffn": 0.0})
    y: float = 0.0
    z: float = 0.0
    frozen_at: int | None = None
    """The step at which the selection was frozen (hard 0/1 masks from then on), or None."""

    def to_dict(self) -> dict:
        return asdict(self)


def attach_lora(model: nn.Module, adapter, roles: tuple[str, ...], *, rank: int, alpha: float) -> nn.Module:
    """Wrap the projections of ``roles`` with peft LoRA (zero-initialised B, so the function is unchanged)."""
    from peft import LoraConfig, get_peft_model

    targets = sorted({adapter.module_name(r) for r in roles})
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


def _disable_lora_input_cast(model: nn.Module) -> None:
    """Under autocast, stop peft from casting each LoRA input to the adapter's fp32 dtype: autocast casts it
    straight back to the compute dtype for ``lora_A``, so every LoRA layer paid two copies of its input per
    forward (about 5 % of a SmolLM2 step on CPU). The same switch as ``peft.helpers.disable_input_dtype_casting``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer) and hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False


class Learner:
    """Learns masks (and LoRA) on ``windows`` ``[N, seq_len]`` toward ``budget`` parameters."""

    def __init__(
        self,
        model: nn.Module,
        masks: MaskSet,
        windows: torch.Tensor,
        cfg: PruneConfig,
        budget: int,
        *,
        on_step: Callable[[dict], None] | None = None,
        teacher: nn.Module | None = None,
        val_windows: torch.Tensor | None = None,
        teacher_topk=None,
        val_teacher_topk=None,
    ) -> None:
        self.model = model
        self.masks = masks
        self.windows = windows
        self.cfg = cfg
        self.structure: Structure = masks.structure
        self.budget = budget
        self.final_ratio = budget / self.structure.dense_params
        self.state = LearnState(sigma={"head": cfg.head_cut_fraction, "ffn": 0.0}, y=cfg.y_init, z=cfg.z_init)
        self.on_step = on_step
        self.teacher = teacher
        """A separate dense teacher (``maskprune distill``); None: the model itself with masks and LoRA off."""
        self.teacher_topk, self.val_teacher_topk = teacher_topk, val_teacher_topk
        """With ``--teacher-topk``: the teacher's top-k on ``windows`` and ``val_windows``
        (:class:`maskprune.teacher_cache.WindowTopK`), used in place of any teacher forward."""
        if teacher_topk is not None and len(teacher_topk) != windows.shape[0]:
            raise ValueError(f"the teacher's top-k covers {len(teacher_topk)} windows, training has {windows.shape[0]}")
        self.val_every = cfg.resolved_val_every()
        self.val_windows = val_windows if self.val_every else None
        """Held-out windows ``[M, seq_len]`` scored every ``val_every`` steps (None: no validation)."""
        self.device = next(model.parameters()).device
        self.amp = autocast_dtype(cfg.dtype, self.device)
        if self.amp is not None:
            _disable_lora_input_cast(model)
        lora_params = list(self._lora_params().values())
        mask_params = list(masks.parameters())
        self.mask_optimizer: torch.optim.Optimizer = (
            LayerAdam(mask_params, lr=cfg.resolved_mask_lr())
            if cfg.mask_optimizer == "layer-adam"
            else torch.optim.AdamW(mask_params, lr=cfg.resolved_mask_lr(), weight_decay=0.0)
        )
        self.optimizer: torch.optim.Optimizer | None = (
            torch.optim.AdamW(lora_params, lr=cfg.lora_lr, weight_decay=0.0) if lora_params else None
        )
        self._trainable = mask_params + lora_params
        self.freeze_step = cfg.selection_steps() if cfg.freeze_share < 1.0 else None
        # the module the step calls: compiled if asked (the same parameters, hooks and adapters; masks and
        # LoRA toggled by bypass() select between two cached graphs, teacher and student)
        self._forward: Callable[..., Any] = model
        if cfg.compile:
            if D.world() > 1:
                raise MaskPruneError(
                    "compile is supported with one process only",
                    fix="drop --compile when running under torchrun / accelerate",
                )
            self._forward = torch.compile(model)
        if cfg.batch_size % D.world():
            raise MaskPruneError(
                f"batch_size {cfg.batch_size} does not split over {D.world()} processes",
                fix="use a global --batch-size that is a multiple of the process count",
            )

    # ---- data ---------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> torch.Tensor:
        """Window indices of ``step`` for this process: epochs over a seeded permutation (a pure
        function of the step), the global batch of ``batch_size`` split evenly over processes."""
        batch = window_batch(self.windows.shape[0], self.cfg.batch_size, self.cfg.seed, step)
        w, r = D.world(), D.rank()
        share = batch.numel() // w
        return batch[r * share : (r + 1) * share]

    # ---- one step -----------------------------------------------------------------------------
    def mask_lr(self, step: int) -> float:
        """The mask learning rate at ``step``: ``mask_lr``, or half a cosine to 0 over the selection phase."""
        lr = self.cfg.resolved_mask_lr()
        if self.cfg.mask_lr_schedule == "constant":
            return lr
        return lr * cosine_factor(step, self.cfg.selection_steps())

    def lora_lr(self, step: int) -> float:
        """The adapters' (or, with ``full``, every weight's) learning rate at ``step``: ``lora_lr``, or half a
        cosine from it to 0 at the last step (``lora_lr_schedule``)."""
        if self.cfg.lora_lr_schedule == "constant":
            return self.cfg.lora_lr
        return self.cfg.lora_lr * cosine_factor(step, self.cfg.steps)

    def _plan(self):
        """The uniform cut the current state plans (head count from sigma, FFN count from the budget)."""
        cfg = self.cfg
        return plan_cut(
            self.structure,
            sigma_head=self.state.sigma["head"],
            budget=self.budget,
            head_multiple=cfg.head_multiple,
            ffn_multiple=cfg.ffn_multiple,
        )

    def cut_ramp_cap(self, step: int) -> float | None:
        """With ``cut_ramp``: the ceiling on the masks of the units to be cut after ``step``, falling linearly
        from 1 when the budget warm-up ends to 0 at the freeze, so the model reaches the cut gradually (and
        LoRA with it) instead of in one jump at the freeze. ``None`` outside that window or without a freeze."""
        if not self.cfg.cut_ramp or self.freeze_step is None:
            return None
        start = min(round(self.cfg.warmup_share * self.cfg.steps), self.freeze_step)
        if step + 1 < start or self.freeze_step <= start:
            return None
        return max(0.0, (self.freeze_step - (step + 1)) / (self.freeze_step - start))

    @torch.no_grad()
    def freeze(self) -> None:
        """Freeze the selection: plan the uniform cut from the learned state, set the planned number of units
        with the smallest masks in every row to 0, and stop learning the masks. Kept units keep their learned
        values (LoRA has learned alongside them, and the export folds them); if no mask step was taken yet (a
        freeze at step 0: the prior's values are an order, not a learned scale) they are set to 1. ``sigma``
        becomes the planned fractions, so the final cut is this one."""
        st, s = self.state, self.structure
        self.masks.materialize_()
        plan = self._plan()
        for kind, k, lay in (("head", plan.k_head, s.head), ("ffn", plan.k_ffn, s.ffn)):
            p = self.masks.by_kind()[kind]
            hard = p.detach().clone() if st.step > 0 else torch.ones_like(p)
            if k:
                hard.scatter_(-1, minimax.smallest_indices(p, k), 0.0)
            p.copy_(hard)
            st.sigma[kind] = k / lay.units_per_row
        self._stop_mask_learning()
        st.frozen_at = st.step

    def _stop_mask_learning(self) -> None:
        for p in self.masks.parameters():
            p.requires_grad_(False)
            p.grad = None

    def _teacher_forward(self, forward: Callable[..., Any], batch: torch.Tensor, hidden: bool):
        """The teacher's output on ``batch``, without gradient: the separate teacher, or ``forward`` (the model,
        compiled or not) with masks and LoRA off."""
        with torch.no_grad():
            if self.teacher is not None:
                return self.teacher(input_ids=batch, output_hidden_states=hidden, use_cache=False)
            with bypass(self.model, self.masks):
                return forward(input_ids=batch, output_hidden_states=hidden, use_cache=False)

    def step(self) -> dict:
        """One learning step, in the order of docs/method.md ("One learning step", the paper's Algorithm 1):
        forwards and loss, the mask and LoRA descent, then (while the selection is not frozen) the proximal step
        and the sigma step with the multiplier ascents."""
        st = self.state
        t = st.step
        t0 = time.perf_counter()
        if self.freeze_step is not None and st.frozen_at is None and t >= self.freeze_step:
            self.freeze()
        frozen = st.frozen_at is not None
        rows = self.batch_indices(t)
        batch = self.windows[rows].to(self.device)  # [B, T]
        k_cut = self._k_cut()
        terms = self._loss(batch, k_cut, frozen, rows)
        self._descend(terms["loss"], t)
        if frozen:
            return self._finish_step(t, t0, batch, terms, k_cut, {"head": False, "ffn": False}, 0, 0.0)
        self.masks.clamp_()
        prox, interval = self._proximal(t, k_cut)
        k_new, violation = self._ascend(t, k_cut)
        return self._finish_step(t, t0, batch, terms, k_new, prox, interval, violation)

    def _k_cut(self) -> dict[str, int]:
        """Units cut per row of each kind at the current sparsity fractions."""
        s, sigma = self.structure, self.state.sigma
        return {
            kind: minimax.num_cut(sigma[kind], lay.units_per_row) for kind, lay in (("head", s.head), ("ffn", s.ffn))
        }

    def _loss(self, batch: torch.Tensor, k_cut: dict[str, int], frozen: bool, rows: torch.Tensor) -> dict:
        """The teacher's and the student's forwards (the teacher's top-k read from its cache instead, with
        ``--teacher-topk``) and the loss terms (with the L0 gates' sparsity term)."""
        cfg, st = self.cfg, self.state
        want_hidden = cfg.alpha > 0.0 and cfg.distill
        cached = self.teacher_topk.rows(rows, self.device) if self.teacher_topk is not None and cfg.distill else None
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            live = cfg.distill and cached is None
            teacher = self._teacher_forward(self._forward, batch, want_hidden) if live else None
            student = self._forward(input_ids=batch, output_hidden_states=want_hidden, use_cache=False)
            terms = distillation_loss(
                student.logits,
                teacher.logits if teacher is not None else None,
                teacher_topk=cached,
                student_hidden=student.hidden_states[1:] if want_hidden else None,
                teacher_hidden=teacher.hidden_states[1:] if want_hidden else None,
                alpha=cfg.alpha,
                direction=cfg.kl_direction,
                labels=batch,
                ce_weight=cfg.ce_weight,
                layer_mse_norm=cfg.layer_mse_norm,
            )
        if self.masks.mask_type == "l0" and st.y > 0.0 and not frozen:
            # no closed-form prox for hard-concrete gates: the Lagrangian's sparsity term enters the loss
            terms["sparsity_penalty"] = sum(
                minimax.sparsity_penalty(self.masks.values(kind), k_cut[kind]) for kind in ("head", "ffn")
            )
            terms["loss"] = terms["loss"] + st.y * terms["sparsity_penalty"]
        if not torch.isfinite(terms["loss"]):
            raise NonFiniteError(
                f"the loss became {float(terms['loss'].detach())} at step {st.step}",
                fix="lower mask_lr / lora_lr or use --dtype fp32; the last checkpoint is intact",
            )
        return terms

    def _descend(self, loss: torch.Tensor, t: int) -> None:
        """The gradient step of the masks (at this step's mask lr) and of LoRA, gradients averaged over ranks."""
        optimizers = [o for o in (self.mask_optimizer, self.optimizer) if o is not None]
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        if loss.requires_grad:  # no LoRA and a frozen selection: nothing left to learn
            loss.backward()
        D.all_reduce_grads(self._trainable)
        for g in self.mask_optimizer.param_groups:
            g["lr"] = self.mask_lr(t)
        for g in self.optimizer.param_groups if self.optimizer is not None else ():
            g["lr"] = self.lora_lr(t)
        for o in optimizers:
            o.step()

    def _proximal(self, t: int, k_cut: dict[str, int]) -> tuple[dict[str, bool], int]:
        """The proximal step on the parameters just produced (heads every step, FFN every k steps; for
        polarization gates it shrinks theta, which shrinks the same smallest gates; L0 has none), the cut ramp's
        cap; ``(which kinds took the step, the FFN interval)``."""
        cfg, total = self.cfg, self.cfg.steps
        interval = minimax.ffn_prox_interval(t, total, cfg.ffn_prox_start, cfg.ffn_prox_end)
        prox = {"head": True, "ffn": t % interval == 0}
        if self.masks.mask_type == "l0":
            prox = {"head": False, "ffn": False}
        with torch.no_grad():
            for kind, param in self.masks.by_kind().items():
                if prox[kind]:
                    param.copy_(minimax.proximal_step(param, k_cut[kind], cfg.eta1, self.state.y))
            cap = self.cut_ramp_cap(t)
            if cap is not None and self.masks.mask_type == "uniform":
                plan = self._plan()  # the counts the freeze will cut (the budget is at its target by now)
                for kind, k in (("head", plan.k_head), ("ffn", plan.k_ffn)):
                    param = self.masks.by_kind()[kind]
                    param.copy_(minimax.cap_smallest(param, k, cap))
        if self.masks.mask_type == "polarization":
            self.masks.eps = minimax.geometric_schedule(t + 1, total, *POLARIZATION_EPS)
        return prox, interval

    def _ascend(self, t: int, k_cut: dict[str, int]) -> tuple[dict[str, int], float]:
        """The straight-through sigma step, then the ascent of y and z, all on the mask values; ``(units cut per
        row at the new sigma, the sparsity violation)``."""
        cfg, st, s = self.cfg, self.state, self.structure
        with torch.no_grad():
            values = {kind: self.masks.values(kind).detach() for kind in ("head", "ffn")}
        target = minimax.budget_ratio(t, cfg.steps, self.final_ratio, cfg.warmup_share)
        for kind, val in values.items():
            lay = s.head if kind == "head" else s.ffn
            st.sigma[kind] = minimax.sigma_step(
                st.sigma[kind],
                y=st.y,
                z=st.z,
                next_sq_mean=float(minimax.next_smallest_sq(val, k_cut[kind]).mean()),
                weight=s.resource_weight(kind, cfg.resource_weight),
                eta2=cfg.eta2,
                sigma_max=(lay.units_per_row - 1) / lay.units_per_row,
            )
        k_new = self._k_cut()
        violation = sum(minimax.sparsity_violation(v, k_new[kind]) for kind, v in values.items())
        st.y = minimax.y_step(st.y, violation=violation, eta3=cfg.eta3)
        size = s.params_after(st.sigma["head"] * s.head.units_per_row, st.sigma["ffn"] * s.ffn.units_per_row)
        st.z = minimax.z_step(st.z, size_ratio=size / s.dense_params, target_ratio=target, eta4=cfg.eta4)
        return k_new, violation

    def _finish_step(
        self,
        t: int,
        t0: float,
        batch: torch.Tensor,
        terms: dict,
        k_new: dict,
        prox: dict,
        interval: int,
        violation: float,
    ) -> dict:
        """Checks, the step counter, and the step's metrics (the same keys before and after the freeze)."""
        st, s = self.state, self.structure
        self._check_finite(t)
        if D.world() > 1 and (t % self.cfg.sync_check_every == 0 or t == self.cfg.steps - 1):
            D.check_consistent(
                {"y": st.y, "z": st.z, **{f"sigma_{k}": v for k, v in st.sigma.items()}}, dict(self.masks.by_kind()), t
            )
        st.step += 1
        with torch.no_grad():
            values = {kind: self.masks.values(kind).detach() for kind in ("head", "ffn")}
        size = s.params_after(st.sigma["head"] * s.head.units_per_row, st.sigma["ffn"] * s.ffn.units_per_row)
        dt = time.perf_counter() - t0
        metrics = {
            "step": t,
            **D.all_reduce_mean({k: float(v.detach()) for k, v in terms.items()}, self.device),
            "sigma_head": st.sigma["head"],
            "sigma_ffn": st.sigma["ffn"],
            "k_head": k_new["head"],
            "k_ffn": k_new["ffn"],
            "y": st.y,
            "z": st.z,
            "size_ratio": size / s.dense_params,
            "target_ratio": minimax.budget_ratio(t, self.cfg.steps, self.final_ratio, self.cfg.warmup_share),
            "size_at_cut": s.params_after(k_new["head"], k_new["ffn"]),
            "violation": violation,
            "prox_head": prox["head"],
            "prox_ffn": prox["ffn"],
            "ffn_prox_interval": interval,
            "frozen": st.frozen_at is not None,
            "ffn_alive_std": float((values["ffn"] > 0.05).sum(dim=(1, 2)).float().std()),
            "mask_mean_head": float(values["head"].mean()),
            "mask_mean_ffn": float(values["ffn"].mean()),
            "lr_mask": self.mask_optimizer.param_groups[0]["lr"] if st.frozen_at is None else 0.0,
            "lr_lora": self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0,
            "seconds": dt,
            "tokens_per_s": batch.numel() / dt,
        }
        if self.val_windows is not None and (st.step % self.val_every == 0 or st.step == self.cfg.steps):
            metrics.update(self.validate())
        if self.on_step is not None:
            self.on_step(metrics)
        return metrics

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """``val_kl`` (KL to the teacher, in the training loss's direction; absent without distillation),
        ``val_ce`` and ``val_ppl`` (the student's next-token cross-entropy and its exp) on the held-out windows,
        in eval mode with the masks and LoRA as they are now. Every process scores every window (under FSDP
        the forwards are collective); nothing random is drawn, so the training that follows is unchanged."""
        assert self.val_windows is not None
        cfg, b = self.cfg, self.cfg.batch_size
        sums, n = {"ce": 0.0, "kl": 0.0}, 0
        modes = (self.model.training, self.masks.training)
        self.model.eval()
        self.masks.eval()
        try:
            for i in range(0, self.val_windows.shape[0], b):
                batch = self.val_windows[i : i + b].to(self.device)
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    student = self.model(input_ids=batch, use_cache=False).logits
                    sums["ce"] += float(lm_cross_entropy(student, batch)) * batch.shape[0]
                    if cfg.distill and self.val_teacher_topk is not None:  # the KL over the top-k and the tail
                        rows = torch.arange(i, i + batch.shape[0])
                        cached = self.val_teacher_topk.rows(rows, self.device)
                        sums["kl"] += float(topk_kl(student, *cached, direction=cfg.kl_direction)) * batch.shape[0]
                    elif cfg.distill:
                        teacher = self._teacher_forward(self.model, batch, False).logits
                        kl = kl_divergence(student, teacher, direction=cfg.kl_direction)
                        sums["kl"] += float(kl) * batch.shape[0]
                n += batch.shape[0]
        finally:
            self.model.train(modes[0])
            self.masks.train(modes[1])
        out = {"val_ce": sums["ce"] / n, "val_ppl": math.exp(min(sums["ce"] / n, 700.0))}
        if cfg.distill:
            out["val_kl"] = sums["kl"] / n
        return out

    def _check_finite(self, t: int) -> None:
        st = self.state
        bad = [
            name
            for name, v in (("y", st.y), ("z", st.z), ("sigma_head", st.sigma["head"]), ("sigma_ffn", st.sigma["ffn"]))
            if not math.isfinite(v)
        ]
        bad += [f"{k} mask" for k, p in self.masks.by_kind().items() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(
                f"non-finite values ({', '.join(bad)}) at step {t}", fix="lower eta1..eta4 or the learning rates"
            )

    # ---- checkpoint state --------------------------------------------------------------------
    def _lora_params(self) -> dict[str, torch.Tensor]:
        """The weights the step trains besides the masks: the LoRA adapters, or every weight with ``full``."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and ("lora_" in n or self.cfg.full)}

    def state_dict(self) -> dict:
        """Everything the next step depends on (the data position is a function of the step).

        Sharded (FSDP) LoRA weights and their optimizer state are gathered whole, so the checkpoint
        is the same file with or without FSDP; every process must call this (it is a collective then).
        """

        def gathered(o: torch.optim.Optimizer | None) -> dict | None:
            if o is None:
                return None
            opt = o.state_dict()
            opt["state"] = {
                i: {k: (D.full(v).detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                for i, st in opt["state"].items()
            }
            return opt

        return {
            "state": self.state.to_dict(),
            "masks": {k: p.detach().cpu().clone() for k, p in self.masks.by_kind().items()},
            "lora": {n: D.full(p.detach()).cpu().clone() for n, p in self._lora_params().items()},
            "optimizer": gathered(self.optimizer),
            "mask_optimizer": gathered(self.mask_optimizer),
            "rng": torch.get_rng_state(),
        }

    @torch.no_grad()
    def load_state_dict(self, payload: dict) -> None:
        st = payload["state"]
        self.state = LearnState(
            step=int(st["step"]),
            sigma=dict(st["sigma"]),
            y=float(st["y"]),
            z=float(st["z"]),
            frozen_at=st.get("frozen_at"),
        )
        if self.state.frozen_at is not None:  # the checkpoint holds the hard 0/1 mask values
            self.masks.mask_type = "uniform"
            self._stop_mask_learning()
        for k, p in self.masks.by_kind().items():
            p.copy_(payload["masks"][k].to(p.device))
        if self.masks.mask_type == "polarization":
            self.masks.eps = minimax.geometric_schedule(self.state.step, self.cfg.steps, *POLARIZATION_EPS)
        lora = self._lora_params()
        if set(lora) != set(payload["lora"]):
            raise ValueError("the checkpoint's LoRA parameters do not match this model's")
        for n, p in lora.items():
            p.copy_(D.like(payload["lora"][n].to(p.dtype), p))
        for o, opt in ((self.optimizer, payload["optimizer"]), (self.mask_optimizer, payload["mask_optimizer"])):
            if o is None:
                continue
            params = [p for g in o.param_groups for p in g["params"]]
            opt = {
                **opt,
                "state": {
                    i: {
                        k: (D.like(v, params[int(i)]) if torch.is_tensor(v) and v.dim() > 0 else v)
                        for k, v in st.items()
                    }
                    for i, st in opt["state"].items()
                },
            }
            o.load_state_dict(opt)
        torch.set_rng_state(payload["rng"])

    def run(
        self,
        *,
        checkpoint: Callable[["Learner"], None] | None = None,
        every: int = 0,
        should_stop: Callable[[], bool] | None = None,
        retarget: Callable[[int], int | None] | None = None,
    ) -> LearnState:
        """Step until ``cfg.steps``. ``checkpoint(self)`` is called every ``every`` steps and, when
        ``should_stop()`` turns true (a signal), once more before :class:`Interrupted` is raised. ``retarget(steps
        done)``, after every step, may return a new step count (a time budget's :class:`maskprune.budget.Pacer`):
        the learning-rate schedule and the last validation follow it. A distillation only (the selection's own
        schedule is fixed at the start)."""
        self.model.train()
        self.masks.train()
        try:
            while self.state.step < self.cfg.steps:
                self.step()
                new = retarget(self.state.step) if retarget is not None else None
                if new is not None and new != self.cfg.steps:
                    self.cfg = self.cfg.replace(steps=max(new, self.state.step))
                if should_stop is not None and D.any_true(should_stop(), self.device):
                    if checkpoint is not None:
                        checkpoint(self)
                    raise Interrupted(self.state.step)
                if (
                    checkpoint is not None
                    and every
                    and self.state.step % every == 0
                    and self.state.step < self.cfg.steps
                ):
                    checkpoint(self)
        finally:
            self.model.eval()
            self.masks.eval()
        return self.state
