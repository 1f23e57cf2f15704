"""The sweep's pure parts: its sizes from the command line, the target's bounds and the choice they make, the table."""

from __future__ import annotations

import pytest

from maskprune.errors import MaskPruneError
from maskprune.sweepreport import markdown_table
from maskprune.sweeps import Size, TableProtocol, Target, parse_count, pick, sizes_from, table_row


def test_sizes_from_each_list_and_the_default():
    assert [s.sparsity for s in sizes_from()] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert sizes_from("0.25, 0.5") == [Size("sparsity-0.25", sparsity=0.25), Size("sparsity-0.50", sparsity=0.5)]
    assert sizes_from(params="100M,1.5B,800k") == [
        Size("params-100M", budget_params=100_000_000),
        Size("params-1.5B", budget_params=1_500_000_000),
        Size("params-800k", budget_params=800_000),
    ]
    assert [s.budget_params for s in sizes_from(budget_params="120000,90000")] == [120000, 90000]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"sparsity": "0.2", "params": "100M"}, "one list"),
        ({"sparsity": "0.2,1.5"}, "to remove, in"),
        ({"sparsity": "0.2,0.2"}, "repeats"),
        ({"sparsity": " , "}, "no size"),
        ({"params": "lots"}, "parameter count"),
        ({"budget_params": "-5"}, "positive"),
    ],
)
def test_bad_sizes_are_refused_with_what_to_change(kwargs, words):
    with pytest.raises(MaskPruneError, match=words):
        sizes_from(**kwargs)


def test_parse_count():
    assert parse_count("135000000") == 135_000_000 and parse_count("0.5B") == 500_000_000
    with pytest.raises(ValueError):
        parse_count("12 parameters")


DENSE = {"label": "dense", "params": 1000, "ppl_2048": 20.0, "accuracy_mean": 0.60}


def _rows():
    return [
        {"label": "a", "params": 900, "ppl_2048": 24.0, "accuracy_mean": 0.59, "gguf_bytes": 500},
        {"label": "b", "params": 700, "ppl_2048": 29.0, "accuracy_mean": 0.575, "gguf_bytes": 400},
        {"label": "c", "params": 500, "ppl_2048": 60.0, "accuracy_mean": 0.50, "gguf_bytes": 300},
    ]


def test_the_smallest_size_that_meets_every_bound_is_chosen():
    rows = _rows()
    assert pick(rows, DENSE, Target(max_ppl_ratio=1.5), 2048) == "b"
    assert [r["meets"] for r in rows] == [True, True, False] and "ppl@2048 60.00 > 30.00" in rows[2]["misses"][0]
    assert pick(_rows(), DENSE, Target(max_ppl_ratio=1.5, min_accuracy_share=0.98), 2048) == "a"  # b: 0.575 < 0.588
    assert pick(_rows(), DENSE, Target(max_params=600), 2048) == "c"
    assert pick(_rows(), DENSE, Target(max_gguf_bytes=450, max_ppl_ratio=1.2), 2048) is None  # b too large... a too
    assert pick(_rows(), DENSE, Target(), 2048) is None  # no target: nothing chosen, nothing marked
    rows = _rows()
    pick(rows, DENSE, Target(), 2048)
    assert not any(r["meets"] for r in rows)


def test_a_target_that_cannot_be_measured_says_why():
    t = Target(min_accuracy_share=0.95, max_gguf_bytes=10**9)
    problems = t.problems(TableProtocol(tasks=()), gguf=None)
    assert any("--tasks" in p for p in problems) and any("--gguf" in p for p in problems)
    assert Target(max_ppl_ratio=1.5).problems(TableProtocol(), gguf=None) == []


def test_table_row_reads_the_evaluation_and_the_markdown_marks_the_choice():
    evaluation = {
        "params": 900,
        "perplexity": {"2048": {"ppl": 24.0}},
        "zeroshot": {
            "tasks": {"piqa": {"acc": 0.7, "average_uses": "acc"}, "arc_easy": {"acc": 0.5, "average_uses": "acc"}}
        },
    }
    row = table_row("a", evaluation, 2048, ("piqa", "arc_easy"))
    assert row["ppl_2048"] == 24.0 and row["piqa_acc"] == 0.7 and row["accuracy_mean"] == pytest.approx(0.6)
    row.update(sparsity=0.1, minutes=3.0)
    record = {
        "table_protocol": TableProtocol().settings(),
        "dense": DENSE | {"piqa_acc": 0.7, "arc_easy_acc": 0.5},
        "sizes": [row],
        "target": {"max_ppl_ratio": 1.5},
        "chosen": "a",
    }
    pick(record["sizes"], DENSE, Target(max_ppl_ratio=1.5), 2048)
    text = markdown_table(record)
    assert "| a | 900 | 10.0% | 24.00 | 70.00 | 50.00 | 60.00 | 3.0 | chosen |" in text
    assert text.splitlines()[2].startswith("| dense | 1k | 0.0% | 20.00 |") and "Chosen: **a**" in text
