"""The CLI in-process: a short prune end to end, and every refusal (clear message, exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny
from maskprune.cli import main

FAST = [*tiny.small_run(None, batch_size=4, dtype="fp32"), "-q"]


def _run(args, capsys):
    quiet = ["-q"] if "-q" in args else []  # a top-level flag: it goes before the subcommand
    code = main(quiet + [a for a in args if a != "-q"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("path", ["cut-first", "masked"])
def test_prune_end_to_end_writes_a_stock_checkpoint_and_report(path, tiny_dir, calib, tmp_path, capsys):
    """The default recipe both ways: cut first, then the sliced model distilled (the default), and every step on
    the masked full-width model (``--no-cut-first``, what a learned selection and a launcher run)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    extra = ["--no-cut-first"] if path == "masked" else []
    code, stdout, err = _run(
        ["prune", str(tiny_dir), "--sparsity", "0.3", "--steps", "60", "--out", str(out), "--calib", str(calib), *FAST]
        + extra,
        capsys,
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["sparsity"] >= 0.3 - 1e-9
    report = json.loads((out / "maskprune_report.json").read_text())
    p = report["params"]
    assert (
        p["exported"] <= p["budget"]
        and p["budget"] - p["exported"] < report["shape"]["unit_layout"]["ffn"]["params_per_unit"] * 2
    )
    assert report["perplexity"]["dense"]["ppl"] > 1 and report["perplexity"]["exported"]["ppl"] > 1
    assert report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]
    assert len(report["kept_units"]["ffn"]) == 2
    assert len({len(k) for k in report["kept_units"]["ffn"]}) == 1  # uniform
    if path == "masked":
        assert set(report["seconds"]) >= {"load", "learn", "cut", "export", "total"}
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 60 and {"loss", "kl", "sigma_head", "sigma_ffn", "y", "z"} <= set(json.loads(lines[-1]))
    else:  # the cut (re-fit), then 60 steps of the sliced model
        assert set(report["seconds"]["prune"]) >= {"load", "shape_search", "reconstruct", "export"}
        assert set(report["seconds"]["recovery"]) >= {"learn", "export"} and report["recovery"]["steps"] == 60
        assert report["recovery"]["cut_first"] and report["config"]["reconstruct"] and report["reconstruction"]
        assert not (out / "metrics.jsonl").exists()
        lines = (out / "recovery_metrics.jsonl").read_text().splitlines()
        assert len(lines) == 60 and {"loss", "kl"} <= set(json.loads(lines[-1]))
        assert report["perplexity"]["before_recovery"]["ppl"] > report["perplexity"]["exported"]["ppl"]
    card = (out / "README.md").read_text()
    assert f"{p['exported']:,}" in card and "Reproduce" in card
    assert "base_model:" not in card  # a local folder has no hub id to name
    assert "github.com/)" not in card and f"{report['roundtrip']['max_abs_diff']:.2e}" in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(q.numel() for q in model.parameters()) == p["exported"]
    ids = torch.tensor([[3, 4, 5, 6]])
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 8)
    assert not any(x.name.startswith(".pruned") for x in tmp_path.iterdir())  # no staging leftovers


def test_config_file_and_flags_merge(tiny_dir, calib, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"sparsity: 0.25\nsteps: 5\ncalib: {calib}\ngqa_policy: kv_group\n")
    out = tmp_path / "o"
    code, stdout, err = _run(
        ["prune", str(tiny_dir), "--config", str(cfg), "--steps", "4", "--out", str(out), *FAST], capsys
    )
    assert code == 0, err
    report = json.loads((out / "maskprune_report.json").read_text())
    assert report["config"]["steps"] == 4 and report["config"]["sparsity"] == 0.25
    assert report["config"]["gqa_policy"] == "kv_group"


