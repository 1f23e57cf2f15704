"""The Python API: maskprune.prune / distill return the model in memory with its report, write to disk
only when ``out`` is given, and validate options as the CLI does."""

from __future__ import annotations

import pytest

import maskprune
import tiny
from maskprune.errors import MaskPruneError

FAST = dict(seq_len=32, calib_samples=8, batch_size=4, eval_seq_len=64, eval_max_windows=2, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return tiny.save_tiny(root / "dense", "llama_gqa"), tiny.write_calib(root / "c.jsonl")


def test_prune_returns_the_model_in_memory_and_leaves_nothing_without_out(files, tmp_path, monkeypatch):
    dense, calib = files
    monkeypatch.chdir(tmp_path)
    r = maskprune.prune(str(dense), sparsity=0.3, steps=3, calib=str(calib), **FAST)
    assert r.out is None and "out" not in r.report
    assert r.model.config.intermediate_size == r.report["shape"]["intermediate_size"] < 96
    assert sum(p.numel() for p in r.model.parameters()) == r.report["params"]["exported"]
    ids = r.tokenizer("The quick brown fox", return_tensors="pt").input_ids
    assert r.model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, no checkpoints


def test_prune_writes_to_out_and_distill_recovers_it(files, tmp_path):
    dense, calib = files
    out = tmp_path / "s30"
    r = maskprune.prune(str(dense), sparsity=0.3, method="wanda-sp", calib=str(calib), out=out, **FAST)
    assert r.out == out and (out / "model.safetensors").is_file() and r.report["method"] == "wanda-sp"
    d = maskprune.distill(str(out), teacher=str(dense), steps=4, calib=str(calib), lora_lr=0.01, **FAST)
    assert d.report["distill"]["teacher"] == str(dense) and d.out is None
    assert d.model.config.intermediate_size == r.model.config.intermediate_size


def test_options_are_validated_as_the_cli_validates_flags(files):
    dense, _ = files
    with pytest.raises(MaskPruneError) as e:
        maskprune.prune(str(dense), sparsity=1.5, stepz=3, progress=False)
    assert "sparsity must be in (0, 1)" in str(e.value) and "unknown config key 'stepz' (did you mean 'steps'?)" in str(
        e.value
    )
    with pytest.raises(MaskPruneError, match="maskprune distill does not take method"):
        maskprune.distill(str(dense), teacher=str(dense), method="flap", progress=False)
    with pytest.raises(MaskPruneError, match="maskprune prune does not take teacher"):
        maskprune.prune(str(dense), teacher=str(dense), progress=False)


def test_the_api_documents_its_options_and_speaks_in_keywords():
    import maskprune

    doc = maskprune.prune.__doc__
    for name in ("sparsity = 0.2", "steps = 400", "lora_rank = 8", "eval_tasks", "recover_steps"):
        assert name in doc, name
    assert "teacher_gguf_file =" not in doc and "teacher_gguf_file =" in maskprune.distill.__doc__
    assert "sparsity =" not in maskprune.distill.__doc__
    with pytest.raises(MaskPruneError) as e:
        maskprune.prune("smollm2-135m", sparsity=2.0, lora=False, recover_steps=3)
    msg = str(e.value)
    assert "sparsity=0.5" in msg and "lora=False" in msg and "full=True" in msg and "--" not in msg
