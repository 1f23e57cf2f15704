"""The model card describes what ran: per recipe, with valid Hub metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import tiny
from maskprune.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cards")
    dense = tiny.save_tiny(root / "dense", "llama_gqa")
    calib = tiny.write_calib(root / "calib.jsonl")
    flags = [*tiny.small_run(calib, calib_samples=8), "--no-report"]
    out = {}
    for name, args in {
        "default": ["--steps", "3"],
        "masked": ["--steps", "3", "--no-cut-first"],
        "learned": ["--steps", "4", "--freeze-share", "0.5"],
        "magnitude": ["--method", "magnitude"],
        "flap": ["--method", "flap"],
    }.items():
        out[name] = root / name
        assert main(["-q", "prune", str(dense), "--sparsity", "0.3", *args, *flags, "--out", str(out[name])]) == 0
    out["distill"] = root / "distilled"
    argv = ["-q", "distill", str(out["flap"]), "--teacher", str(dense), "--steps", "2", *flags]
    assert main([*argv, "--out", str(out["distill"])]) == 0
    return out


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_every_card_has_valid_hub_metadata_and_names_its_folder(runs):
    for name, folder in runs.items():
        meta, body = _card(folder)
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation", name
        assert meta["license"] == "other" and meta["license_name"], name  # the tiny base declares none
        assert f'from_pretrained("{folder}")' in body and '"PATH"' not in body, name


@pytest.mark.parametrize("name", ["magnitude", "flap"])
def test_a_one_shot_card_describes_the_one_shot_run(runs, name):
    _, body = _card(runs[name])
    assert f"one-shot `{name}` score" in body and f"`{name}` scores" in body
    for absent in ("steps of batch", "LoRA", "eta1", "wanda-sp", "before the cut"):
        assert absent not in body, absent


def test_the_default_card_describes_the_prior_the_refit_and_the_distillation(runs):
    _, body = _card(runs["default"])  # cut first: the prior's cut, re-fit, then the sliced model distilled
    assert "`wanda-sp` scores (one-pass) on 8 windows" in body and "re-fit by ridge regression" in body
    assert "the default recipe cuts first" in body and "lora rank 8, 3 steps" in body
    assert "eta1" not in body and "masked, before the cut" not in body and "--recover-steps" not in body
    _, body = _card(runs["masked"])  # --no-cut-first: every step on the masked model
    assert "`wanda-sp` scores on 8 of 8 windows" in body and "3 steps of batch" in body and "LoRA rank 8" in body
    assert "eta1" not in body and "masked, before the cut" not in body and "re-fit" not in body


def test_the_learned_card_describes_the_mask_learning(runs):
    _, body = _card(runs["learned"])
    assert "eta1..eta4" in body and "frozen after 2 of 4 steps" in body and "masked, before the cut" in body


def test_the_distill_card_describes_a_distillation_of_a_pruned_student(runs):
    _, body = _card(runs["distill"])
    assert "Distillation:" in body and "before distillation" in body and "distilled" in body
    for absent in ("Sparsity:", "| dense |", "eta1", "before the cut", "after the cut", "masks from"):
        assert absent not in body, absent
