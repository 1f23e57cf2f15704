"""The model card (README.md) written into every exported checkpoint."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from .config import PruneConfig
from .runreport import RunReport

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
            return line.split(":", 1)[1].strip()
    return None


def _mask_lr(cfg: PruneConfig) -> str:
    return f"{cfg.mask_lr:g}" if cfg.mask_lr is not None else f"{cfg.resolved_mask_lr():.3g} (automatic)"


def _selection_text(cfg: PruneConfig) -> str:
    if cfg.freeze_share == 0.0:
        return f"the prior's selection frozen at step 0, all {cfg.steps} steps spent on LoRA distillation"
    return f"{cfg.mask_optimizer} at lr {_mask_lr(cfg)}, selection {_freeze_text(cfg)}"


def _freeze_text(cfg: PruneConfig) -> str:
    if cfg.freeze_share >= 1.0:
        return "learned until the cut (no fine-tuning on the pruned structure)"
    frozen = round(cfg.freeze_share * cfg.steps)
    return (
        f"frozen after {frozen} of {cfg.steps} steps, the remaining {cfg.steps - frozen} steps "
        "spent on LoRA distillation of the pruned structure"
    )


def write_model_card(folder: Path, run: RunReport, command: list[str] | None = None) -> Path:
    """Write ``folder/README.md`` from the run report: the header, then one section after another."""
    report, cfg = run.to_dict(), run.config
    license_ = _base_license(report["model"]["path"]) or "same as the base model"
    copied = copy_license(report["model"]["path"], folder)
    cmd = " ".join(shlex.quote(a) for a in (command or ["maskprune", *sys.argv[1:]]))
    text = (
        _header(report, cfg, license_)
        + _shape_section(report)
        + _settings_section(report, cfg)
        + _distill_text(report.get("distill"))
        + _recovery_text(report.get("recovery"))
        + _evaluation_section(report.get("perplexity") or {})
        + f"## Reproduce\n\n```bash\n{cmd}\n```\n\n## License\n\n{license_}"
        + (" (license files copied: " + ", ".join(copied) + ")" if copied else "")
        + ". The pruned weights\nare a derivative of the base model and carry its license.\n"
    )
    out = folder / "README.md"
    out.write_text(text, encoding="utf-8")
    return out


def _how(report: dict, cfg: PruneConfig) -> str:
    """How the units were chosen, in a phrase."""
    dist = report.get("distill")
    if dist:
        return (
            f"a pruned model recovered by distillation ({dist['mode']}) from its dense original "
            f"`{dist['teacher']}`; its structure is unchanged"
        )
    if cfg.method != "maskprune":
        return f"attention heads and FFN channels chosen by the one-shot `{cfg.method}` score"
    if cfg.freeze_share == 0.0:
        return (
            f"attention heads and FFN channels chosen by a one-shot `{cfg.mask_init}` score, then LoRA "
            "trained by distillation from the unpruned model on the pruned structure"
        )
    return (
        "masks on attention heads and FFN channels learned by the minimax method with LoRA and "
        "distillation from the unpruned model"
    )


def _header(report: dict, cfg: PruneConfig, license_: str) -> str:
    from .models import hub_id_of

    p = report["params"]
    base = report["model"]["source"]
    hub_id = hub_id_of(base)
    base_line = f"base_model: {hub_id}\n" if hub_id else ""
    if hub_id and hub_id != base:
        base = f"{hub_id} (as `{base}`)"
    title = Path(cfg.out).name if cfg.out else "pruned model"
    what = "distilled" if report.get("distill") else f"pruned by {100 * p['sparsity']:.1f}%"
    return f"""---
license: {license_}
{base_line}tags: [pruned, structured-pruning, maskprune]
library_name: transformers
---

# {title}: {base} {what} with maskprune

