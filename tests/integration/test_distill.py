"""maskprune distill on tiny models: the loss falls, LoRA and full modes export stock checkpoints with
parity, a resumed run ends where an uninterrupted one ends, and a teacher that cannot be the student's
origin is refused before any work."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny
from maskprune.cli import main


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    dense = tiny.save_tiny(root / "dense", "llama_gqa")
    calib = tiny.write_calib(root / "calib.jsonl")
    student = root / "student"
    argv = ["-q", "prune", str(dense), "--method", "wanda-sp", "--sparsity", "0.3", "--out", str(student)]
    argv += tiny.small_run(calib, evaluate=False)
    assert main(argv) == 0
    return root, dense, student, calib


def _distill(student, teacher, calib, out, *extra) -> list[str]:
    return [
        "-q",
        "distill",
        str(student),
        "--teacher",
        str(teacher),
        "--steps",
        "12",
        *tiny.small_run(calib, calib_samples=8, batch_size=4, dtype="fp32"),
        "--out",
        str(out),
        *extra,
    ]


def _kl(out) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["kl"] for x in lines]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_distill_lowers_the_kl_and_exports_a_stock_checkpoint_with_parity(pair, tmp_path, capsys, mode):
    from transformers import AutoModelForCausalLM

    root, dense, student, calib = pair
    out = tmp_path / mode
    flags = ["--full"] if mode == "full" else ["--lora-lr", "0.01"]
    # the full vocabulary: a random tiny teacher is nearly uniform over its 256 tokens, so its top 64 hold a quarter
    # of its mass, and a KL over them and the tail says little about the perplexity asserted below
    flags += ["--teacher-topk", "0"]
    assert main(_distill(student, dense, calib, out, *flags)) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    kl = _kl(out)
    assert len(kl) == 12 and sum(kl[-4:]) / 4 < sum(kl[:4]) / 4  # the KL to the teacher falls
    assert r["distill"]["teacher"] == str(dense) and r["distill"]["tokens"] == 12 * 4 * 32
    assert r["distill"]["mode"] == ("full" if mode == "full" else "lora rank 8")
    s_rep = json.loads((student / "maskprune_report.json").read_text())
    assert r["params"]["exported"] == s_rep["params"]["exported"]  # nothing cut: the student's size
    assert r["shape"]["intermediate_size"] == s_rep["shape"]["intermediate_size"]
    assert r["parity"]["max_abs_diff"] <= r["parity"]["tolerance"]
    assert r["perplexity"]["exported"]["ppl"] < r["perplexity"]["dense"]["ppl"]  # "dense" here: the student before
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.intermediate_size == s_rep["shape"]["intermediate_size"]
    before, after = load_file(str(student / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed  # the weights learned
    if mode == "lora":  # LoRA reaches only the projections it wraps
        assert all("proj" in k for k in changed)
    assert "Distillation" in (out / "README.md").read_text()


def test_distill_resume_ends_where_the_uninterrupted_run_ends(pair, tmp_path):
    import os
    import signal
    import time

    root, dense, student, calib = pair
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    exe = [sys.executable, "-m", "maskprune"]
    ref, out = tmp_path / "ref", tmp_path / "cut"
    extra = ["--checkpoint-every", "0", "--eval-data", "none", "--steps", "30"]
    subprocess.run(exe + _distill(student, dense, calib, ref, *extra), check=True, env=env, timeout=300)
    proc = subprocess.Popen(
        exe + _distill(student, dense, calib, out, *extra), env=env, stderr=subprocess.PIPE, text=True
    )
    metrics = out.with_name(out.name + ".checkpoints") / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    subprocess.run(exe + _distill(student, dense, calib, out, *extra, "--resume"), check=True, env=env, timeout=300)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_with_another_tokenizer_is_refused_before_any_work(pair, tmp_path, capsys):
    root, dense, student, calib = pair
    other = tmp_path / "other"
    tiny.make_model("llama_gqa").save_pretrained(other)
    tok = tiny.make_tokenizer()
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    out = tmp_path / "o"
    assert main(_distill(student, other, calib, out)) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "--teacher" in err and not out.exists()


def test_a_teacher_of_another_family_or_a_smaller_one_is_refused(pair, tmp_path, capsys):
    root, dense, student, calib = pair
    qwen = tiny.save_tiny(tmp_path / "qwen", "qwen2")
    assert main(_distill(student, qwen, calib, tmp_path / "o1")) == 2
    assert "family" in capsys.readouterr().err
    # the roles reversed: the dense model as the student of its own pruned version
    assert main(_distill(dense, student, calib, tmp_path / "o2")) == 2
    assert "intermediate_size: student 96 > teacher" in capsys.readouterr().err


def test_distill_needs_a_teacher_and_prune_refuses_one(pair, tmp_path, capsys):
    root, dense, student, calib = pair
    assert main(["-q", "distill", str(student), "--out", str(tmp_path / "x")]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(["-q", "prune", str(dense), "--teacher", str(dense), "--out", str(tmp_path / "y")]) == 2
    assert "maskprune prune does not take teacher" in capsys.readouterr().err
    # the options that choose the cut are prune's: refused by name, nothing written
    out = tmp_path / "z"
    assert main(_distill(student, dense, calib, out, "--sparsity", "0.5", "--no-cut-ramp")) == 2
    assert "maskprune distill does not take cut_ramp, sparsity" in capsys.readouterr().err and not out.exists()
    assert main(_distill(student, dense, calib, out, "--no-such-flag")) == 2  # any other unknown flag
    assert "unknown option for `maskprune distill`: --no-such-flag" in capsys.readouterr().err


def test_distill_help_offers_only_what_applies(capsys):
    for command, absent, present in (
        ("distill", ["--sparsity", "--method", "--mask-init", "--freeze-share", "--recover-steps"], ["--teacher"]),
        ("prune", ["--teacher"], ["--sparsity", "--recover-steps", "--full"]),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        offered = set(re.findall(r"^\s+(--[a-z-]+)", capsys.readouterr().out, re.M))
        assert not offered & set(absent) and set(present) <= offered, command


def test_prune_recover_steps_distils_the_cut_with_the_same_code(pair, tmp_path, capsys):
    """prune --recover-steps: the cut, then distillation of its export from the dense model, in one folder
    with one report and card; the cut's staging folder is gone and the model reloads stock."""
    from transformers import AutoModelForCausalLM

    root, dense, student, calib = pair
    out = tmp_path / "rec"
    argv = ["-q", "prune", str(dense), "--sparsity", "0.3", "--steps", "4", "--recover-steps", "10"]
    argv += ["--lora-lr", "0.01", *tiny.small_run(calib, calib_samples=8, batch_size=4, dtype="fp32")]
    assert main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    assert not out.with_name("rec.cut").exists()
    assert r["recovery"]["steps"] == 10 and r["recovery"]["teacher"] == str(dense)
    assert r["config"]["recover_steps"] == 10 and r["config"]["model"] == str(dense)
    rec_kl = [json.loads(x)["kl"] for x in (out / "recovery_metrics.jsonl").read_text().splitlines()]
    assert len(rec_kl) == 10 and sum(rec_kl[-3:]) < sum(rec_kl[:3])  # the recovery lowers the KL
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # the learning run's log is kept
    ppl = r["perplexity"]
    assert ppl["exported"]["ppl"] != ppl["before_recovery"]["ppl"]  # evaluated after the recovery, not copied
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.intermediate_size == r["shape"]["intermediate_size"] < 96
    assert r["params"]["exported"] == sum(p.numel() for p in m.parameters())
    card = (out / "README.md").read_text()
    assert "Recovery after the cut" in card and "before recovery" in card and "rec.cut" not in card
    # a negative step count is refused before any work
    assert main([*argv, "--recover-steps", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "recover_steps must be >= 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
