"""The learner's KL against the autograd definition it replaced, on SmolLM2's real learning step.

    python bench/kl_check.py    # writes bench/results/<date>-kl-check.json; about 30 s on 2 CPU cores

Two readings (bench/results/2026-11-24-numerics-smollm2-reading.md):

1. Away from the start (masks drawn in [0.5, 1], LoRA B nonzero): the mask and LoRA gradients of one step with
   ``losses.kl_divergence`` (row blocks, gradient formed in the forward) and with the autograd definition
   (``perf._autograd_kl``: log-softmax of both sides under checkpointing) -- cosine and norms, next to the
   cosine of the autograd definition with itself (run-to-run nondeterminism).
2. At the start (student == teacher): the gradient each returns with respect to the logits. The KL is at its
   minimum there, so the exact gradient is 0; the autograd path returns rounding residue, which Adam (scale
   free) turns into mask steps of up to the learning rate.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf  # noqa: E402  (bench/perf.py: the autograd definition)
from maskprune.config import load_config  # noqa: E402
from maskprune.losses import kl_divergence  # noqa: E402
from maskprune.masks import bypass  # noqa: E402
from maskprune.stages.learned import build_learner  # noqa: E402


def step_gradients(model, masks, batch, kl) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Loss, mask gradient and LoRA-A gradient of one teacher + student step with the KL function ``kl``."""
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    for p in [*masks.parameters(), *lora]:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad(), bypass(model, masks):
            teacher = model(input_ids=batch, use_cache=False).logits
        student = model(input_ids=batch, use_cache=False).logits
        loss = kl(student, teacher)
    loss.backward()
    return (
        float(loss.detach()),
        torch.cat([masks.ffn.grad.flatten(), masks.head.grad.flatten()]),
        torch.cat([p.grad.flatten() for p in lora]),
    )


def main() -> None:
    torch.manual_seed(0)
    cfg = load_config(overrides=dict(seq_len=128, calib_samples=8, batch_size=4, mask_init="ones", weight_dtype="bf16"))
    build = build_learner(cfg)  # LoRA rank 8, alpha 16 on every role: the config's defaults
    model, masks = build.model, build.masks
    batch = build.windows[:4]
    blocked = lambda s, t: kl_divergence(s, t, direction="teacher_student")  # noqa: E731
    autograd = lambda s, t: perf._autograd_kl(s, t, "teacher_student")  # noqa: E731
    cos = torch.nn.functional.cosine_similarity
    out: dict = {}

    with torch.no_grad():
        masks.ffn.uniform_(0.5, 1.0)
        masks.head.uniform_(0.5, 1.0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    l_a, m_a, a_a = step_gradients(model, masks, batch, autograd)
    l_b, m_b, a_b = step_gradients(model, masks, batch, blocked)
    l_c, m_c, a_c = step_gradients(model, masks, batch, autograd)
    out["away_from_start"] = {
        "loss_autograd": l_a,
        "loss_blocked": l_b,
        "mask_grad_cosine_blocked_vs_autograd": float(cos(m_a, m_b, dim=0)),
        "mask_grad_cosine_autograd_vs_itself": float(cos(m_a, m_c, dim=0)),
        "mask_grad_norm_autograd": float(m_a.norm()),
        "mask_grad_norm_blocked": float(m_b.norm()),
        "lora_a_grad_cosine_blocked_vs_autograd": float(cos(a_a, a_b, dim=0)),
        "lora_a_grad_norm_autograd": float(a_a.norm()),
        "lora_a_grad_norm_blocked": float(a_b.norm()),
    }

    with torch.no_grad():
        masks.ffn.fill_(1.0)
        masks.head.fill_(1.0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    start = {}
    for name, kl in (("autograd", autograd), ("blocked", blocked)):
        _, m, _ = step_gradients(model, masks, batch, kl)
        start[f"mask_grad_max_abs_{name}"] = float(m.abs().max())
        start[f"mask_grad_nonzero_share_{name}"] = float((m != 0).float().mean())
    out["at_start_student_equals_teacher"] = start
    out = {
        "command": "python bench/kl_check.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        **out,
    }
    dest = Path(__file__).resolve().parent / "results" / f"{datetime.date.today().isoformat()}-kl-check.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
