"""The model card (README.md) written into every exported checkpoint."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from .config import PruneConfig
from .runreport import RunReport, recipe_of

__all__ = ["write_model_card", "copy_license"]

_LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "license.txt", "USE_POLICY.md")


def copy_license(source_dir: str | Path, dest: Path) -> list[str]:
    """Copy the base model's license files (if it is a local folder) into ``dest``."""
    copied = []
    src = Path(source_dir)
    if src.is_dir():
        for name in _LICENSE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dest / name)
                copied.append(name)
    return copied


def _base_license(source_dir: str | Path) -> str | None:
    """The ``license:`` of the base model's card front matter, if it has one."""
    card = Path(source_dir) / "README.md"
    if not card.is_file():
        return None
    lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            value = line.split(":", 1)[1].strip()
            return value if value and value != "other" else None  # "other" names its license elsewhere
    return None


def _mask_lr(cfg: PruneConfig) -> str:
    return f"{cfg.mask_lr:g}" if cfg.mask_lr is not None else f"{cfg.resolved_mask_lr():.3g} (automatic)"


def write_model_card(folder: Path, run: RunReport, command: list[str] | None = None) -> Path:
    """Write ``folder/README.md`` from the run report: Hub metadata, what was done (per recipe), the shape,
    the settings that ran, the evaluation, how to reproduce, the license."""
    report, cfg = run.to_dict(), run.config
    recipe = recipe_of(report)
    license_ = _base_license(report["model"]["path"])
    copied = copy_license(report["model"]["path"], folder)
    cmd = " ".join(shlex.quote(a) for a in (command or ["maskprune", *sys.argv[1:]]))
    text = (
        _header(report, cfg, recipe, license_)
        + _shape_section(report, recipe)
        + _settings_section(report, cfg, recipe)
        + _recovery_text(report.get("recovery"), bool((report.get("perplexity") or {}).get("before_recovery")))
        + _evaluation_section(report.get("perplexity") or {}, recipe)
        + f"## Reproduce\n\n```bash\n{cmd}\n```\n\n## License\n\n"
        + (f"`{license_}`, the base model's" if license_ else "The base model's license")
        + (" (license files copied: " + ", ".join(copied) + ")" if copied else "")
        + ". The pruned weights are a derivative of the base model and carry its license.\n"
    )
    out = folder / "README.md"
    out.write_text(text, encoding="utf-8")
    return out


def _how(report: dict, cfg: PruneConfig, recipe: str) -> str:
    """How the units were chosen, in a phrase."""
    if recipe == "distill":
        d = report["distill"]
        return f"a pruned model recovered by distillation ({d['mode']}) from its dense original `{d['teacher']}`"
    if recipe == "one-shot":
        return f"attention heads and FFN channels chosen by the one-shot `{cfg.method}` score"
    if recipe == "prior":
        return (
            f"attention heads and FFN channels chosen by a one-shot `{cfg.mask_init}` score, then LoRA "
            "trained by distillation from the unpruned model on the pruned structure"
        )
    return (
        "masks on attention heads and FFN channels learned by the minimax method with LoRA and "
        "distillation from the unpruned model"
    )


def _header(report: dict, cfg: PruneConfig, recipe: str, license_: str | None) -> str:
    from .models import hub_id_of

    p = report["params"]
    base = report["model"]["source"]
    hub_id = hub_id_of(base) or _hub_id_in_config(report["model"]["path"])
    base_line = f"base_model: {hub_id}\n" if hub_id else ""
    if hub_id and hub_id != base:
        base = f"{hub_id} (as `{base}`)"
    title = Path(cfg.out).name if cfg.out else "pruned model"
    what = "distilled" if recipe == "distill" else f"pruned by {100 * p['sparsity']:.1f}%"
    meta = f"license: {license_}\n" if license_ else "license: other\nlicense_name: same-as-base-model\n"
    where = cfg.out or "PATH/TO/THIS/FOLDER"
    layer = "same shape as its teacher's" if recipe == "distill" else "the same number of units cut from every layer"
    return f"""---
{meta}{base_line}tags: [pruned, structured-pruning, maskprune]
library_name: transformers
pipeline_tag: text-generation
---

# {title}: {base} {what} with maskprune

A layer-uniform structured pruning of **{base}** made with maskprune (MaskPrune, arXiv 2502.14008):
{_how(report, cfg, recipe)}; {layer}. It is a stock `{report["model"]["model_type"]}` checkpoint:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{where}")
tokenizer = AutoTokenizer.from_pretrained("{where}")
```

"""


def _hub_id_in_config(path: str) -> str | None:
    """The hub id a local checkpoint was saved from (``_name_or_path`` in its config.json), if it names one."""
    import json

    from .models import hub_id_of

    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    name = json.loads(config.read_text()).get("_name_or_path") or ""
    return hub_id_of(name) if name and not Path(name).is_absolute() else None


