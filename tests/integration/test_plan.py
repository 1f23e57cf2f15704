"""The plan before a run (maskprune.plan, `maskprune plan`): read from the config alone, refused before any heavy
work where it cannot fit, and the checks that need only the config made first."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from maskprune.cli import main
from maskprune.config import load_config
from maskprune.stages.plan import ModelFacts, model_facts, plan_run

PHASE_KEYS = {"name", "peak_bytes", "flops", "seconds"}


def test_plan_json_has_every_phase_of_the_default_run(tiny_dir, capsys):
    assert main(["-q", "plan", str(tiny_dir), "--json", "--max-memory", "64GB"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is True and plan["advice"] == []
    names = [p["name"] for p in plan["phases"]]
    assert names[:2] == ["load", "eval_dense"] and "shape_search" in names and names[-1] == "distill"
    for phase in plan["phases"]:
        assert PHASE_KEYS <= set(phase) and phase["peak_bytes"] > 0
    assert plan["peak_bytes"] == max(p["peak_bytes"] for p in plan["phases"])


def test_plan_reads_the_config_only(tiny_dir):
    facts = model_facts(str(tiny_dir))
    model = tiny.make_model("llama_gqa")
    assert facts.params == sum(p.numel() for p in model.parameters())
    assert (facts.layers, facts.hidden, facts.vocab) == (2, 64, tiny.VOCAB)
    assert facts.file_bytes is not None and facts.file_bytes >= facts.params * 4


def test_plan_says_when_it_does_not_fit_and_what_to_switch_on(tiny_dir, capsys):
    assert main(["-q", "plan", str(tiny_dir), "--max-memory", "1MB"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "--max-memory above" in out


def test_prune_refuses_a_run_that_cannot_fit_before_any_heavy_work(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "x"
    argv = ["-q", "prune", str(tiny_dir), "--max-memory", "1MB", "--out", str(out), *tiny.small_run(calib)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "this run does not fit" in err and "expected: at most 1 MiB" in err.replace("1.0 MiB", "1 MiB")
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())  # nothing written at all


def test_a_width_the_model_lacks_is_refused_before_loading(tiny_dir, calib, tmp_path, capsys, monkeypatch):
    import maskprune.stages.context as context

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(context, "load_source", no_load)
    for flag, value, text in (("--keep-hidden", "100000", "hidden width"), ("--keep-layers", "9", "depth")):
        argv = ["-q", "prune", str(tiny_dir), flag, value, "--steps", "0", "--out", str(tmp_path / "x")]
        assert main([*argv, *tiny.small_run(calib)]) == 2
        assert text in capsys.readouterr().err
        assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "run"
    stale = tmp_path / ".run.partial-999999999-abcd"  # a process id no process has
    (stale / "run").mkdir(parents=True)
    stale_cut = tmp_path / ".run.cut.partial-999999999-efgh"
    stale_cut.mkdir()
    argv = ["-q", "prune", str(tiny_dir), "--steps", "1", "--out", str(out), *tiny.small_run(calib, evaluate=False)]
    assert main(argv) == 0, capsys.readouterr().err
    assert out.is_dir() and not stale.exists() and not stale_cut.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _facts_8b(folder) -> ModelFacts:
    """Llama-3.1-8B's shape from its config alone (built on the meta device: no weight exists)."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False,
    ).save_pretrained(folder)  # fmt: skip
    facts = model_facts(str(folder))
    assert facts.params == 8_030_261_248  # Llama-3.1-8B's count
    return facts


