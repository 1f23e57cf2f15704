"""Simulate the s / y / z / proximal dynamics on SmolLM2-shaped masks without a model.

Masks get the proximal step and a small random walk (a stand-in for AdamW's steps at lr 1e-2), so
this measures how well the multipliers track the budget schedule and how much mask mass is left on
the units that the cut removes. It is for choosing eta1..eta4 quickly; the real-model runs decide.

    python bench/sim_dynamics.py --steps 150 --sparsity 0.2
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from maskprune import minimax
from maskprune.arch import FFNLayout, HeadLayout, get_adapter
from maskprune.cut import cut_mass_share, kept_indices, plan_cut
from maskprune.structure import Structure

# SmolLM2-135M: 30 layers, 9 query / 3 KV heads (query policy: 3 rows of 3), FFN 1536, hidden 576.
HEAD = HeadLayout(
    kind="head",
    rows=3,
    units_per_row=3,
    params_per_unit=2 * 576 * 64,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    policy="query",
)
FFN = FFNLayout(kind="ffn", rows=1, units_per_row=1536, params_per_unit=3 * 576)
S = Structure(get_adapter("llama"), HEAD, FFN, 30, 134_515_008)


def simulate(
    steps: int,
    sparsity: float,
    eta1: float,
    eta2: float,
    eta3: float,
    eta4: float,
    warmup: float = 0.7,
    noise: float = 0.01,
    seed: int = 0,
) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = {"head": torch.ones(30, 3, 3), "ffn": torch.ones(30, 1, 1536)}
    sigma, y, z = {"head": 0.0, "ffn": 0.0}, 0.0, 0.0
    lay = {"head": HEAD, "ffn": FFN}
    final = 1 - sparsity
    err = []
    for t in range(steps):
        for m in masks.values():  # AdamW-like jitter, clamped
            m.add_(noise * torch.randn(m.shape, generator=g)).clamp_(0, 1)
        k = {kd: minimax.num_cut(sigma[kd], lay[kd].units_per_row) for kd in masks}
        interval = minimax.ffn_prox_interval(t, steps)
        for kd, m in masks.items():
            if kd == "head" or t % interval == 0:
                masks[kd] = minimax.proximal_step(m, k[kd], eta1, y)
        target = minimax.budget_ratio(t, steps, final, warmup)
        for kd, m in masks.items():
            sigma[kd] = minimax.sigma_step(
                sigma[kd],
                y=y,
                z=z,
                next_sq_mean=float(minimax.next_smallest_sq(m, k[kd]).mean()),
                weight=S.resource_weight(kd, "share"),
                eta2=eta2,
                sigma_max=(lay[kd].units_per_row - 1) / lay[kd].units_per_row,
            )
        k = {kd: minimax.num_cut(sigma[kd], lay[kd].units_per_row) for kd in masks}
        y = minimax.y_step(y, violation=sum(minimax.sparsity_violation(m, k[kd]) for kd, m in masks.items()), eta3=eta3)
        size = S.params_after(sigma["head"] * 3, sigma["ffn"] * 1536) / S.dense_params
        z = minimax.z_step(z, size_ratio=size, target_ratio=target, eta4=eta4)
        err.append(size - target)
    plan = plan_cut(S, sigma_head=sigma["head"], budget=int(S.dense_params * final))
    mass = {kd: cut_mass_share(masks[kd], kept_indices(masks[kd], getattr(plan, f"k_{kd}"))) for kd in masks}
    return {
        "eta": [eta1, eta2, eta3, eta4],
        "sigma": {k: round(v, 3) for k, v in sigma.items()},
        "y": round(y, 2),
        "z": round(z, 2),
        "k": [plan.k_head, plan.k_ffn],
        "track_final": round(err[-1], 4),
        "track_max": round(max(abs(e) for e in err), 4),
        "mass": {k: round(v, 3) for k, v in mass.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--sparsity", type=float, default=0.2)
    a = ap.parse_args()
    for e1, e2, e3, e4 in itertools.product([0.02, 0.1, 0.5], [0.02, 0.1], [0.5, 2.0], [1.0, 5.0]):
        print(json.dumps(simulate(a.steps, a.sparsity, e1, e2, e3, e4)))


if __name__ == "__main__":
    main()
