"""Half-precision learning weights: merge, fold and parity run in fp32 on a rebuilt model, then the
finished model is cast to the export dtype, saved, and reloaded bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from maskprune.cli import main

import tiny


@pytest.mark.parametrize("method,export", [("maskprune", "auto"), ("maskprune", "fp32"), ("wanda-sp", "auto")])
def test_bf16_learning_weights_export_through_an_fp32_fold(method, export, tmp_path, capsys):
    model = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    calib = tiny.write_calib(tmp_path / "c.jsonl")
    out = tmp_path / "o"
    code = main(["-q", "prune", str(model), "--method", method, "--weight-dtype", "bf16", "--export-dtype", export,
                 "--sparsity", "0.3", "--steps", "30", "--seq-len", "32", "--calib-samples", "16", "--calib", str(calib),
                 "--eval-seq-len", "64", "--eval-max-windows", "2", "--no-report", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    want = torch.bfloat16 if export == "auto" else torch.float32
    assert r["roundtrip"]["dtype"] == str(want).replace("torch.", "")
    assert r["parity"]["max_abs_diff"] <= 1e-3 * max(1.0, r["parity"]["ref_max_abs"])  # the fp32 fold
    assert r["roundtrip"]["max_abs_diff"] == 0.0  # the saved file is the in-memory model
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {want}