def test_an_8b_model_on_a_gpu_is_planned_from_its_config_and_the_export_named_as_the_limit(tmp_path):
    cfg = load_config(None, {"model": "x", "steps": 0})
    facts = _facts_8b(tmp_path)
    gpu, host = torch.device("cuda"), 256 * 2**30
    roomy = plan_run(cfg, facts, device=gpu, max_memory=200 * 2**30, rate=1e14, host_memory=host)
    assert not roomy.streamed and roomy.fits and roomy.dtype == "bf16"
    by_name = {p.name: p for p in roomy.phases}
    assert by_name["load"].where == "host" and by_name["shape_search"].parts["weights"] == facts.params * 2
    assert "score" not in by_name  # the shape search scores the units the cut keeps
    # the export folds and slices fp32 weights: four bytes a parameter and a sliced copy
    assert by_name["export"].peak_bytes >= facts.params * 4 * 1.7
    tight = plan_run(cfg, facts, device=gpu, max_memory=40 * 2**30, rate=1e14, host_memory=host)
    assert tight.streamed and tight.fits  # auto streams: the cut's weights wait on disk, a layer at a time
    assert tight.peak.peak_bytes < 8 * 2**30
    # the largest module read at once (the 128256 x 4096 embedding, in fp32) and its pages bound every phase
    assert all(p.peak_bytes >= 128256 * 4096 * 4 for p in tight.phases if p.name != "load")
    cut_only = load_config(None, {"model": "x", "steps": 0, "streaming": "off"})
    whole = plan_run(cut_only, facts, device=gpu, max_memory=40 * 2**30, rate=1e14, host_memory=host)
    assert not whole.fits and {"reconstruct", "export"} <= {p.name for p in whole.over()}
    assert any("--streaming on" in a for a in whole.advice)


def test_the_plans_time_scales_with_the_rate_and_its_memory_does_not(tiny_dir):
    cfg = load_config(None, {"model": str(tiny_dir)})
    facts = model_facts(str(tiny_dir))
    slow = plan_run(cfg, facts, device=torch.device("cpu"), max_memory=2**40, rate=1e9)
    fast = plan_run(cfg, facts, device=torch.device("cpu"), max_memory=2**40, rate=2e9)
    assert slow.seconds == pytest.approx(2 * fast.seconds)
    assert [p.peak_bytes for p in slow.phases] == [p.peak_bytes for p in fast.phases]


def test_under_a_time_budget_the_distillation_takes_what_the_cut_leaves(tiny_dir):
    facts = model_facts(str(tiny_dir))
    cpu, rate = torch.device("cpu"), 1e9  # the cut in under a minute, the distillation in several
    fixed = plan_run(load_config(None, {"model": "x", "steps": 512, "minutes": None}), facts, device=cpu, rate=rate)
    budget = plan_run(load_config(None, {"model": "x", "minutes": 1}), facts, device=cpu, rate=rate)
    distill = {p.name: p for p in fixed.phases}["distill"].seconds
    assert fixed.seconds > 60 and distill > 0
    assert budget.seconds == pytest.approx(60.0)  # the cut's phases, then what is left of the minute
    assert {p.name: p for p in budget.phases}["distill"].seconds < distill


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_the_plan_of_a_top_k_teacher_keeps_it_where_it_computes_windows_lazily(tiny_dir, capsys, streaming):
    """Resident, the teacher stays in memory to compute the windows the cache lacks as steps draw them: the plan
    counts it. Streamed, every drawn window is computed before the steps and the teacher freed: it does not, and
    its top-k pass covers the windows the steps draw and the held-out ones, not every calibration window."""
    argv = ["-q", "plan", str(tiny_dir), "--json", "--max-memory", "64GB", "--teacher-topk", "8", "--steps", "3"]
    assert main([*argv, "--streaming", streaming, "--calib-samples", "64", "--seq-len", "32"]) == 0
    phases = {p["name"]: p for p in json.loads(capsys.readouterr().out)["phases"]}
    teacher = phases["distill"]["parts"]["teacher_weights_bf16"]
    assert (teacher > 0) == (streaming == "off")
    assert phases["teacher_topk"]["parts"]["cache"] == 1 * 32 * (8 * 6 + 4)  # a batch's rows: the windows on disk
    hidden = phases["teacher_topk"]["parts"]["streamed_hidden"]  # streamed, the pass holds its windows' activations
    assert (hidden > 0) == (streaming == "on")
    if streaming == "on":  # the windows the 3 steps of batch 1 draw and the 4 held out, not all 64
        width = json.loads((tiny_dir / "config.json").read_text())["hidden_size"]
        assert hidden / (2 * width) in ((3 + 4) * 32 * 2, (3 + 4) * 32 * 4)  # in and out, bf16 or fp32
