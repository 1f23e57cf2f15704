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


def test_distill_memory_adds_the_teacher_and_full_training_costs_sixteen_bytes_a_weight():
    from maskprune.memory import LLAMA2_7B, estimate_distill_memory, pruned_shape

    student = pruned_shape(LLAMA2_7B, 0.2)
    assert abs(1 - student.params / LLAMA2_7B.params - 0.2) < 0.01 and student.heads == LLAMA2_7B.heads
    lora = estimate_distill_memory(student, LLAMA2_7B, batch_tokens=8192, full=False)
    full = estimate_distill_memory(student, LLAMA2_7B, batch_tokens=8192, full=True)
    assert lora["teacher_weights_bf16"] == full["teacher_weights_bf16"] == 2 * LLAMA2_7B.params
    assert full["weights"] + full["full_grads_and_adam"] == 16 * student.params
    assert full["total"] - lora["total"] > 13 * student.params  # fp32 master, grads, Adam vs bf16 + LoRA
    assert lora["total"] == sum(v for k, v in lora.items() if k != "total")
