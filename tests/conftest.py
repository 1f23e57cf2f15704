import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # a worker: its CLI subprocesses share the cores with the others
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4 (each holds torch, transformers and a tiny model or two)."""
    return max(1, min(os.cpu_count() or 1, 4))


@pytest.fixture(autouse=True)
def _teacher_cache(tmp_path_factory, monkeypatch):
    """Each test's teacher top-k windows (every distilling run writes them by default) in a temporary folder of its
    own, beside ``tmp_path`` (whose contents tests check): not the user's ``~/.cache/maskprune``, and no test reads
    windows another wrote."""
    monkeypatch.setenv("MASKPRUNE_TEACHER_CACHE", str(tmp_path_factory.mktemp("teacher-topk")))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on 2 cores are fast and steady with one thread, erratic with two.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny GQA Llama checkpoint folder with its tokenizer, shared by a test module."""
    import tiny

    return tiny.save_tiny(tmp_path_factory.mktemp("m") / "tiny-llama", "llama_gqa")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """A small calibration text (.jsonl) for the tiny models."""
    import tiny

    return tiny.write_calib(tmp_path_factory.mktemp("c") / "calib.jsonl")
