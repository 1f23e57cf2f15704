"""Reliability: a run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends;
SIGTERM checkpoints and stops; corrupt checkpoints are skipped; a non-finite value stops the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from maskprune.checkpoint import list_checkpoints, load_latest, save_checkpoint

STEPS = 40


def _cmd(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "maskprune",
        "-q",
        "prune",
        str(model),
        "--sparsity",
        "0.3",
        "--steps",
        str(STEPS),
        *tiny.small_run(calib, batch_size=4, evaluate=False, dtype="fp32", threads=1),
        "--checkpoint-every",
        "3",
        "--no-cut-first",  # the masked learner's exact resume (masks, sigma, y, z); the default's: below
        "--out",
        str(out),
        *extra,
    ]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = tiny.save_tiny(root / "model", "llama_gqa")
    calib = tiny.write_calib(root / "calib.jsonl")
    ref = root / "ref"
    subprocess.run(_cmd(model, calib, ref), check=True, env=_env(), timeout=300)
    return root, model, calib, ref


def test_sigkill_then_resume_equals_uninterrupted_run(setup):
    root, model, calib, ref = setup
    out = root / "killed"
    ckpt = out.with_name(out.name + ".checkpoints")
    proc = subprocess.Popen(_cmd(model, calib, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and len(list_checkpoints(ckpt)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    time.sleep(0.3)  # land somewhere between checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing that looks finished
    step_killed = int(list_checkpoints(ckpt)[0].stem.split("-")[1])
    assert 0 < step_killed < STEPS
    subprocess.run(_cmd(model, calib, out, "--resume"), check=True, env=_env(), timeout=300)
    a = json.loads((ref / "maskprune_report.json").read_text())
    b = json.loads((out / "maskprune_report.json").read_text())
    assert a["final_state"] == b["final_state"]
    assert a["kept_units"] == b["kept_units"]
    ma, mb = torch.load(ref / "masks.pt", weights_only=True), torch.load(out / "masks.pt", weights_only=True)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    wa, wb = _weights(ref), _weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(STEPS))  # one line per step, none twice
    assert not ckpt.exists()  # spent checkpoints are removed after success


def test_the_default_killed_in_its_recovery_resumes_from_the_finished_cut(setup):
    """The default recipe cuts first: a kill during the sliced model's distillation keeps ``<out>.cut``; --resume
    reuses that cut and the recovery's checkpoints and ends where an uninterrupted run ends."""
    root, model, calib, _ = setup

    def cmd(out: Path, *extra: str) -> list[str]:
        return [c for c in _cmd(model, calib, out, *extra) if c != "--no-cut-first"]

    ref, out = root / "cf-ref", root / "cf-killed"
    subprocess.run(cmd(ref), check=True, env=_env(), timeout=300)
    ckpt = out.with_name(out.name + ".checkpoints")
    proc = subprocess.Popen(cmd(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and len(list_checkpoints(ckpt)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and (root / "cf-killed.cut" / "model.safetensors").is_file()
    subprocess.run(cmd(out, "--resume"), check=True, env=_env(), timeout=300)
    wa, wb = _weights(ref), _weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = [json.loads(x) for x in (out / "recovery_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(STEPS))
    assert not ckpt.exists() and not (root / "cf-killed.cut").exists()


def test_sigterm_checkpoints_and_exits_130_then_resume_finishes(setup):
    root, model, calib, ref = setup
    out = root / "termed"
    ckpt = out.with_name(out.name + ".checkpoints")
    proc = subprocess.Popen(
        _cmd(model, calib, out, "--checkpoint-every", "0"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpt / "metrics.jsonl").exists():
        time.sleep(0.05)
    while time.time() < deadline and (ckpt / "metrics.jsonl").stat().st_size == 0:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    assert len(list_checkpoints(ckpt)) == 1  # written on the signal, though periodic ones are off
    # a fresh run is refused while the checkpoints wait
    r = subprocess.run(_cmd(model, calib, out), env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--resume" in r.stderr
    subprocess.run(_cmd(model, calib, out, "--resume", "--checkpoint-every", "0"), check=True, env=_env(), timeout=300)
    a = json.loads((ref / "maskprune_report.json").read_text())
    b = json.loads((out / "maskprune_report.json").read_text())
    assert a["final_state"] == b["final_state"] and a["kept_units"] == b["kept_units"]


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    save_checkpoint(tmp_path, {"state": {"step": 3}}, 3, keep=3)
    newest = save_checkpoint(tmp_path, {"state": {"step": 6}}, 6, keep=3)
    newest.write_bytes(newest.read_bytes()[:20])  # truncated
    payload, path = load_latest(tmp_path)
    assert payload["state"]["step"] == 3 and path.name == "ckpt-00000003.pt"
    assert "skipping unreadable checkpoint ckpt-00000006.pt" in caplog.text
    for s in (9, 12, 15):
        save_checkpoint(tmp_path, {"state": {"step": s}}, s, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000015.pt", "ckpt-00000012.pt"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_resume_with_other_settings_is_refused(setup, tmp_path):
    root, model, calib, _ = setup
    out = tmp_path / "o"
    ckpt = out.with_name(out.name + ".checkpoints")
    r = subprocess.run(_cmd(model, calib, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    save_checkpoint(ckpt, {"state": {"step": 3}, "config": {"sparsity": 0.5}}, 3, keep=2)
    r = subprocess.run(_cmd(model, calib, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "configuration differs" in r.stderr and "sparsity: 0.5 -> 0.3" in r.stderr


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from maskprune import learner as learner_mod
    from maskprune.config import load_config
    from maskprune.errors import NonFiniteError
    from maskprune.recipes import run as prune

    model = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    calib = tiny.write_calib(tmp_path / "c.jsonl")
    real = learner_mod.distillation_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(learner_mod, "distillation_loss", poisoned)
    out = tmp_path / "o"
    cfg = load_config(
        overrides=dict(
            model=str(model),
            calib=str(calib),
            out=str(out),
            steps=10,
            seq_len=32,
            calib_samples=8,
            batch_size=4,
            eval_data="none",
            dtype="fp32",
            checkpoint_every=2,
        )
    )
    with pytest.raises(NonFiniteError, match="at step 4"):
        prune(cfg, progress=False)
    assert not out.exists()
    payload, path = load_latest(out.with_name("o.checkpoints"))
    assert payload["state"]["step"] == 4 and torch.isfinite(payload["masks"]["ffn"]).all()


def test_a_checkpoint_from_before_a_new_setting_resumes_when_it_is_left_at_its_default(setup, tmp_path):
    root, model, calib, ref = setup
    out = tmp_path / "o"
    ckpt = out.with_name(out.name + ".checkpoints")
    proc = subprocess.Popen(_cmd(model, calib, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not list_checkpoints(ckpt) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = list_checkpoints(ckpt)[0]
    payload = torch.load(newest, weights_only=False)
    del payload["config"]["export_dtype"]  # as written by a maskprune that had no such setting
    torch.save(payload, newest)
    r = subprocess.run(_cmd(model, calib, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
