"""Zero-shot accuracy through lm-evaluation-harness itself (its ``HFLM`` and its task definitions).

Online, the seven tasks of the paper load their datasets from the hub as lm-eval defines them.
Offline, ``data_dir`` points each task at local files in the formats the datasets are published in;
they are converted to the rows of the hub dataset lm-eval's task reads, and handed to that same
task through its ``custom_dataset`` hook, so prompts, choices and metrics stay lm-eval's.

Expected layout of ``data_dir`` (one folder per task; any file name matching the pattern)::

    piqa/valid.jsonl + piqa/valid-labels.lst           goal, sol1, sol2 / one label a line
    hellaswag/hellaswag_val.jsonl                      ctx_a, ctx_b, activity_label, endings, label
    boolq/*.jsonl                                      question, passage, label|answer (bool, "true"/"false", 0/1)
    winogrande/dev.jsonl [+ dev-labels.lst]            sentence, option1, option2, answer "1"/"2"
    arc_easy/*.jsonl, arc_challenge/*.jsonl            question.stem, question.choices[].text/.label, answerKey
    openbookqa/*.jsonl                                 the ARC layout (OpenBookQA "main")
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

from .errors import MaskPruneError
from .offload import disk_weights, home_device

__all__ = [
    "check_sources",
    "hub_reachable",
    "PAPER_TASKS",
    "TASK_NAMES",
    "AVERAGE_METRIC",
    "FORMATS",
    "load_local_rows",
    "run_zeroshot",
    "resolve_tasks",
]

log = logging.getLogger(__name__)

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASK_NAMES = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
}
"""The column name of each task in the paper's tables."""
AVERAGE_METRIC = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}

FORMATS = {
    "piqa": "piqa/valid.jsonl (goal, sol1, sol2) + piqa/valid-labels.lst (0/1 per line)",
    "hellaswag": "hellaswag/hellaswag_val.jsonl (ctx_a, ctx_b, activity_label, endings, label)",
    "boolq": 'boolq/*.jsonl (question, passage, label or answer: true/false, "true"/"false" or 0/1)',
    "winogrande": 'winogrande/dev.jsonl (sentence, option1, option2, answer "1"/"2"), optional dev-labels.lst',
    "arc_easy": "arc_easy/*.jsonl (question.stem, question.choices[].text/.label, answerKey)",
    "arc_challenge": "arc_challenge/*.jsonl (question.stem, question.choices[].text/.label, answerKey)",
    "openbookqa": "openbookqa/*.jsonl (question.stem, question.choices[].text/.label, answerKey)",
}


