"""Config validation and the recipe presets."""

import pytest

from maskprune.config import PAPER_RECIPE, CutConfig, PruneConfig, load_config
from maskprune.errors import MaskPruneError


def test_default_recipe_and_paper_preset():
    d = load_config()
    assert (d.recipe, d.mask_init, d.mask_optimizer, d.mask_lr_schedule) == (
        "maskprune",
        "wanda-sp",
        "layer-adam",
        "cosine",
    )
    assert d.freeze_share < 1.0
    p = load_config(overrides={"recipe": "paper"})
    for k, v in PAPER_RECIPE.items():
        assert getattr(p, k) == v, k
    # a key given explicitly wins over the preset
    assert load_config(overrides={"recipe": "paper", "mask_lr": 0.1}).mask_lr == 0.1


def test_recipe_preset_applies_from_a_yaml_file_and_flags_still_win(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("recipe: paper\nfreeze_share: 0.5\n")
    c = load_config(f, overrides={"mask_init": "flap"})
    assert (c.mask_optimizer, c.freeze_share, c.mask_init) == ("adamw", 0.5, "flap")


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"freeze_share": 1.5}, "freeze_share must be in [0, 1]"),
        ({"mask_init_spread": 1.0}, "mask_init_spread must be in [0, 1)"),
        ({"mask_init": "random"}, "mask_init must be one of"),
        ({"mask_optimizer": "sgd"}, "mask_optimizer must be one of"),
        ({"recipe": "fast"}, "recipe must be one of"),
    ],
)
def test_bad_values_are_named(overrides, words):
    with pytest.raises(MaskPruneError, match="invalid configuration") as e:
        load_config(overrides=overrides)
    assert words in str(e.value)


def test_all_problems_reported_together():
    with pytest.raises(MaskPruneError) as e:
        load_config(overrides={"freeze_share": -1.0, "steps": 0, "sparsity": 2.0})
    msg = str(e.value)
    assert "freeze_share" in msg and "steps must be >= 1" in msg and "sparsity must be in (0, 1)" in msg


def test_baselines_ignore_the_mask_prior():
    assert PruneConfig(method="wanda-sp").validate().mask_init == "wanda-sp"  # accepted, unused


def test_dtype_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    import torch

    from maskprune.dtypes import autocast_dtype, resolve_dtype

    assert load_config().dtype == "auto"
    assert resolve_dtype("fp32") == "fp32" and resolve_dtype("bf16") == "bf16"
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert resolve_dtype("auto", "cpu") == expected
    assert autocast_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert autocast_dtype("auto", "cpu") is None


def test_a_batch_larger_than_the_calibration_set_is_refused():
    with pytest.raises(MaskPruneError, match="batch_size 8 is larger than calib_samples 2"):
        load_config(overrides={"calib_samples": 2, "batch_size": 8})
    assert load_config(overrides={"calib_samples": 2, "batch_size": 8, "method": "flap"}).batch_size == 8


def test_automatic_mask_lr_keeps_the_noise_walk_inside_the_prior_spread():
    import math

    c = load_config(overrides={"steps": 400, "freeze_share": 0.4})
    assert c.mask_lr is None and math.isclose(c.resolved_mask_lr(), 0.1 / math.sqrt(160))
    assert load_config(overrides={"steps": 400, "freeze_share": 1.0}).selection_steps() == 400
    assert load_config(overrides={"mask_lr": 0.05}).resolved_mask_lr() == 0.05
    with pytest.raises(MaskPruneError, match="mask_lr must be a finite number > 0 or null"):
        load_config(overrides={"mask_lr": 0.0})