def _assert_refused(args, capsys, *needles, out: Path | None = None):
    code, stdout, err = _run(args, capsys)
    assert code == 2, (code, err)
    for n in needles:
        assert n in err, err
    if out is not None:
        assert not out.exists()
        assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_unknown_model_type_is_refused_naming_it_and_the_supported(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(d)
    out = tmp_path / "o"
    _assert_refused(["prune", str(d), "--out", str(out), "-q"], capsys, "'gpt2'", "llama", "mistral", "qwen2", out=out)


@pytest.mark.parametrize("value", ["0", "1", "-0.1", "1.5"])
def test_sparsity_outside_0_1_is_refused(tiny_dir, tmp_path, capsys, value):
    out = tmp_path / "o"
    _assert_refused(
        ["prune", str(tiny_dir), "--sparsity", value, "--out", str(out), "-q"],
        capsys,
        "sparsity must be in (0, 1)",
        out=out,
    )


def test_budget_that_removes_every_unit_is_refused(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["prune", str(tiny_dir), "--sparsity", "0.95", "--out", str(out), "--calib", str(calib), *FAST]
    _assert_refused([*base, "--prune-axes", "heads,ffn"], capsys, "below what a layer-uniform cut can reach",
                    "lower --sparsity", out=out)  # fmt: skip
    # the default searches hidden width and depth too: refused from the config, before loading, where no shape fits
    _assert_refused(base, capsys, "no candidate shape meets the parameter budget", "lower --sparsity", out=out)


def test_a_budget_past_the_heads_and_ffn_floor_is_cut_by_the_shape(tiny_dir, calib, tmp_path, capsys):
    """Hidden width and depth reach further than heads and FFN channels (the embeddings shrink, layers go): a budget
    below the heads/FFN floor is cut where a shape meets it (before: refused by the heads/FFN floor alone)."""
    import json

    from transformers import AutoModelForCausalLM

    from maskprune.arch import adapter_for
    from maskprune.structure import Structure

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    s = Structure.of(model, adapter_for(model), "query")
    floor = 1 - s.min_params() / s.dense_params
    out = tmp_path / "o"
    argv = ["prune", str(tiny_dir), "--sparsity", f"{floor + 0.02:.3f}", "--steps", "0", "--out", str(out)]
    assert main([*argv, "--calib", str(calib), "--no-report", *FAST]) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    assert r["params"]["exported"] <= r["params"]["budget"] < s.min_params()
    assert r["shape_search"]["hidden_size"] < 64 or len(r["shape_search"]["kept_layers"]) < 2


def test_empty_calibration_data_is_refused(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "o"
    _assert_refused(
        ["prune", str(tiny_dir), "--calib", str(empty), "--out", str(out), *FAST],
        capsys,
        "calibration data is empty",
        out=out,
    )


def test_missing_calibration_data_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    _assert_refused(
        ["prune", str(tiny_dir), "--calib", str(tmp_path / "nope.jsonl"), "--out", str(out), *FAST],
        capsys,
        "does not exist",
        out=out,
    )


def test_existing_output_folder_is_refused_and_kept(tiny_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_refused(["prune", str(tiny_dir), "--out", str(out), "-q"], capsys, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_model_path_and_unknown_key_and_wrong_type(tmp_path, capsys):
    _assert_refused(["prune", str(tmp_path / "nowhere"), "-q"], capsys, "does not exist")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("sparsity: 0.5\nstepz: 3\nseq_len: long\n")
    _assert_refused(
        ["prune", "--config", str(cfg), "-q"],
        capsys,
        "unknown config key 'stepz' (did you mean 'steps'?)",
        "seq_len must be an integer",
    )


def test_seq_len_above_context_is_refused(tiny_dir, tmp_path, capsys):
    _assert_refused(
        ["prune", str(tiny_dir), "--seq-len", "100000", "--out", str(tmp_path / "o"), "-q"],
        capsys,
        "above the model's context",
    )


def test_eval_perplexity_command(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = _run(
        ["eval", str(tiny_dir), "--seq-len", "64,32", "--limit", "3", "--out", str(out), "-q"], capsys
    )
    assert code == 0, err
    res = json.loads(out.read_text())["models"][str(tiny_dir)]
    assert set(res["perplexity"]) == {"64", "32"}
    assert res["perplexity"]["64"]["windows"] == 3 and res["perplexity"]["64"]["tokens_scored"] == 3 * 63
    assert "WikiText2@64" in stdout and out.with_suffix(".md").is_file()
    # --ppl-tokens: the same text at every length
    code, _, err = _run(
        ["eval", str(tiny_dir), "--seq-len", "64,32", "--ppl-tokens", "256", "--out", str(out), "-q"], capsys
    )
    assert code == 0, err
    res = json.loads(out.read_text())["models"][str(tiny_dir)]
    assert res["perplexity"]["64"]["windows"] == 4 and res["perplexity"]["32"]["windows"] == 8


def _check_figures(folder: Path, expected: set[str]) -> str:
    from PIL import Image

    from maskprune.report import FIG_SIZE_PX

    drawn = {p.stem for p in (folder / "report").glob("*.png")}
    assert drawn == expected, drawn
    for name in drawn:
        path = folder / "report" / f"{name}.png"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == FIG_SIZE_PX, name
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 50, f"{name} looks blank"
    page = (folder / "report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(expected)
    assert "{'" not in page  # no Python dict printed
    return page


def test_report_figures_fit_the_run(tiny_dir, calib, tmp_path, capsys):
    import json

    from maskprune.report import MASK_FIGURES

    out = tmp_path / "run"  # the default recipe: the prior's cut, then the sliced model distilled with held-out KL
    code, _, err = _run(
        ["prune", str(tiny_dir), "--steps", "12", "--out", str(out), "--calib", str(calib), "--no-report", *FAST]
        + ["--val-every", "4", "--val-windows", "4"],
        capsys,
    )
    assert code == 0, err
    assert not (out / "report").exists()
    code, stdout, err = _run(["report", str(out), "-q"], capsys)
    assert code == 0, err
    page = _check_figures(out, {"training", "scores_head", "scores_ffn"})  # the shape search's table, no split
    assert "held-out calibration windows" in page and "intermediate size" in page and "Shape search: " in page
    metrics = [json.loads(x) for x in (out / "recovery_metrics.jsonl").read_text().splitlines()]
    assert len({m["loss"] for m in metrics}) > 1 and len([m for m in metrics if "val_kl" in m]) >= 3
    learned = tmp_path / "learned"  # masks learned for half the steps: the paper's mask figures too
    code, _, err = _run(
        ["prune", str(tiny_dir), "--steps", "12", "--freeze-share", "0.5", "--out", str(learned)]
        + ["--calib", str(calib), *FAST],
        capsys,
    )
    assert code == 0, err
    _check_figures(learned, {"training", "split_search", "scores_head", "scores_ffn", *MASK_FIGURES})
    oneshot = tmp_path / "flap"  # a one-shot run gets a report too
    code, _, err = _run(
        ["prune", str(tiny_dir), "--method", "flap", "--out", str(oneshot), *FAST, "--calib", str(calib)], capsys
    )
    assert code == 0, err
    _check_figures(oneshot, {"scores_head", "scores_ffn"})
    _assert_refused(["report", str(tmp_path / "nope"), "-q"], capsys, "not a complete maskprune run folder")


def test_corrupt_weights_missing_tokenizer_and_bad_gguf_are_refused(tiny_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])  # truncated download
    out = tmp_path / "o"
    _assert_refused(
        ["prune", str(broken), "--out", str(out), "-q"],
        capsys,
        "cannot load the weights",
        "complete safetensors",
        out=out,
    )
    notok = tmp_path / "notok"
    shutil.copytree(tiny_dir, notok)
    for f in notok.glob("tokenizer*"):
        f.unlink()
    (notok / "special_tokens_map.json").unlink(missing_ok=True)
    _assert_refused(["prune", str(notok), "--out", str(out), "-q"], capsys, "cannot load a tokenizer", out=out)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    _assert_refused(["prune", str(gguf), "--out", str(out), "-q"], capsys, "model.gguf", out=out)


def test_out_that_is_a_file_or_not_a_folder_is_refused(tiny_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _assert_refused(["prune", str(tiny_dir), "--out", str(f), "-q"], capsys, "is a file")
    _assert_refused(["prune", str(tiny_dir), "--out", str(f / "sub"), "-q"], capsys, "not a writable folder")
    assert f.read_text() == "x"


def test_truncated_gguf_is_refused(tmp_path, capsys):
    gguf = tmp_path / "t.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    _assert_refused(
        ["prune", str(gguf), "--out", str(tmp_path / "o"), "-q"],
        capsys,
        "GGUF file 't.gguf'",
        "complete GGUF file",
        out=tmp_path / "o",
    )


def test_optional_tracker_without_its_package_is_refused_clearly(tiny_dir, calib, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    out = tmp_path / "o"
    _assert_refused(
        [
            "prune",
            str(tiny_dir),
            "--trackers",
            "wandb",
            "--steps",
            "2",
            "--out",
            str(out),
            "--calib",
            str(calib),
            *FAST,
        ],
        capsys,
        "needs the wandb package",
        out=out,
    )
    assert not out.with_name("o.checkpoints").exists()  # refused before anything was written


def test_eval_errors_missing_model_unknown_task_and_bad_data_dir(tmp_path, capsys):
    _assert_refused(["eval", str(tmp_path / "nope"), "-q"], capsys, "does not exist")
    _assert_refused(["eval", str(tmp_path), "--tasks", "piqa,mmlu", "-q"], capsys, "unknown task 'mmlu'", "boolq")
    _assert_refused(
        ["eval", str(tmp_path), "--tasks", "piqa", "--data-dir", str(tmp_path / "nodir"), "-q"],
        capsys,
        "is not a folder",
    )


def test_a_crash_before_the_first_checkpoint_does_not_block_the_next_run(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "pruned"
    leftover = tmp_path / "pruned.checkpoints"
    leftover.mkdir()
    (leftover / "metrics.jsonl").write_text("")  # what a run killed before its first checkpoint leaves
    _assert_refused(
        ["prune", str(tiny_dir), "--out", str(out), "--resume", "--calib", str(calib), *FAST],
        capsys,
        "holds no checkpoint",
        "without --resume",
    )
    code, _, err = _run(
        ["prune", str(tiny_dir), "--sparsity", "0.3", "--steps", "2", "--out", str(out), "--calib", str(calib), *FAST],
        capsys,
    )
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and not leftover.exists()


def test_unknown_lora_targets_are_refused_before_any_work(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    _assert_refused(
        ["prune", str(tiny_dir), "--lora-targets", "q,x", "--out", str(out), "-q"],
        capsys,
        "lora_targets must be projection roles among q,k,v,o,gate,up,down, found q,x",
        out=out,
    )
    assert not (tmp_path / "o.checkpoints").exists()


def test_zero_shot_tasks_offline_without_local_data_are_refused_before_any_work(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    for args in (
        ["eval", str(tiny_dir), "--tasks", "piqa", "--out", str(tmp_path / "r.json"), "-q"],
        ["prune", str(tiny_dir), "--eval-tasks", "piqa", "--out", str(out), "-q"],
    ):
        _assert_refused(args, capsys, "cannot reach", "--data-dir")
        assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists() and not out.exists()


def test_eval_windows_longer_than_the_context_are_refused(tiny_dir, capsys):
    _assert_refused(["eval", str(tiny_dir), "--seq-len", "32,1000", "-q"], capsys, "above the context", "256")


def test_the_output_folder_is_readable_by_other_users(tiny_dir, calib, tmp_path, capsys):
    import os

    out = tmp_path / "pruned"
    old = os.umask(0o022)
    try:
        code, _, err = _run(
            ["prune", str(tiny_dir), "--method", "flap", "--out", str(out), "--calib", str(calib), *FAST], capsys
        )
    finally:
        os.umask(old)
    assert code == 0, err
    assert out.stat().st_mode & 0o755 == 0o755


def test_quiet_runs_print_nothing_but_the_result(tiny_dir, calib, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "q"
    argv = [sys.executable, "-m", "maskprune", "prune", str(tiny_dir), "--method", "flap", "-q", "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # warnings shown unless maskprune silences them
    r = subprocess.run(
        [*argv, "--calib", str(calib), *[a for a in FAST if a != "-q"]], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    for noise in ("Warning", "Loading weights", "Writing model shards", "INFO", "%|"):
        assert noise not in r.stderr, (noise, r.stderr[-2000:])
    assert json.loads(r.stdout)["out"] == str(out)
