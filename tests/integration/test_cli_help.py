"""What a newcomer meets first: the help, misspelt options and values, the version, the printed config."""

from __future__ import annotations

import pytest
import yaml

from maskprune.cli import main


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("flag", ["--spars", "--sparsty", "--sparsit"])
def test_misspelt_or_abbreviated_options_are_refused_naming_the_real_one(flag, capsys):
    code, out, err = _run(["prune", flag, "0.4", "--print-config"], capsys)
    assert code == 2 and out == ""
    assert "did you mean --sparsity?" in err and "Traceback" not in err
    assert err.count("error") == 1  # said once, not as a log line and again


def test_a_misspelt_value_names_the_closest_choice(capsys):
    code, _, err = _run(["prune", "--method", "wanda", "--print-config"], capsys)
    assert code == 2 and "did you mean 'wanda-sp'?" in err


def test_quiet_and_verbose_work_after_the_verb(capsys):
    code, out, _ = _run(["prune", "-q", "--print-config"], capsys)
    assert code == 0 and yaml.safe_load(out)["cut"]["sparsity"] == 0.2


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from maskprune import __version__

    assert capsys.readouterr().out.strip() == f"maskprune {__version__}"


def test_print_config_is_the_resolved_config_by_group_and_loads_back(tmp_path, capsys):
    code, out, _ = _run(["prune", "--sparsity", "0.5", "--method", "flap", "--print-config"], capsys)
    assert code == 0
    groups = yaml.safe_load(out)
    assert groups["cut"]["sparsity"] == 0.5 and groups["cut"]["method"] == "flap" and "teacher" not in groups["source"]
    f = tmp_path / "printed.yaml"
    f.write_text(out)
    code, again, _ = _run(["prune", "--config", str(f), "--print-config"], capsys)
    assert code == 0 and again == out  # what it prints is a config file that reproduces it
    code, out, _ = _run(["distill", "student", "--teacher", "dense", "--print-config"], capsys)
    assert code == 0 and "sparsity" not in out and "teacher: dense" in out


def test_prune_help_shows_the_essential_options_first_then_the_groups(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    sections = ["essential options:", "what to cut and how much:", "distillation and LoRA:", "calibration data:"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    essential = text[text.index("essential options:") : text.index("what to cut and how much:")]
    for flag in ("--sparsity", "--budget-params", "--out", "--method", "--steps"):
        assert flag in essential
    assert "``" not in text and "('q'" not in text  # no RST markup, no Python tuples
    assert "(default: q,k,v,o,gate,up,down)" in " ".join(text.split())


def test_distill_help_says_the_teacher_is_required(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert "(required)" in " ".join(capsys.readouterr().out.split())


def test_eval_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 2048,128)" in text and "(default: fp32)" in text