def test_model_card_names_the_hub_model_behind_an_alias():
    from maskprune.models import DEFAULT_HUB_ID, hub_id_of

    assert hub_id_of("smollm2-135m") == DEFAULT_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id_of("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert hub_id_of("./my-model") is None and hub_id_of("model.Q4_1.gguf") is None


def test_type_and_range_problems_are_reported_in_one_error():
    with pytest.raises(MaskPruneError) as e:
        load_config(overrides={"steps": "many", "freeze_share": 2.0, "nope": 1, "split_search_samples": 0})
    msg = str(e.value)
    for words in (
        "steps must be",
        "freeze_share must be in [0, 1]",
        "unknown config key 'nope'",
        "split_search_samples must be >= 1",
    ):
        assert words in msg, words


def test_every_field_has_help_as_metadata_and_no_dated_figures():
    import dataclasses
    import re

    from maskprune.config import GROUPS

    for f in (f for cls in GROUPS.values() for f in dataclasses.fields(cls)):
        text = f.metadata.get("help", "")
        assert len(text) > 15, f.name
        assert not re.search(r"20\d\d-\d\d-\d\d|bench/results", text), f.name


def test_new_options_are_checked():
    with pytest.raises(MaskPruneError, match="layerwise_calibration applies"):
        load_config(overrides={"method": "taylor", "layerwise_calibration": True})
    with pytest.raises(MaskPruneError, match="bias_compensation 'on' applies to one-shot"):
        load_config(overrides={"bias_compensation": "on"})
    with pytest.raises(MaskPruneError, match="split_search needs a one-shot order"):
        load_config(overrides={"split_search": True, "mask_init": "ones"})
    assert (
        load_config().resolved_split_search() and not load_config(overrides={"recipe": "paper"}).resolved_split_search()
    )
    assert load_config(overrides={"method": "flap"}).resolved_layerwise_calibration()
    assert not load_config(overrides={"method": "taylor"}).resolved_layerwise_calibration()


def test_distill_takes_no_option_that_chooses_the_cut_and_trains_something():
    from maskprune.config import DISTILL_SETTINGS, PRUNE_ONLY, distill_overrides

    assert set(DISTILL_SETTINGS) <= PRUNE_ONLY
    with pytest.raises(MaskPruneError, match="does not take method, sparsity"):
        distill_overrides({"sparsity": 0.5, "method": "flap", "steps": 3})
    assert distill_overrides({"steps": 3}) == {"steps": 3, **DISTILL_SETTINGS}
    with pytest.raises(MaskPruneError, match="nothing would train"):
        load_config(overrides={"teacher": "t", **DISTILL_SETTINGS, "lora": False})
    with pytest.raises(MaskPruneError, match="nothing would train"):
        load_config(overrides={"recover_steps": 5, "lora": False})
    assert load_config(overrides={"teacher": "t", **DISTILL_SETTINGS, "lora": False, "full": True}).full


def test_a_config_file_shared_by_prune_and_distill_drops_what_does_not_apply(tmp_path, caplog):
    from maskprune.config import PRUNE_ONLY

    path = tmp_path / "run.yaml"
    path.write_text("sparsity: 0.5\nmethod: flap\nsteps: 7\n")
    cfg = load_config(path, {"teacher": "t", "mask_init": "ones", "freeze_share": 0.0}, ignore=PRUNE_ONLY)
    assert (cfg.steps, cfg.method, cfg.sparsity) == (7, "maskprune", CutConfig.sparsity)
    assert "method, sparsity do not apply here and are ignored" in caplog.text


def test_prune_takes_no_separate_teacher():
    from maskprune.config import DISTILL_ONLY, PRUNE_ONLY, prune_overrides

    assert not DISTILL_ONLY & PRUNE_ONLY
    with pytest.raises(MaskPruneError, match="prune does not take teacher, teacher_gguf_file") as e:
        prune_overrides({"teacher": "d", "teacher_gguf_file": "f.gguf", "steps": 3})
    assert "maskprune distill" in str(e.value)
    assert prune_overrides({"steps": 3, "sparsity": 0.5}) == {"steps": 3, "sparsity": 0.5}


def test_the_config_is_grouped_and_typed_and_the_flat_keys_still_work(tmp_path):
    from maskprune.config import GROUP_OF, GROUPS, TrainingConfig

    flat = tmp_path / "flat.yaml"
    flat.write_text("sparsity: 0.5\nmethod: flap\nsteps: 7\nlora_rank: 4\ncalib_samples: 64\neval_tasks: piqa\n")
    grouped = tmp_path / "grouped.yaml"
    grouped.write_text(
        "cut: {sparsity: 0.5, method: flap}\ntraining: {steps: 7, lora_rank: 4}\ndata: {calib_samples: 64}\n"
        "eval_tasks: piqa\n"  # flat and grouped keys mix
    )
    a, b = load_config(flat), load_config(grouped)
    assert a == b and a.to_dict() == b.to_dict()
    assert isinstance(a.training, TrainingConfig) and a.training.steps == 7 == a.steps
    assert (a.cut.sparsity, a.cut.method, a.data.calib_samples, a.evaluation.eval_tasks) == (0.5, "flap", 64, "piqa")
    assert set(a.to_groups()) == set(GROUPS) and set(a.to_dict()) == set(GROUP_OF)
    # the flat constructor and replace
    assert PruneConfig(sparsity=0.5, method="flap", steps=7, lora_rank=4, calib_samples=64, eval_tasks="piqa") == a
    assert a.replace(steps=9).training.steps == 9 and a.steps == 7
    with pytest.raises(TypeError, match="nope"):
        PruneConfig(nope=1)


def test_the_shipped_config_files_load_flat():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        assert load_config(f).model


def test_a_key_under_another_group_is_refused_with_its_group(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("cut: {sparsity: 0.5, steps: 10}\n")
    with pytest.raises(MaskPruneError, match="holds keys of other groups") as e:
        load_config(f)
    assert "steps -> training" in str(e.value)


def test_each_group_validates_itself():
    from maskprune.config import CutConfig, DataConfig, SelectionConfig

    assert any("sparsity must be in (0, 1)" in p for p in CutConfig(sparsity=1.5).problems())
    assert any("freeze_share" in p for p in SelectionConfig(freeze_share=2.0).problems())
    assert DataConfig(batch_size=0).problems() == ["batch_size must be >= 1, found 0"]
    assert CutConfig().problems() == [] and SelectionConfig().problems() == []


def test_the_default_cuts_first_on_every_axis_and_the_other_paths_keep_theirs(monkeypatch):
    from maskprune.config import PRUNE_AXES, cut_first_config

    d = load_config()
    assert d.resolved_cut_first() and d.resolved_prune_axes() == PRUNE_AXES and d.reconstruct is None
    first = cut_first_config(d)  # what the default runs: the prior's one-shot cut, shaped and re-fit, then steps
    assert (first.method, first.reconstruct, first.prune_axes) == ("wanda-sp", True, PRUNE_AXES)
    assert first.recover_steps == d.steps and first.resolved_cut_samples() == d.prior_samples
    for masked in ({"cut_first": False}, {"freeze_share": 0.5}, {"recipe": "paper"}):
        c = load_config(overrides=masked)
        assert not c.resolved_cut_first() and c.resolved_prune_axes() == ("heads", "ffn"), masked
    flap = load_config(overrides={"method": "flap"})  # baselines as published: heads and FFN, no re-fit
    assert not flap.resolved_cut_first() and flap.resolved_prune_axes() == ("heads", "ffn") and not flap.reconstruct
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher: the data-parallel masked path
    assert not load_config().resolved_cut_first()
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(MaskPruneError, match="keep_hidden needs hidden in prune_axes"):
        load_config(overrides={"method": "flap", "keep_hidden": 512})
    with pytest.raises(MaskPruneError, match="a cut made before training"):
        load_config(overrides={"cut_first": False, "prune_axes": "heads,ffn,hidden"})
