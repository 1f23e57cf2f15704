"""Data parallel on CPU: 2 gloo processes (torchrun) vs 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny

ARGS = ["--sparsity", "0.3", "--steps", "16", "--seq-len", "32", "--calib-samples", "16", "--batch-size", "4",
        "--eval-data", "none", "--dtype", "fp32", "--threads", "1", "--checkpoint-every", "0", "--no-report"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), f"--nproc-per-node={n}", "--master-addr=127.0.0.1", f"--master-port={_port()}",
                           "-m", "maskprune", "-q", "prune", *args], env=_env(), capture_output=True, text=True,
                          timeout=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model = tiny.save_tiny(root / "model", "llama_gqa")
    calib = tiny.write_calib(root / "calib.jsonl")
    common = [str(model), "--calib", str(calib), *ARGS]
    one = subprocess.run([sys.executable, "-m", "maskprune", "-q", "prune", *common, "--out", str(root / "one")],
                         env=_env(), capture_output=True, text=True, timeout=400)
    assert one.returncode == 0, one.stderr
    two = _torchrun(2, *common, "--out", str(root / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    return root, model, calib


def test_two_processes_match_one_with_the_same_global_batch(runs):
    root, _, _ = runs
    a = json.loads((root / "one" / "maskprune_report.json").read_text())
    b = json.loads((root / "two" / "maskprune_report.json").read_text())
    assert b["machine"]["processes"] == 2 and a["machine"]["processes"] == 1
    assert a["kept_units"] == b["kept_units"]
    for k in ("y", "z"):
        assert b["final_state"][k] == pytest.approx(a["final_state"][k], rel=1e-3, abs=1e-4)
    ma = torch.load(root / "one" / "masks.pt", weights_only=True)
    mb = torch.load(root / "two" / "masks.pt", weights_only=True)
    for k in ma:  # gradients averaged in another order: tiny float differences, amplified a little by Adam
        assert torch.allclose(ma[k], mb[k], atol=2e-3), (k, float((ma[k] - mb[k]).abs().max()))
    wa, wb = load_file(str(root / "one" / "model.safetensors")), load_file(str(root / "two" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=5e-3, rtol=1e-3), k
    lines = (root / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 16  # rank 0 alone writes


def test_a_desynchronised_rank_is_caught(runs, tmp_path):
    root, model, calib = runs
    # rank 1 perturbs its masks once: the run-time check must stop the run with a clear message
    env = {**_env(), "MASKPRUNE_TEST_DESYNC_RANK": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={_port()}",
                           str(Path(__file__).with_name("desync_child.py")), str(model), "--calib", str(calib), *ARGS,
                           "--sync-check-every", "1", "--out", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    assert "processes disagree at step" in proc.stderr
    assert not (tmp_path / "o").exists()