def _shape_section(report: dict, recipe: str) -> str:
    p, shape = report["params"], report["shape"]
    rows = [("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_key_value_heads")]
    rows += [("intermediate_size", "intermediate_size")]
    if recipe == "distill":  # the student's shape (unchanged by distillation)
        body = "\n".join(f"| {k} | {shape[k]} |" for k, _ in rows)
        return f"""## Shape and size

| | this model |
| --- | --- |
| parameters (all, tied counted once) | {p["exported"]:,} |
{body}
| head_dim | {shape["head_dim"]} |
| layers | {shape["num_hidden_layers"]} (every one the same shape) |

"""
    dense = shape["dense"]
    if "hidden_size" in shape:  # reports from before the hidden / depth cuts have no such key
        rows.insert(0, ("hidden_size", "hidden_size"))
    body = "\n".join(f"| {k} | {dense.get(k, shape[k])} | {shape[k]} |" for k, _ in rows)
    layers = shape["num_hidden_layers"]
    return f"""## Shape and size

| | dense | pruned |
| --- | --- | --- |
| parameters (all, tied counted once) | {p["dense"]:,} | {p["exported"]:,} |
| prunable parameters (heads + FFN) | {p["prunable_dense"]:,} | {p["prunable_exported"]:,} |
{body}
| head_dim | {shape["head_dim"]} | {shape["head_dim"]} |
| layers | {dense.get("num_hidden_layers", layers)} | {layers} (every one the same shape) |

Sparsity: {100 * p["sparsity"]:.2f}% of all parameters, {100 * p["prunable_removed_share"]:.2f}% of the
prunable ones; budget {p["budget"]:,} parameters.

"""


def _settings_section(report: dict, cfg: PruneConfig, recipe: str) -> str:
    data = f"{cfg.calib_samples} windows of {cfg.seq_len} tokens from `{cfg.calib}`"
    if recipe == "one-shot":
        comp = report.get("bias_compensation")
        data = f"{cfg.resolved_cut_samples()} windows of {cfg.seq_len} tokens from `{cfg.calib}`"
        how = (
            f"`{cfg.method}` scores ({report.get('calibration') or 'one pass'}) on {data}; "
            + ("FLAP's bias compensation in the exported biases; " if comp else "")
            + _split_text(report)
            + _refit_text(report.get("reconstruction"))
        )
    elif recipe == "distill":
        how = f"Distillation: {_training_summary(report['distill'])}; {_loss_text(cfg, report['distill'])}"
    elif recipe == "prior":
        how = (
            f"`{cfg.mask_init}` scores on {min(cfg.prior_samples, cfg.calib_samples)} of {data}; "
            f"{_split_text(report)}; then "
            f"{cfg.steps} steps of batch {cfg.batch_size} ({cfg.steps * cfg.batch_size * cfg.seq_len:,} tokens), "
            f"LoRA {_lora_text(cfg)}; {_loss_text(cfg)}"
        )
    else:
        how = (
            f"recipe `{cfg.recipe}`: masks from `{cfg.mask_init}` on {data}, "
            f"{cfg.mask_optimizer} at lr {_mask_lr(cfg)}, "
            f"selection {_freeze_text(cfg)}; eta1..eta4 = {cfg.eta1}, {cfg.eta2}, {cfg.eta3}, {cfg.eta4}; budget "
            f"warm-up over {cfg.warmup_share:.0%} of the steps; LoRA {_lora_text(cfg)}; {_loss_text(cfg)}"
        )
    how += f"; GQA policy `{cfg.gqa_policy}`; autocast {cfg.dtype}."
    return f"## Method and settings\n\n{how}\n\n{_parity_text(report)}\n\n"


def _refit_text(rec: dict | None) -> str:
    """The re-fit of the kept weights (``--reconstruct``) in a phrase, or nothing."""
    if not rec:
        return ""
    err = rec["relative_error"]

    def mean(key: str) -> float:
        return sum(err[key]) / max(1, len(err[key]))

    target = (
        "the dense model's outputs (down_proj: the dense residual stream past any dropped layers)"
        if rec.get("target") == "dense"
        else "the uncut layers' outputs"
    )
    return (
        f"; the kept o_proj / down_proj columns re-fit by ridge regression to {target} (ridge {rec['ridge']:g}, "
        f"{rec['windows']} windows): mean relative error of down_proj {mean('down_before'):.3f} -> "
        f"{mean('down_after'):.3f}, of o_proj {mean('o_before'):.3f} -> {mean('o_after'):.3f}"
    )


def _split_text(report: dict) -> str:
    split = report.get("split_search")
    if not split:
        return "the head/FFN split as configured"
    chosen = split["chosen"]
    n = len(split["candidates"])
    return f"the head/FFN split measured ({n} candidates by KL; {chosen['k_head']} head units cut per row)"


def _lora_text(cfg: PruneConfig) -> str:
    if cfg.full:
        return "off (every weight trained)"
    return f"rank {cfg.lora_rank}, lr {cfg.lora_lr}" if cfg.lora else "off"


