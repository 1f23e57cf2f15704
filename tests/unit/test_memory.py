"""The memory accounting behind the README's projections and the performance benchmark."""

from __future__ import annotations

import pytest

from maskprune.memory import LLAMA2_7B, LLAMA3_70B, estimate_learning_memory, lora_params


def test_components_add_up_and_checkpointing_shrinks_only_activations():
    off = estimate_learning_memory(LLAMA2_7B, batch_tokens=16 * 512, weight_bytes=2)
    on = estimate_learning_memory(LLAMA2_7B, batch_tokens=16 * 512, weight_bytes=2, gradient_checkpointing=True)
    parts = [k for k in off if k not in ("total", "teacher_share")]
    assert off["total"] == pytest.approx(sum(off[k] for k in parts))
    assert off["weights"] == LLAMA2_7B.params * 2  # one copy: the teacher shares the student's weights
    assert on["student_activations"] < off["student_activations"] / 10
    assert {k: on[k] for k in parts if k != "student_activations"} == {
        k: off[k] for k in parts if k != "student_activations"
    }
    assert 0 < off["teacher_share"] < 0.05


def test_fsdp_shards_weights_lora_and_adam_but_gathers_two_layers():
    one = estimate_learning_memory(LLAMA3_70B, batch_tokens=1024, weight_bytes=2)
    eight = estimate_learning_memory(LLAMA3_70B, batch_tokens=1024, weight_bytes=2, shards=8)
    layer = (LLAMA3_70B.params - 2 * LLAMA3_70B.vocab * LLAMA3_70B.hidden) / LLAMA3_70B.layers
    assert eight["weights"] == pytest.approx(one["weights"] / 8 + 2 * layer * 2)
    masks = LLAMA3_70B.layers * (LLAMA3_70B.heads + LLAMA3_70B.intermediate)
    assert eight["lora_and_masks_with_grads_and_adam"] == pytest.approx((lora_params(LLAMA3_70B, 8) / 8 + masks) * 16)
    assert eight["student_activations"] == one["student_activations"]  # activations are per process anyway
    assert eight["total"] < 80 * 2**30 < one["total"]  # 70B: a node with FSDP, not one GPU
