"""Memory accounting for mask learning: what one process holds at its peak, by component.

The same accounting serves the performance benchmark (checked against the measured peak on
SmolLM2) and the README's projections for 7B / 13B models. Activation bytes follow the tensors a
Llama-style block keeps for its backward pass under bf16 autocast (see :func:`activation_bytes_per_token`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "parse_bytes",
    "format_bytes",
    "ModelShape",
    "activation_bytes_per_token",
    "estimate_learning_memory",
    "estimate_distill_memory",
    "pruned_shape",
    "LLAMA2_7B",
    "LLAMA2_13B",
    "LLAMA3_8B",
    "LLAMA3_70B",
    "shape_of",
]


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40})


def parse_bytes(text: str | int | float) -> int:
    """Bytes from ``24GB`` (10^9), ``80GiB`` / ``80G`` (2^30), or a plain number of bytes; ValueError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        import re

        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"expected a size like 24GB, 80GiB or a number of bytes, found {text!r}")
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ValueError(f"expected a size above 0, found {text!r}")
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``n`` bytes as GiB / MiB with one decimal."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


LLAMA2_7B = ModelShape(6_738_415_616, 32, 4096, 11008, 32, 32, 128, 32000)
LLAMA2_13B = ModelShape(13_015_864_320, 40, 5120, 13824, 40, 40, 128, 32000)
LLAMA3_8B = ModelShape(8_030_261_248, 32, 4096, 14336, 32, 8, 128, 128256)
LLAMA3_70B = ModelShape(70_553_706_496, 80, 8192, 28672, 64, 8, 128, 128256)


def shape_of(model) -> ModelShape:
    from .arch import adapter_for

    c = adapter_for(model).shape(model.config)
    return ModelShape(
        sum(p.numel() for p in model.parameters()),
        c["num_hidden_layers"],
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["head_dim"],
        c["vocab_size"],
    )


def activation_bytes_per_token(s: ModelShape, act_bytes: int = 2) -> int:
    """Bytes one token keeps per layer for the student's backward (no checkpointing).

    Saved: 4 inputs of width ``hidden`` (q/k/v, o via the mask hook, gate/up, residual), q/k/v outputs
    and the attention output (also its masked copy), six FFN-width tensors (gate, up, act(gate),
    product, its masked copy, down's input), and two RMSNorm inputs kept in fp32.
    """
    qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
    attn_out = s.heads * s.head_dim
    return act_bytes * (4 * s.hidden + qkv + 2 * attn_out + 6 * s.intermediate) + 2 * 4 * s.hidden


def lora_params(s: ModelShape, rank: int) -> int:
    qd, kvd = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = rank * (
        (s.hidden + qd)
        + 2 * (s.hidden + kvd)
        + (qd + s.hidden)
        + 2 * (s.hidden + s.intermediate)
        + (s.intermediate + s.hidden)
    )
    return per_layer * s.layers


def estimate_learning_memory(
    s: ModelShape,
    *,
    batch_tokens: int,
    weight_bytes: int,
    lora_rank: int = 8,
    gradient_checkpointing: bool = False,
    layer_mse: bool = False,
    kl_rows: int = 256,
    shards: int = 1,
) -> dict[str, float]:
    """Peak bytes of one mask-learning process, by component (teacher shares the weights).

    ``batch_tokens`` is this process's share of the batch. ``shards`` > 1: FSDP over that many
    processes: each holds ``1/shards`` of the weights, LoRA and Adam state, plus two whole decoder
    layers gathered at a time (the one computing and the one prefetched); masks stay replicated.
    """
    act = activation_bytes_per_token(s)
    if gradient_checkpointing:  # layer inputs kept, one layer's activations rebuilt at a time
        activations = batch_tokens * (s.layers * 2 * s.hidden + act)
    else:
        activations = batch_tokens * s.layers * act
    n_lora = lora_params(s, lora_rank)
    masks = s.layers * (s.heads + s.intermediate)
    layer_params = (s.params - 2 * s.vocab * s.hidden) / s.layers
    weights = (
        s.params * weight_bytes if shards == 1 else s.params * weight_bytes / shards + 2 * layer_params * weight_bytes
    )
    out = {
        "weights": weights,
        "lora_and_masks_with_grads_and_adam": (n_lora / shards + masks) * 4 * 4,
        "student_activations": activations,
        "logits_student_and_teacher_bf16": 2 * batch_tokens * s.vocab * 2,
        # losses._BlockedKL: three fp32 row blocks, and the student-logit gradient it keeps for backward
        "kl_blocks_fp32": 3 * min(batch_tokens, kl_rows) * s.vocab * 4,
        "kl_gradient_bf16": batch_tokens * s.vocab * 2,
        "teacher_hidden_states": (s.layers * batch_tokens * s.hidden * 2) if layer_mse else 0,
    }
    out["total"] = sum(out.values())
    out["teacher_share"] = (batch_tokens * s.vocab * 2 + out["teacher_hidden_states"]) / out["total"]
    return out


def pruned_shape(s: ModelShape, sparsity: float) -> ModelShape:
    """``s`` with FFN channels cut from every layer until ``sparsity`` of all parameters are gone (the split the
    default recipe measured on SmolLM2: every head kept)."""
    per_channel = s.layers * 3 * s.hidden
    cut = min(s.intermediate - 1, round(sparsity * s.params / per_channel))
    return ModelShape(
        s.params - cut * per_channel, s.layers, s.hidden, s.intermediate - cut, s.heads, s.kv_heads, s.head_dim, s.vocab
    )


def estimate_distill_memory(
    student: ModelShape,
    teacher: ModelShape,
    *,
    batch_tokens: int,
    full: bool,
    lora_rank: int = 8,
    gradient_checkpointing: bool = False,
) -> dict[str, float]:
    """Peak bytes of one ``maskprune distill`` process (one GPU): the student as the learner holds it (bf16
    weights under LoRA; fp32 weights, gradients and two Adam moments, 16 bytes a weight, with ``full``), plus
    the teacher's bf16 weights and logits (no gradient, nothing kept for backward)."""
    out = estimate_learning_memory(
        student,
        batch_tokens=batch_tokens,
        weight_bytes=4 if full else 2,
        lora_rank=lora_rank,
        gradient_checkpointing=gradient_checkpointing,
    )
    if full:  # gradients and Adam moments of every weight; no LoRA
        out["full_grads_and_adam"] = student.params * 12
        out["lora_and_masks_with_grads_and_adam"] = 0
    out["teacher_weights_bf16"] = teacher.params * 2
    out.pop("total")
    out.pop("teacher_share")
    out["total"] = sum(out.values())
    return out