def _teacher_text(section: dict | None, whose: str = "the teacher's") -> str:
    """What a distillation matched (its report ``section``): the teacher's logits, or its cached top-k and the
    tail."""
    k = (section or {}).get("teacher_topk")
    if not k:
        return f"{whose} logits"
    mass = ((section.get("teacher_topk_windows") or {}).get("training") or {}).get("mass")
    held = f", which held {100 * mass:.0f} % of its probability on the training windows" if mass else ""
    return f"{whose} top {k} tokens and the mass of the rest{held}"


def _loss_text(cfg: PruneConfig, section: dict | None = None) -> str:
    text = f"KL ({cfg.kl_direction}) to {_teacher_text(section)}"
    if cfg.alpha:
        text += f" + {cfg.alpha} x layer MSE"
    return text + (f" + {cfg.ce_weight} x LM cross-entropy" if cfg.ce_weight else "")


def _parity_text(report: dict) -> str:
    rt, par = report.get("roundtrip") or {}, report["parity"]
    return (
        f"Verified at export, on the same probe windows: the folded and sliced fp32 model against the masked model, "
        f"max |logit difference| {par['max_abs_diff']:.2e} (largest logit {par['ref_max_abs']:.1f}); this saved "
        f"{rt.get('dtype', '')} checkpoint reloaded with plain `from_pretrained` against the model it was saved "
        f"from, {rt.get('max_abs_diff', float('nan')):.2e}."
    )


def _freeze_text(cfg: PruneConfig) -> str:
    if cfg.freeze_share >= 1.0:
        return "learned until the cut (no fine-tuning on the pruned structure)"
    frozen = round(cfg.freeze_share * cfg.steps)
    return (
        f"frozen after {frozen} of {cfg.steps} steps, the remaining {cfg.steps - frozen} steps "
        "spent on LoRA distillation of the pruned structure"
    )


_PPL_ROWS = {
    "distill": (("dense", "before distillation"), ("exported", "distilled")),
    "one-shot": (("dense", "dense"), ("before_recovery", "cut, before recovery"), ("exported", "exported")),
    "prior": (("dense", "dense"), ("before_recovery", "before recovery"), ("exported", "exported")),
    "learned": (
        ("dense", "dense"),
        ("before_cut", "masked, before the cut"),
        ("after_cut", "after the cut"),
        ("before_recovery", "before recovery"),
        ("exported", "exported"),
    ),
}


def _evaluation_section(ppl: dict, recipe: str) -> str:
    rows = [
        f"| {label} | {r['ppl']:.3f} | {r['seq_len']} | {r['windows']} of {r['total_windows']} | {r['dtype']} "
        f"| {r['bos']} |"
        for key, label in _PPL_ROWS[recipe]
        if (r := ppl.get(key))
    ]
    table = (
        "| model | WikiText-2 ppl | seq_len | windows | dtype | BOS |\n| --- | --- | --- | --- | --- | --- |\n"
        + "\n".join(rows)
        if rows
        else "Not evaluated during the run."
    )
    return f"## Evaluation\n\nProtocol: {ppl.get('protocol', 'n/a')}.\n\n{table}\n\n"


def _training_summary(d: dict) -> str:
    """``mode, N steps, T tokens of `calib`, M minutes`` of a distillation phase (its report section)."""
    secs = f", {d['seconds'] / 60:.1f} minutes" if d.get("seconds") else ""
    text = f"{d['mode']}, {d['steps']} steps, {d['tokens']:,} tokens of `{d['calib']}`{secs}"
    if d.get("budget_minutes"):
        taken = f"; the run took {d['run_minutes']:.1f}" if d.get("run_minutes") is not None else ""
        text += (
            f" (set by a {d['budget_minutes']:g}-minute time budget, at most {d['steps_cap']} steps{taken}: a faster "
            "machine buys more steps)"
        )
    curve = d.get("validation")
    if curve:
        first, last = curve[0], curve[-1]
        text += (
            f" (perplexity on held-out calibration windows {first['ppl']:.4g} after {first['steps']} steps, "
            f"{last['ppl']:.4g} after {last['steps']})"
        )
    return text


def _recovery_text(rec: dict | None, before_measured: bool = True) -> str:
    """The model card's section on prune's recovery after the cut (``--recover-steps``), or nothing;
    ``before_measured``: the cut model was evaluated before the recovery (``eval_between``)."""
    if not rec:
        return ""
    via = (
        "the default recipe cuts first and spends its `--steps` on the sliced model"
        if rec.get("cut_first")
        else "`--recover-steps`"
    )
    teacher = _teacher_text(rec, "the dense model's")
    return (
        f"## Recovery after the cut\n\nThe exported model was then distilled from the dense `{rec['teacher']}` "
        f"({via}, the code of `maskprune distill`): {_training_summary(rec)}; KL to {teacher}. "
        + (
            'In the table below, "before recovery" is the cut model as exported, "exported" the recovered one.'
            if before_measured
            else "The cut model was not evaluated before the recovery (`--no-eval-between`, a sweep's default)."
        )
        + "\n\n"
    )
