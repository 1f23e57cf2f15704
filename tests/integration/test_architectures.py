"""Families without an adapter are refused before any weight is read, naming the model type and the
supported list; a GGUF file is judged by its metadata alone."""

from __future__ import annotations

import numpy as np
import pytest

from maskprune.errors import UnsupportedModelError
from maskprune.models import load_model


def test_an_unsupported_gguf_is_refused_from_its_metadata(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError) as e:
        load_model(str(path))
    msg = str(e.value)
    assert "'falcon'" in msg and "gemma3" in msg and "llama" in msg and "phi3" in msg


def test_an_unsupported_folder_is_refused_before_its_weights_are_read(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path)
    # no weights in the folder: reading them would fail with another error
    with pytest.raises(UnsupportedModelError) as e:
        load_model(str(tmp_path))
    assert "'gpt2'" in str(e.value) and "gemma2" in str(e.value) and "phi3" in str(e.value)


@pytest.mark.parametrize("method", ["maskprune", "flap"])
def test_a_fused_family_prunes_end_to_end_into_its_stock_fused_layout(tmp_path, method, capsys):
    """Phi-3: the run sees q/k/v and gate/up as parts; the checkpoint has stock qkv_proj / gate_up_proj of
    the pruned sizes, reloads with plain from_pretrained and has the parity the export measured."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    import tiny
    from maskprune.cli import main

    dense = tiny.save_tiny(tmp_path / "phi3", "phi3")
    calib = tiny.write_calib(tmp_path / "calib.jsonl")
    out = tmp_path / method
    argv = ["-q", "prune", str(dense), "--method", method, "--sparsity", "0.3", "--steps", "4"]
    argv += tiny.small_run(calib, calib_samples=8, batch_size=4, evaluate=False, dtype="fp32")
    argv += ["--head-cut-fraction", "0.5", "--no-report", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    m = AutoModelForCausalLM.from_pretrained(out)
    cfg = m.config
    assert type(m).__name__ == "Phi3ForCausalLM" and cfg.intermediate_size < 96
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    assert attn.qkv_proj.weight.shape[0] == (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    assert mlp.gate_up_proj.weight.shape[0] == 2 * cfg.intermediate_size
    assert sum(p.numel() for p in m.parameters()) == r["params"]["exported"] <= r["params"]["budget"]
    assert r["parity"]["max_abs_diff"] <= r["parity"]["tolerance"]
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=torch.tensor([[1, 5, 9, 12]])).logits).all()
    if method == "flap":  # a fused student distils from its fused teacher the same way
        rec = tmp_path / "rec"
        argv = ["-q", "distill", str(out), "--teacher", str(dense), "--steps", "3"]
        argv += tiny.small_run(calib, calib_samples=8, batch_size=4, evaluate=False, dtype="fp32")
        assert main([*argv, "--no-report", "--out", str(rec)]) == 0, capsys.readouterr().err
        d = AutoModelForCausalLM.from_pretrained(rec)
        assert d.model.layers[0].self_attn.qkv_proj.weight.shape == attn.qkv_proj.weight.shape


def test_a_width_norm_family_cuts_heads_with_its_norms_end_to_end(tmp_path, capsys):
    """OLMo-2: q/k norms span every head; with heads cut the export slices them, reloads stock, and the
    export's parity check (masked model with norms over the kept heads vs the sliced model) holds."""
    import json

    from transformers import AutoModelForCausalLM

    import tiny
    from maskprune.cli import main

    dense = tiny.save_tiny(tmp_path / "olmo2", "olmo2")
    calib = tiny.write_calib(tmp_path / "calib.jsonl")
    out = tmp_path / "o"
    argv = ["-q", "prune", str(dense), "--method", "wanda-sp", "--sparsity", "0.3", "--gqa-policy", "kv_group"]
    argv += tiny.small_run(calib, calib_samples=8, evaluate=False, dtype="fp32")
    argv += ["--head-cut-fraction", "0.5", "--no-report", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    r = json.loads((out / "maskprune_report.json").read_text())
    m = AutoModelForCausalLM.from_pretrained(out)
    cfg, attn = m.config, m.model.layers[0].self_attn
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)  # one KV group of two cut
    assert attn.q_norm.weight.shape[0] == cfg.num_attention_heads * cfg.head_dim
    assert attn.k_norm.weight.shape[0] == cfg.num_key_value_heads * cfg.head_dim
    assert sum(p.numel() for p in m.parameters()) == r["params"]["exported"]
    assert r["parity"]["max_abs_diff"] <= r["parity"]["tolerance"]