def resolve_tasks(spec: str | Iterable[str]) -> list[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    out: list[str] = []
    for n in names:
        if n == "paper":
            out.extend(PAPER_TASKS)
        elif n in PAPER_TASKS:
            out.append(n)
        else:
            raise MaskPruneError(f"unknown task {n!r}", expected=f"paper or any of {', '.join(PAPER_TASKS)}")
    return list(dict.fromkeys(out))


# ---- local files -> the hub rows lm-eval's tasks read ---------------------------------------------
def _read_jsonl(path: Path, task: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise MaskPruneError(
                        f"{task}: {path}:{i} is not valid JSON ({exc.msg})", expected=FORMATS[task]
                    ) from None
    return rows


def _labels(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _find(folder: Path, task: str, patterns: tuple[str, ...]) -> Path:
    for pat in patterns:
        hits = sorted(folder.glob(pat))
        if hits:
            return hits[0]
    raise MaskPruneError(
        f"{task}: no data file found",
        expected=f"{' or '.join(str(folder / p) for p in patterns)}; format: {FORMATS[task]}",
        fix="point --data-dir at a folder with one sub-folder per task",
    )


def _need(row: dict, keys: tuple[str, ...], task: str, where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise MaskPruneError(f"{task}: {where} lacks {missing}", expected=FORMATS[task], found=f"keys {sorted(row)}")


def _bool_label(v: Any, task: str, where: str) -> int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int) and v in (0, 1):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "0", "1", "yes", "no"):
        return int(v.strip().lower() in ("true", "1", "yes"))
    raise MaskPruneError(f"{task}: {where} has an answer that is not a boolean", expected=FORMATS[task], found=repr(v))


def _arc_rows(rows: list[dict], task: str, path: Path, obqa: bool) -> list[dict]:
    out = []
    for i, r in enumerate(rows, 1):
        where = f"{path.name} line {i}"
        _need(r, ("question", "answerKey"), task, where)
        q = r["question"]
        if not isinstance(q, dict) or "stem" not in q or "choices" not in q:
            raise MaskPruneError(f"{task}: {where}: question must hold stem and choices", expected=FORMATS[task])
        choices = {"text": [c["text"] for c in q["choices"]], "label": [str(c["label"]) for c in q["choices"]]}
        key = str(r["answerKey"]).strip()
        if key not in choices["label"]:
            raise MaskPruneError(
                f"{task}: {where}: answerKey {key!r} is not a choice label", found=str(choices["label"])
            )
        row = {"id": r.get("id", str(i)), "choices": choices, "answerKey": key}
        row["question_stem" if obqa else "question"] = q["stem"]
        out.append(row)
    return out


def load_local_rows(task: str, data_dir: str | Path) -> list[dict]:
    """Rows in the schema of the hub dataset that lm-eval's ``task`` reads (one branch per task's local file
    format, hence the length)."""
    folder = Path(data_dir) / task
    if task == "piqa":
        data = _find(folder, task, ("valid.jsonl", "dev.jsonl", "*.jsonl"))
        labels_file = data.with_name(data.stem + "-labels.lst")
        if not labels_file.is_file():
            raise MaskPruneError(f"piqa: labels file {labels_file} is missing", expected=FORMATS[task])
        rows, labels = _read_jsonl(data, task), _labels(labels_file)
        if len(rows) != len(labels):
            raise MaskPruneError(f"piqa: {len(rows)} questions but {len(labels)} labels", expected=FORMATS[task])
        for i, r in enumerate(rows, 1):
            _need(r, ("goal", "sol1", "sol2"), task, f"{data.name} line {i}")
        return [
            {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)} for r, lab in zip(rows, labels)
        ]
    if task == "hellaswag":
        data = _find(folder, task, ("hellaswag_val.jsonl", "*.jsonl"))
        rows = _read_jsonl(data, task)
        for i, r in enumerate(rows, 1):
            _need(r, ("ctx_a", "ctx_b", "activity_label", "endings", "label"), task, f"{data.name} line {i}")
        return [
            {
                "ctx_a": r["ctx_a"],
                "ctx_b": r["ctx_b"],
                "activity_label": r["activity_label"],
                "endings": list(r["endings"]),
                "label": str(r["label"]),
            }
            for r in rows
        ]
    if task == "boolq":
        data = _find(folder, task, ("val.jsonl", "dev.jsonl", "validation.jsonl", "*.jsonl"))
        out = []
        for i, r in enumerate(_read_jsonl(data, task), 1):
            where = f"{data.name} line {i}"
            _need(r, ("question", "passage"), task, where)
            if "label" not in r and "answer" not in r:
                raise MaskPruneError(f"boolq: {where} has neither label nor answer", expected=FORMATS[task])
            out.append(
                {
                    "question": r["question"],
                    "passage": r["passage"],
                    "idx": i - 1,
                    "label": _bool_label(r.get("label", r.get("answer")), task, where),
                }
            )
        return out
    if task == "winogrande":
        data = _find(folder, task, ("dev.jsonl", "*.jsonl"))
        rows = _read_jsonl(data, task)
        labels_file = data.with_name(data.stem + "-labels.lst")
        labels = _labels(labels_file) if labels_file.is_file() else None
        out = []
        for i, r in enumerate(rows, 1):
            _need(r, ("sentence", "option1", "option2"), task, f"{data.name} line {i}")
            ans = str(r.get("answer", "")).strip() or (labels[i - 1] if labels else "")
            if ans not in ("1", "2") or "_" not in r["sentence"]:
                raise MaskPruneError(
                    f"winogrande: {data.name} line {i} needs a '_' blank and answer '1' or '2'",
                    expected=FORMATS[task],
                    found=repr(ans),
                )
            out.append({"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": ans})
        return out
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        data = _find(folder, task, ("*.jsonl",))
        return _arc_rows(_read_jsonl(data, task), task, data, obqa=task == "openbookqa")
    raise MaskPruneError(f"unknown task {task!r}", expected=", ".join(PAPER_TASKS))


def _registered_config(task: str, manager) -> dict:
    """lm-eval's own config of ``task`` (its YAML, includes and ``!function`` entries resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm-eval's TaskManager uses

    entry = manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise MaskPruneError(f"lm-eval has no YAML task {task!r}", found=f"lm-eval's index entry {entry!r}")
    return dict(load_yaml(entry.yaml_path, resolve_func=True))


def _offline_spec(task: str, data_dir: str | Path, manager) -> dict:
    rows = load_local_rows(task, data_dir)
    if not rows:
        raise MaskPruneError(f"{task}: the data file holds no rows", expected=FORMATS[task])

    def custom_dataset(**_: Any):
        from datasets import Dataset, DatasetDict

        return DatasetDict({"validation": Dataset.from_list(rows)})

    # Same task (prompts, choices, metrics); only where its documents come from changes.
    cfg = _registered_config(task, manager)
    cfg.update(
        {
            "task": task,
            "custom_dataset": custom_dataset,
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
            "fewshot_split": None,
        }
    )
    return cfg


def check_sources(tasks: list[str], data_dir: str | Path | None) -> None:
    """Refuse, before any work, tasks whose data cannot be had: with ``data_dir``, a missing or malformed file;
    without it, a hub that cannot be reached (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, or no
    connection), where lm-eval would retry for minutes and then fail."""
    if not tasks:
        return
    if data_dir is not None:
        for t in tasks:
            load_local_rows(t, data_dir)
        return
    if not hub_reachable():
        raise MaskPruneError(
            f"zero-shot tasks {', '.join(tasks)} load their data from the Hugging Face Hub, which this machine "
            "cannot reach (offline)",
            fix="pass local task files with --data-dir (eval) or --eval-data-dir (prune); the layout is in "
            "maskprune.zeroshot (PIQA and ARC-e as the shared data ship them), or drop the tasks",
        )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub can be reached: not when told to stay offline, else one TCP connection."""
    import os
    import socket

    if any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def run_zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int | str = "auto",
    progress: bool = True,
) -> dict:
    """Evaluate ``tasks`` zero-shot with lm-eval on the in-memory model; a flat, protocol-rich dict."""
    try:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:  # pragma: no cover
        raise MaskPruneError("zero-shot evaluation needs lm-eval", fix="pip install 'maskprune[eval]'") from None
    manager = TaskManager()
    specs: list[Any] = [_offline_spec(t, data_dir, manager) if data_dir is not None else t for t in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if disk_weights(model) is not None:  # a placeholder's device is meta: the inputs go where the layers compute
        lm._device = home_device(model)
    start = time.perf_counter()
    res = simple_evaluate(
        model=lm,
        tasks=specs,
        num_fewshot=0,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,
        verbosity="WARNING",
    )
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "tasks": {},
        "seconds": seconds,
        "limit": limit,
        "data": str(data_dir) if data_dir is not None else "hub (lm-eval defaults)",
    }
    for t in tasks:
        r = res["results"].get(t, {})
        entry = {
            "version": res.get("versions", {}).get(t),
            "n": (res.get("n-samples", {}).get(t) or {}).get("effective"),
            "average_uses": AVERAGE_METRIC[t],
        }
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in r:
                entry[metric] = r[f"{metric},none"]
                entry[f"{metric}_stderr"] = r.get(f"{metric}_stderr,none")
        out["tasks"][t] = entry
    scores = [out["tasks"][t].get(AVERAGE_METRIC[t], out["tasks"][t].get("acc")) for t in tasks]
    out["average"] = sum(scores) / len(scores) if scores and None not in scores else None
    return out
