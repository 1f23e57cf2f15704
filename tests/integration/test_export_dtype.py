"""Half-precision learning weights (the default, bf16): merge, fold and parity run in fp32 on a rebuilt
model, then the finished model is cast to the export dtype (by default the source's), saved, and reloaded
bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tiny
from maskprune.cli import main


@pytest.mark.parametrize(
    "method,export,source",
    [
        ("maskprune", "auto", "fp32"),
        ("maskprune", "auto", "bf16"),
        ("maskprune", "fp32", "bf16"),
        ("wanda-sp", "auto", "bf16"),
    ],
)
def test_bf16_learning_weights_export_through_an_fp32_fold(method, export, source, tmp_path, capsys):
    model = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    if source == "bf16":  # a checkpoint that declares bf16, as most hub models do
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(model)
        assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    calib = tiny.write_calib(tmp_path / "c.jsonl")
    out = tmp_path / "o"
    code = main(
        [
            "-q",
            "prune",
            str(model),
            "--method",
            method,
            "--weight-dtype",
            "bf16",
            "--export-dtype",
            export,
            "--sparsity",
            "0.3",
            "--steps",
            "30",
            *tiny.small_run(calib),
            "--no-report",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    # auto: the dtype the source declares, whatever the learning weights were
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[source if export == "auto" else export]
    assert r["roundtrip"]["dtype"] == str(want).replace("torch.", "")
    assert r["parity"]["max_abs_diff"] <= 1e-3 * max(1.0, r["parity"]["ref_max_abs"])  # the fp32 fold
    assert r["roundtrip"]["max_abs_diff"] == 0.0  # the saved file is the in-memory model
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {want}
