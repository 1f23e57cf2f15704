"""maskprune export-gguf: llama.cpp's converter on a pruned checkpoint; bad input refused before any work.

The conversion test needs the converter in the cache (fetched once from the package index by the first
export, or MASKPRUNE_LLAMA_CPP pointing at a llama.cpp checkout); offline without it, it is skipped."""

from __future__ import annotations

import json
import os

import pytest

import tiny
from maskprune import llamacpp
from maskprune.cli import main
from maskprune.errors import MaskPruneError
from maskprune.gguf_export import LLAMA_CPP_PYTHON, export_gguf


def _converter_available() -> bool:
    from maskprune.cache import cache_dir

    env = os.environ.get("MASKPRUNE_LLAMA_CPP")
    return bool(env) or (cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}" / "convert_hf_to_gguf.py").is_file()


@pytest.mark.parametrize("gguf_type,words", [("q9_9", "unknown GGUF type"), ("F16", "config.json")])
def test_bad_types_and_folders_are_refused_before_any_work(tmp_path, gguf_type, words):
    with pytest.raises(MaskPruneError, match=words):
        export_gguf(tmp_path, gguf_type=gguf_type)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(llamacpp.available(), reason="llama-cpp-python is installed here")
def test_a_quantized_type_without_llama_cpp_is_refused_with_how_to_get_it(tmp_path, capsys):
    folder = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(MaskPruneError, match=r"maskprune\[llamacpp\]"):
        export_gguf(folder, gguf_type="q4_k_m")
    assert sorted(p.name for p in folder.iterdir()) == before
    # prune --gguf checks the same before any work: nothing is written
    out = tmp_path / "o"
    assert main(["-q", "prune", str(folder), "--gguf", "q4_k_m", "--out", str(out)]) == 2
    assert "maskprune[llamacpp]" in capsys.readouterr().err and not out.exists()
    assert main(["-q", "prune", str(folder), "--gguf", "q9", "--out", str(out)]) == 2
    assert "gguf must be one of" in capsys.readouterr().err and not out.exists()


def test_a_wrong_llama_cpp_checkout_is_named(tmp_path, monkeypatch):
    folder = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    monkeypatch.setenv("MASKPRUNE_LLAMA_CPP", str(tmp_path / "nowhere"))
    with pytest.raises(MaskPruneError, match="MASKPRUNE_LLAMA_CPP"):
        export_gguf(folder)


@pytest.mark.skipif(not _converter_available(), reason="llama.cpp's converter is not cached (offline)")
def test_a_pruned_checkpoint_converts_to_f16_and_reloads_with_its_logits(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    # a real tokenizer: llama.cpp's converter identifies the pre-tokenizer by its output on a known text,
    # which a tokenizer trained in the test cannot match
    out = tmp_path / "o"
    argv = ["-q", "prune", "smollm2-135m", "--method", "wanda-sp", "--sparsity", "0.2", "--calib-samples", "8"]
    assert main(argv + ["--eval-data", "none", "--no-report", "--gguf", "f16", "--out", str(out)]) == 0
    capsys.readouterr()
    rep = json.loads((out / "maskprune_report.json").read_text())
    assert rep["gguf"]["file"] == "o-f16.gguf" and (out / "o-f16.gguf").stat().st_size == rep["gguf"]["bytes"]
    assert main(["-q", "export-gguf", str(out), "--type", "f16"]) == 2  # exists: refused without --overwrite
    capsys.readouterr()
    assert main(["-q", "export-gguf", str(out), "--type", "f16", "--overwrite"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["gguf"].endswith("o-f16.gguf") and r["bytes"] > 0
    d = r["logits_vs_checkpoint"]
    assert d["max_abs_diff"] <= 1e-2 * max(1.0, d["max_abs_logit"])  # f16 weights (1e-3 measured at 20 %)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no partial file left
    if not llamacpp.available():
        return
    # llama.cpp itself (maskprune[llamacpp]): the f16 file's perplexity on its logits matches the checkpoint's
    # on the same windows, and a k-quant written by llama.cpp's quantizer loads and generates there
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maskprune.data import wikitext2_test_text
    from maskprune.evaluate import perplexity, tokenize_windows

    tok = AutoTokenizer.from_pretrained(out)
    windows = tokenize_windows(wikitext2_test_text("default")[:20000], tok, 256)[0][:2]
    hf = perplexity(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), windows, progress=False).ppl
    ours = llamacpp.perplexity(out / "o-f16.gguf", windows, threads=2)["ppl"]
    assert abs(ours / hf - 1) < 0.01, (ours, hf)
    assert main(["-q", "export-gguf", str(out), "--type", "q4_k_m", "--no-check"]) == 0
    q = out / "o-q4_k_m.gguf"
    # SmolLM2's rows of 576 are no multiple of 256: llama.cpp falls back to q5_0/q8_0 for those tensors
    assert q.stat().st_size < 0.6 * (out / "o-f16.gguf").stat().st_size
    assert llamacpp.generate(q, "The capital of France is", max_tokens=8, threads=2).strip()
    assert llamacpp.speed(q, prompt_tokens=32, gen_tokens=4, threads=2, repeats=1).decode_tokens_per_s > 0


def test_a_missing_converter_module_is_refused_before_any_fetch(monkeypatch, tmp_path):
    import importlib.util

    from maskprune import gguf_export
    from maskprune.errors import MaskPruneError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a)
    )
    fetched = []
    monkeypatch.setattr(gguf_export.subprocess, "run", lambda *a, **k: fetched.append(a))
    with pytest.raises(MaskPruneError, match="needs sentencepiece") as e:
        gguf_export.converter_dir(cache=tmp_path)
    assert "maskprune[gguf]" in str(e.value) and not fetched
