"""Families without an adapter are refused before any weight is read, naming the model type and the
supported list; a GGUF file is judged by its metadata alone."""

from __future__ import annotations

import numpy as np
import pytest

from maskprune.errors import UnsupportedModelError
from maskprune.models import load_model


def test_an_unsupported_gguf_is_refused_from_its_metadata(tmp_path):
    import gguf

    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError) as e:
        load_model(str(path))
    msg = str(e.value)
    assert "'phi3'" in msg and "gemma3" in msg and "llama" in msg and "smollm3" in msg


def test_an_unsupported_folder_is_refused_before_its_weights_are_read(tmp_path):
    from transformers import Phi3Config

    Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    # no weights in the folder: reading them would fail with another error
    with pytest.raises(UnsupportedModelError) as e:
        load_model(str(tmp_path))
    assert "'phi3'" in str(e.value) and "gemma2" in str(e.value)