A layer-uniform structured pruning of **{base}** made with
maskprune (MaskPrune, arXiv 2502.14008): {_how(report, cfg)}, the same number of units cut from every layer.
It is a stock `{report["model"]["model_type"]}` checkpoint:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH")
```

"""


def _shape_section(report: dict) -> str:
    p, shape = report["params"], report["shape"]
    dense = shape["dense"]
    return f"""## Shape and size

| | dense | pruned |
| --- | --- | --- |
| parameters (all, tied counted once) | {p["dense"]:,} | {p["exported"]:,} |
| prunable parameters (heads + FFN) | {p["prunable_dense"]:,} | {p["prunable_exported"]:,} |
| num_attention_heads | {dense["num_attention_heads"]} | {shape["num_attention_heads"]} |
| num_key_value_heads | {dense["num_key_value_heads"]} | {shape["num_key_value_heads"]} |
| intermediate_size | {dense["intermediate_size"]} | {shape["intermediate_size"]} |
| head_dim | {shape["head_dim"]} | {shape["head_dim"]} |
| layers | {shape["num_hidden_layers"]} | {shape["num_hidden_layers"]} (every one the same shape) |

Sparsity: {100 * p["sparsity"]:.2f}% of all parameters, {100 * p["prunable_removed_share"]:.2f}% of the
prunable ones; budget {p["budget"]:,} parameters.

"""


def _settings_section(report: dict, cfg: PruneConfig) -> str:
    lora = f"rank {cfg.lora_rank}, lr {cfg.lora_lr}" if cfg.lora else "off"
    rt = report.get("roundtrip") or {}
    return f"""## Method and settings

GQA policy `{cfg.gqa_policy}`; {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens
from `{cfg.calib}`; recipe `{cfg.recipe}`: masks from `{cfg.mask_init}`,
{_selection_text(cfg)}; LoRA {lora};
eta1..eta4 = {cfg.eta1}, {cfg.eta2}, {cfg.eta3}, {cfg.eta4}; budget warm-up over
{cfg.warmup_share:.0%} of the steps; distillation KL ({cfg.kl_direction}) + {cfg.alpha} x layer MSE;
autocast {cfg.dtype}. Verified at export, on the same probe windows: the folded and sliced fp32 model
against the masked model, max |logit difference| {report["parity"]["max_abs_diff"]:.2e} (largest logit
{report["parity"]["ref_max_abs"]:.1f}; merging LoRA and folding masks reorder fp32 sums); this saved
{rt.get("dtype", "")} checkpoint reloaded with plain `from_pretrained` against the model it was saved from,
{rt.get("max_abs_diff", float("nan")):.2e}.

"""


def _evaluation_section(ppl: dict) -> str:
    rows = [
        f"| {key.replace('_', ' ')} | {r['ppl']:.3f} | {r['seq_len']} | {r['windows']} of "
        f"{r['total_windows']} | {r['dtype']} | {r['bos']} |"
        for key in ("dense", "before_cut", "after_cut", "before_recovery", "exported")
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
    curve = d.get("validation")
    if curve:
        first, last = curve[0], curve[-1]
        text += (
            f" (perplexity on held-out calibration windows {first['ppl']:.4g} after {first['steps']} steps, "
            f"{last['ppl']:.4g} after {last['steps']})"
        )
    return text


def _recovery_text(rec: dict | None) -> str:
    """The model card's section on prune's recovery after the cut (``--recover-steps``), or nothing."""
    if not rec:
        return ""
    return (
        f"## Recovery after the cut\n\nThe exported model was then distilled from the dense `{rec['teacher']}` "
        f"(`--recover-steps`, the code of `maskprune distill`): {_training_summary(rec)}; KL to the dense "
        'model\'s logits. In the table below, "before recovery" is the cut model as exported, "exported" the '
        "recovered one.\n\n"
    )


def _distill_text(dist: dict | None) -> str:
    """The model card's recovery section (``maskprune distill``), or nothing."""
    if not dist:
        return ""
    return (
        f"## Distillation\n\nRecovered from the dense teacher `{dist['teacher']}` by `maskprune distill`: "
        f"{_training_summary(dist)}; KL to the teacher's logits (see Method and settings). In the table "
        'below, "dense" is the student before distillation.\n\n'
    )
