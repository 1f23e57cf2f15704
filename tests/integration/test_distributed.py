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

ARGS = [  # the masked path (data-parallel); a single process would cut first by default
    "--no-cut-first",
    "--sparsity",
    "0.3",
    "--steps",
    "16",
    *tiny.small_run(None, batch_size=4, evaluate=False, dtype="fp32", threads=1),
    "--checkpoint-every",
    "0",
    "--val-every",
    "8",
    "--val-windows",
    "4",
    "--no-report",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run(
        [
            str(torchrun),
            f"--nproc-per-node={n}",
            "--master-addr=127.0.0.1",
            f"--master-port={_port()}",
            "-m",
            "maskprune",
            "-q",
            "prune",
            *args,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model = tiny.save_tiny(root / "model", "llama_gqa")
    calib = tiny.write_calib(root / "calib.jsonl")
    common = [str(model), "--calib", str(calib), *ARGS]
    one = subprocess.run(
        [sys.executable, "-m", "maskprune", "-q", "prune", *common, "--out", str(root / "one")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert one.returncode == 0, one.stderr
    two = _torchrun(2, *common, "--out", str(root / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    fsdp = _torchrun(2, *common, "--fsdp", "--out", str(root / "fsdp"))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    return root, model, calib


@pytest.mark.parametrize("run", ["two", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(runs, run):
    """DDP-style replication and FSDP2 sharding both give the single-process result."""
    root, _, _ = runs
    a = json.loads((root / "one" / "maskprune_report.json").read_text())
    b = json.loads((root / run / "maskprune_report.json").read_text())
    assert b["machine"]["processes"] == 2 and a["machine"]["processes"] == 1
    assert b["machine"]["sharding"] == ("fsdp2" if run == "fsdp" else "replicated")
    assert a["kept_units"] == b["kept_units"]
    for k in ("y", "z"):
        assert b["final_state"][k] == pytest.approx(a["final_state"][k], rel=1e-3, abs=1e-4)
    ma = torch.load(root / "one" / "masks.pt", weights_only=True)
    mb = torch.load(root / run / "masks.pt", weights_only=True)
    for k in ma:  # gradients averaged in another order: tiny float differences, amplified a little by Adam
        assert torch.allclose(ma[k], mb[k], atol=2e-3), (k, float((ma[k] - mb[k]).abs().max()))
    wa, wb = load_file(str(root / "one" / "model.safetensors")), load_file(str(root / run / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=5e-3, rtol=1e-3), k
    lines = (root / run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 16  # rank 0 alone writes
    # validation: every process scores every held-out window (collective forwards under FSDP), rank 0 reports
    assert [c["steps"] for c in b["validation"]] == [c["steps"] for c in a["validation"]] == [8, 16]
    for ca, cb in zip(a["validation"], b["validation"]):
        assert cb["ppl"] == pytest.approx(ca["ppl"], rel=1e-3)
        assert cb["kl"] == pytest.approx(ca["kl"], rel=1e-2, abs=1e-5)


def test_a_desynchronised_rank_is_caught(runs, tmp_path):
    root, model, calib = runs
    # rank 1 perturbs its masks once: the run-time check must stop the run with a clear message
    env = {**_env(), "MASKPRUNE_TEST_DESYNC_RANK": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={_port()}",
            str(Path(__file__).with_name("desync_child.py")),
            str(model),
            "--calib",
            str(calib),
            *ARGS,
            "--sync-check-every",
            "1",
            "--out",
            str(tmp_path / "o"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode != 0
    assert "processes disagree at step" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_fsdp_killed_and_resumed_ends_where_the_uninterrupted_fsdp_run_ends(runs, tmp_path):
    """Checkpoints under FSDP gather the sharded LoRA weights and optimizer state whole (every rank
    takes part); a resumed run shards them again and finishes where the uninterrupted run did."""
    import signal
    import time

    from maskprune.checkpoint import list_checkpoints

    root, model, calib = runs
    out = tmp_path / "o"
    ckpt = out.with_name(out.name + ".checkpoints")
    args = [str(model), "--calib", str(calib), *ARGS[:-3], "--checkpoint-every", "3", "--no-report", "--fsdp"]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_port()}",
        "-m",
        "maskprune",
        "-q",
        "prune",
        *args,
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and len(list_checkpoints(ckpt)) < 1 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    for pid in [*_children(proc.pid), proc.pid]:  # both workers (torchrun starts them in their own sessions)
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert not out.exists()
    step = int(list_checkpoints(ckpt)[0].stem.split("-")[1])
    assert 0 < step < 16
    cmd[3] = f"--master-port={_port()}"
    done = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    a = json.loads((root / "fsdp" / "maskprune_report.json").read_text())
    b = json.loads((out / "maskprune_report.json").read_text())
    assert a["kept_units"] == b["kept_units"]
    for k in ("y", "z"):
        assert b["final_state"][k] == pytest.approx(a["final_state"][k], rel=1e-6, abs=1e-9)
    ma = torch.load(root / "fsdp" / "masks.pt", weights_only=True)
    mb = torch.load(out / "masks.pt", weights_only=True)
    for k in ma:
        assert torch.allclose(ma[k], mb[k], atol=1e-5), (k, float((ma[k] - mb[k]).abs().max()))
    wa, wb = load_file(str(root / "fsdp" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_accelerate_launch_runs_the_same_cli(runs, tmp_path):
    """`accelerate launch` is only the launcher (it hands over to torchrun): the same CLI, 2 processes,
    the same result as the 1-process run. `--multi_gpu` is accelerate's name for its torchrun launcher;
    on this CPU machine the processes join over gloo."""
    root, model, calib = runs
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "acc"
    proc = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_port()),
            "-m",
            "maskprune",
            "-q",
            "prune",
            str(model),
            "--calib",
            str(calib),
            *ARGS,
            "--out",
            str(out),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((root / "one" / "maskprune_report.json").read_text())
    b = json.loads((out / "maskprune_report.json").read_text())
    assert b["machine"]["processes"] == 2
    assert a["kept_units"] == b["kept_units"]
