"""Command line: parses arguments and calls the library; nothing else.

maskprune prune [MODEL] [--sparsity 0.5] [--out DIR] [--config run.yaml] [--steps N] ...
maskprune eval MODEL [--seq-len 2048,128] [--limit N] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from .config import (
    DISTILL_ONLY,
    GROUP_OF,
    GROUPS,
    PRUNE_ONLY,
    distill_overrides,
    is_switch,
    load_config,
    prune_overrides,
)
from .errors import Interrupted, MaskPruneError
from .llamacpp import GGUF_TYPES
from .version import __version__

__all__ = ["main", "build_parser"]

log = logging.getLogger("maskprune")


_GROUP_TITLES = {
    "source": "model",
    "cut": "what to cut and how much",
    "selection": "how the learned selection is made (the paper's masks; advanced)",
    "training": "distillation and LoRA",
    "data": "calibration data",
    "runtime": "runtime",
    "evaluation": "evaluation",
    "output": "output",
}
_ESSENTIAL = {
    "prune": ("sparsity", "budget_params", "out", "method", "steps", "recover_steps"),
    "distill": ("teacher", "out", "steps", "full"),
    "sweep": ("method", "steps", "minutes"),
}
"""The options ``--help`` lists first, in this order; the rest follow in one section per config group."""
_GROUP_ORDER = ("cut", "training", "data", "runtime", "evaluation", "output", "source", "selection")


def _add_config_flags(p: argparse.ArgumentParser, command: str, exclude: frozenset[str]) -> None:
    """One flag per config key except ``model`` and ``exclude`` (what the command does not take): the essential
    ones first, then one help section per config group; a field's help is its metadata."""
    fields = {
        f.name: (f, typing.get_type_hints(cls)[f.name], g) for g, cls in GROUPS.items() for f in dataclasses.fields(cls)
    }
    essential = p.add_argument_group("essential options")
    for name in _ESSENTIAL[command]:
        f, hint, _ = fields[name]
        _add_flag(essential, f, hint, required=name == "teacher")
    for group in _GROUP_ORDER:
        section = p.add_argument_group(_GROUP_TITLES[group], _plain(GROUPS[group].__doc__))
        for name, (f, hint, g) in fields.items():
            if g == group and name != "model" and name not in exclude and name not in _ESSENTIAL[command]:
                _add_flag(section, f, hint)


def _plain(text: str) -> str:
    """Help text as a terminal shows it: RST literals (``x``) as `x`, no doubled spaces."""
    return " ".join(text.replace("``", "`").split())


def _default_text(value: Any) -> str:
    """A default as the user would type it: null, true/false, a,b,c for lists."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value) if value else "none"
    return str(value)


def _add_flag(section, f: dataclasses.Field, hint: Any, *, required: bool = False) -> None:
    flag = "--" + f.name.replace("_", "-")
    text = _plain(f.metadata.get("help", ""))
    if required:
        text += " (required)"
    elif "default" not in text.lower() or f.default is not None:
        text += f" (default: {_default_text(f.default)})"
    help_ = text.replace("%", "%%")
    if is_switch(hint):
        section.add_argument(
            flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
        )
    else:
        section.add_argument(
            flag, dest=f.name, type=_parse_value, default=argparse.SUPPRESS, metavar=_metavar(hint), help=help_
        )


def _metavar(hint: Any) -> str:
    """What a flag takes, for --help: the allowed words of a Literal ({a,b,c}), else its type (INT, FLOAT,
    TEXT, A,B,..., with |null where None is allowed)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    nullable = len(args) < len(typing.get_args(hint))
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    if typing.get_origin(base) is Literal:
        text = "{" + ",".join(map(str, typing.get_args(base))) + "}"
    elif typing.get_origin(base) is tuple:
        text = "A,B,..."
    else:
        text = {int: "INT", float: "FLOAT", str: "TEXT"}.get(base, "VALUE")
    return text + ("|null" if nullable else "")


def _parse_value(text: str) -> Any:
    """Flags arrive as text; numbers become numbers so the config's type check can judge them."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() == "null":  # as in YAML: "none" stays a word (e.g. --eval-data none)
        return None
    return text


_DESCRIPTION = """Structured pruning of decoder LLMs into smaller stock checkpoints (every layer the same shape).

  maskprune prune                      prune the embedded SmolLM2-135M by 20 % into runs/smollm2-135m-s20
  maskprune prune MODEL --sparsity 0.5 --out DIR
  maskprune eval --compare DENSE PRUNED --seq-len 2048
  maskprune COMMAND --help             the options of a command"""


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one (not ``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default == [] or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per job; options are never abbreviated (a misspelt one is refused
    with the closest real one named); ``-q`` / ``-v`` work before or after the subcommand."""
    parser = argparse.ArgumentParser(
        prog="maskprune",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"maskprune {__version__}")
    _add_verbosity(parser, False)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{prune,sweep,plan,distill,eval,export-gguf,report}"
    )
    _add_prune_parser(sub)
    _add_sweep_parser(sub)
    _add_plan_parser(sub)
    _add_distill_parser(sub)
    _add_eval_parser(sub)
    _add_gguf_parser(sub)
    r = _subparser(sub, "report", "figures and an HTML page for a finished run", "maskprune report RUN_DIR")
    r.add_argument("run_dir", type=Path, help="the --out folder of `maskprune prune` or `maskprune distill`")
    return parser


def _add_verbosity(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings only, no progress bars")


def _subparser(sub, name: str, help_: str, usage: str, description: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, usage=usage, description=description or help_, allow_abbrev=False)
    _add_verbosity(p, argparse.SUPPRESS)  # after the verb too; unset here leaves the top-level value
    return p


def _add_run_parser(sub, command: str, help_: str, usage: str, model_help: str, description: str | None = None):
    """``prune`` or ``distill``: the model, a config file, --print-config, and the config's flags the command
    takes."""
    p = _subparser(sub, command, help_, usage, description)
    p.add_argument("model", nargs="?" if command == "prune" else None, default=None, help=model_help)
    p.add_argument("--config", type=Path, default=None, help="YAML file of config keys (flat, or under their group)")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration as YAML (by group) and exit"
    )
    _add_config_flags(p, command, DISTILL_ONLY if command == "prune" else PRUNE_ONLY)


def _add_prune_parser(sub) -> None:
    _add_run_parser(
        sub,
        "prune",
        "prune a model to a budget and export a smaller stock checkpoint",
        "maskprune prune [MODEL] [--sparsity S | --budget-params N] [--out DIR] [options]",
        "HF folder, hub id, .gguf file, or smollm2-135m (default)",
    )


_SWEEP_OWN = frozenset({"sparsity", "budget_params", "out", "overwrite", "shared_cache"})
"""Config keys a sweep sets itself (the sizes, their folders, the shared store)."""


def _add_sweep_parser(sub) -> None:
    p = _subparser(
        sub,
        "sweep",
        "prune to several sizes at once and draw the size/quality curve (one stock checkpoint per size)",
        "maskprune sweep [MODEL] [--sparsity 0.1,0.2,... | --budget-params N,N | --params 100M,80M] [--out DIR] "
        "[--max-ppl-ratio R] [--min-accuracy-share S] [--max-params N] [--max-gguf-bytes N] [prune's options]",
        "maskprune sweep MODEL --sparsity 0.1,0.2,0.3,0.4,0.5: one `maskprune prune` per size (same recipe and "
        "options; --steps or --minutes per size) into OUT/<size>, sharing what does not depend on the size (the "
        "dense evaluations, the shape search's dense facts, a cached top-k teacher). Every size and the dense model "
        "are measured on WikiText-2 at --table-seq-len and the zero-shot --tasks; OUT/sweep.json, sweep.md, "
        "sweep.png and index.html give the table and the figure. A target (--max-ppl-ratio, --min-accuracy-share, "
        "--max-params, --max-gguf-bytes) picks the smallest size that meets it. Exit status 0: done (and a size "
        "meets the target, where one is given); 1: no size meets it; 2: bad input. --resume continues a sweep "
        "that was cut off: finished sizes are kept.",
    )
    p.add_argument("model", nargs="?", default=None, help="HF folder, hub id, .gguf file, or smollm2-135m (default)")
    p.add_argument("--config", type=Path, default=None, help="YAML file of config keys (flat, or under their group)")
    sizes = p.add_argument_group("the sizes (one list; default --sparsity 0.1,0.2,0.3,0.4,0.5)")
    sizes.add_argument("--sparsity", default=None, metavar="LIST", help="comma-separated sparsities, e.g. 0.1,0.3,0.5")
    sizes.add_argument("--budget-params", default=None, metavar="LIST", help="comma-separated parameter budgets")
    sizes.add_argument("--params", default=None, metavar="LIST", help="parameter counts with units, e.g. 100M,80M")
    sizes.add_argument("--out", type=Path, default=None, help="the sweep's folder (default: runs/<model>-sweep)")
    table = p.add_argument_group("the table every size is measured on")
    table.add_argument("--table-seq-len", type=int, default=2048, help="WikiText-2 window length (default 2048)")
    table.add_argument(
        "--tasks", default="piqa,arc_easy", help="zero-shot lm-eval tasks, comma-separated ('' for none)"
    )
    table.add_argument("--data-dir", default=None, help="local task data (offline); see `maskprune eval`")
    table.add_argument("--limit", type=int, default=None, help="only the first N windows and N examples per task")
    table.add_argument(
        "--ppl-tokens",
        type=int,
        default=None,
        metavar="N",
        help="score only the first N tokens of WikiText-2 (the same for every size; the tasks stay whole)",
    )
    target = p.add_argument_group("the target: the smallest size that meets every bound given is chosen")
    target.add_argument("--max-ppl-ratio", type=float, default=None, help="perplexity at most R times the dense one")
    target.add_argument(
        "--min-accuracy-share", type=float, default=None, help="mean accuracy at least S times the dense one"
    )
    target.add_argument("--max-params", default=None, metavar="N", help="at most N parameters (e.g. 100M)")
    target.add_argument("--max-gguf-bytes", default=None, metavar="N", help="a GGUF of at most N bytes (needs --gguf)")
    _add_config_flags(p, "sweep", DISTILL_ONLY | _SWEEP_OWN)


def _add_plan_parser(sub) -> None:
    p = _subparser(
        sub,
        "plan",
        "say before a run whether it fits: peak memory, FLOPs and minutes of each phase, from the config alone",
        "maskprune plan [MODEL] [--sparsity S] [--device cuda] [--max-memory 80GB] [--json] [prune's options]",
        "maskprune plan MODEL [prune's options]: reads the model's config only (config.json, a GGUF header, or a "
        "hub id where the hub is reachable), builds the model on PyTorch's meta device (no weight is read), and "
        "prints for each phase of `maskprune prune` with the same options its peak memory, FLOPs and time at a "
        "matmul rate measured on this machine, and what to switch on where it does not fit. Exit status 0: it "
        "fits in --max-memory (default: the memory free now); 1: it does not.",
    )
    p.add_argument("model", nargs="?", default=None, help="HF folder, hub id, .gguf file, or smollm2-135m (default)")
    p.add_argument("--config", type=Path, default=None, help="YAML file of config keys (flat, or under their group)")
    p.add_argument("--json", action="store_true", help='print {"fits", "phases", "advice", ...} as JSON')
    _add_config_flags(p, "prune", DISTILL_ONLY)


def _add_distill_parser(sub) -> None:
    _add_run_parser(
        sub,
        "distill",
        "recover a pruned model by distillation from its dense original (LoRA merged, or --full)",
        "maskprune distill PRUNED --teacher DENSE [--out DIR] [--steps N] [options]",
        "the pruned student: HF folder, hub id or .gguf file",
        "maskprune distill PRUNED --teacher DENSE --out DIR: the prune options apply where they mean "
        "the same thing (--steps, --calib, --calib-samples, --seq-len, --batch-size, --lora-rank, ...); the "
        "options that choose the cut (--sparsity, --method, masks, ...) are prune's: the student keeps its shape. "
        "A --config file shared with prune may hold them: they are ignored with a warning.",
    )


def _add_eval_parser(sub) -> None:
    e = _subparser(
        sub,
        "eval",
        "WikiText-2 perplexity and zero-shot accuracy (lm-eval) of causal LMs",
        "maskprune eval MODEL [MODEL ...] | --compare DENSE PRUNED [options]",
    )
    e.formatter_class = _DefaultsFormatter
    e.add_argument("model", nargs="*", help="HF folder, hub id, .gguf file, or smollm2-135m")
    e.add_argument(
        "--compare",
        nargs=2,
        metavar=("DENSE", "PRUNED"),
        default=None,
        help="evaluate two models side by side with the share of dense retained",
    )
    e.add_argument("--ppl", choices=["wikitext2", "none"], default="wikitext2", help="perplexity data, or none")
    e.add_argument(
        "--ppl-data", default="default", help="WikiText-2 raw test: default (shipped), hub, or a wiki.test.raw path"
    )
    e.add_argument("--seq-len", default="2048,128", help="comma-separated window lengths")
    e.add_argument("--tasks", default="", help="comma-separated lm-eval tasks, or 'paper' for all seven")
    e.add_argument("--data-dir", default=None, help="local task data (offline); see maskprune.zeroshot")
    e.add_argument(
        "--limit", type=int, default=None, help="only the first N perplexity windows and N examples per task"
    )
    e.add_argument(
        "--ppl-tokens",
        type=int,
        default=None,
        help="score only the first N tokens of WikiText-2 at every window length (overrides --limit for perplexity)",
    )
    e.add_argument("--batch-size", type=int, default=4, help="windows or examples per forward")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype of the forwards")
    e.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    e.add_argument("--out", type=Path, default=None, help="write results JSON here (and a .md table beside it)")
    e.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")


def _add_gguf_parser(sub) -> None:
    g = _subparser(
        sub,
        "export-gguf",
        "a GGUF file of a pruned checkpoint, written by llama.cpp's own converter",
        "maskprune export-gguf FOLDER [--type TYPE] [--out FILE]",
    )
    g.add_argument("folder", type=Path, help="the --out folder of `maskprune prune` (or any supported checkpoint)")
    g.add_argument(
        "--type",
        dest="gguf_type",
        default="f16",
        choices=GGUF_TYPES,
        metavar="{" + ",".join(GGUF_TYPES) + "}",
        help="GGUF tensor type (default: f16); f32/f16/bf16/q8_0 by llama.cpp's converter, the others by its "
        "quantizer, which needs the extra maskprune[llamacpp]",
    )
    g.add_argument("--out", type=Path, default=None, help="the .gguf path (default: inside the folder)")
    g.add_argument("--overwrite", action="store_true", help="replace the .gguf file if it exists")
    g.add_argument(
        "--no-check", dest="check", action="store_false", help="skip reloading the GGUF and comparing its logits"
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {name: getattr(args, name) for name in GROUP_OF if name != "model" and hasattr(args, name)}
    if args.model is not None:
        overrides["model"] = args.model
    return overrides


def parse_prune_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """The config keys that ``maskprune prune ARGV`` sets explicitly (for scripts that build a config)."""
    return _overrides(build_parser().parse_args(["prune", *argv]))


def _other_commands_options(command: str, unknown: Sequence[str]) -> MaskPruneError | None:
    """The error for flags that belong to the other of prune / distill (None when ``unknown`` holds others)."""
    names = {u[2:].split("=")[0].replace("-", "_").removeprefix("no_") for u in unknown if u.startswith("--")}
    if command == "distill" and names & PRUNE_ONLY:
        try:
            distill_overrides(dict.fromkeys(names & PRUNE_ONLY))
        except MaskPruneError as exc:
            return exc
    if command == "prune" and names & DISTILL_ONLY:
        try:
            prune_overrides(dict.fromkeys(names & DISTILL_ONLY))
        except MaskPruneError as exc:
            return exc
    return None


def _run_prune(args: argparse.Namespace, progress: bool) -> int:
    from .recipes import run as prune

    overrides = _overrides(args)
    if args.command == "distill":
        if overrides.get("teacher") is None:
            raise MaskPruneError(
                "distill needs a teacher", fix="pass --teacher DENSE (the model the student was pruned from)"
            )
        cfg = load_config(args.config, distill_overrides(overrides), ignore=PRUNE_ONLY)
    else:
        cfg = load_config(args.config, overrides, ignore=DISTILL_ONLY)
    if args.print_config:
        other = PRUNE_ONLY if args.command == "distill" else DISTILL_ONLY  # what this command does not take
        groups = {g: {k: v for k, v in d.items() if k not in other} for g, d in cfg.to_groups().items()}
        sys.stdout.write(yaml.safe_dump({g: d for g, d in groups.items() if d}, sort_keys=False))
        return 0
    report = prune(cfg, progress=progress)
    if "params" not in report:  # a secondary process of a distributed run: rank 0 reports
        return 0
    p = report["params"]
    ppl = report["perplexity"]
    summary = {
        "out": report["out"],
        "params_dense": p["dense"],
        "params_exported": p["exported"],
        "sparsity": round(p["sparsity"], 4),
        "shape": {
            k: report["shape"][k]
            for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim")
        },
        "ppl": {k: (v["ppl"] if v else None) for k, v in ppl.items() if k != "protocol"},
    }
    sys.stdout.write(json.dumps(summary, indent=1) + "\n")
    return 0


def _run_sweep(args: argparse.Namespace, progress: bool) -> int:
    from .memory import parse_bytes
    from .sweeps import TableProtocol, Target, parse_count, run_sweep, sizes_from

    overrides = {k: v for k, v in _overrides(args).items() if k not in _SWEEP_OWN}
    cfg = load_config(args.config, overrides, ignore=DISTILL_ONLY | _SWEEP_OWN)
    sizes = sizes_from(args.sparsity, args.budget_params, args.params)
    try:
        target = Target(
            max_ppl_ratio=args.max_ppl_ratio,
            min_accuracy_share=args.min_accuracy_share,
            max_params=parse_count(args.max_params) if args.max_params is not None else None,
            max_gguf_bytes=parse_bytes(args.max_gguf_bytes) if args.max_gguf_bytes is not None else None,
        )
    except ValueError as exc:
        raise MaskPruneError(f"the target: {exc}") from None
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise MaskPruneError(f"--data-dir {args.data_dir!r} is not a folder")
    tasks = tuple(t.strip() for t in (args.tasks or "").split(",") if t.strip())
    table = TableProtocol(
        seq_len=args.table_seq_len, tasks=tasks, data_dir=args.data_dir, limit=args.limit, ppl_tokens=args.ppl_tokens
    )
    out = args.out or Path("runs") / f"{Path(cfg.model).stem or 'model'}-sweep"
    record = run_sweep(cfg, sizes, out, table=table, target=target, progress=progress)
    sys.stdout.write((Path(out) / "sweep.md").read_text())
    sys.stdout.write(f"wrote {out}/ (sweep.json, sweep.md, sweep.png, index.html)\n")
    return 1 if target.given() and record["chosen"] is None else 0


def _run_plan(args: argparse.Namespace) -> int:
    from .stages.plan import plan_for

    plan = plan_for(load_config(args.config, _overrides(args), ignore=DISTILL_ONLY))
    sys.stdout.write((json.dumps(plan.to_dict(), indent=1) if args.json else plan.table()) + "\n")
    return 0 if plan.fits else 1


def _run_eval(args: argparse.Namespace, progress: bool) -> int:
    from .evaluate import evaluate_models

    try:
        seq_lens = [int(s) for s in str(args.seq_len).split(",") if s.strip()] if args.ppl != "none" else []
    except ValueError:
        raise MaskPruneError(
            f"--seq-len {args.seq_len!r} is not a list of integers", expected="e.g. 2048,128"
        ) from None
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise MaskPruneError(f"--data-dir {args.data_dir!r} is not a folder")
    results = evaluate_models(
        list(args.compare) if args.compare else list(args.model),
        compare=bool(args.compare),
        seq_lens=seq_lens,
        ppl_data=args.ppl_data,
        ppl_tokens=args.ppl_tokens,
        tasks=[t for t in (args.tasks or "").split(",") if t.strip()],
        data_dir=args.data_dir,
        limit=args.limit,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        progress=progress,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(results["table"] + "\n")
    sys.stdout.write(results["table"] + "\n")
    return 0


def _run_export_gguf(args: argparse.Namespace) -> int:
    from .gguf_export import check_logits, export_gguf

    path = export_gguf(args.folder, args.out, gguf_type=args.gguf_type, overwrite=args.overwrite)
    result: dict[str, Any] = {"gguf": str(path), "type": args.gguf_type, "bytes": path.stat().st_size}
    if args.check:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.folder)
        ids = tok("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
        diff, ref = check_logits(args.folder, path, ids)
        result["logits_vs_checkpoint"] = {"max_abs_diff": diff, "max_abs_logit": ref}
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 0


def _unknown_option_error(parser: argparse.ArgumentParser, command: str, unknown: Sequence[str]) -> str:
    """The message for options the command does not know: each with the closest real option (a misspelling
    or an abbreviation), or the command's help."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    known = [o for action in sub._actions for o in action.option_strings if o.startswith("--")]
    parts = []
    for u in unknown:
        if not u.startswith("-"):
            continue
        flag = u.split("=")[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        prefixed = [k for k in known if k.startswith(flag)]
        guess = close[0] if close else (prefixed[0] if len(prefixed) == 1 else None)
        parts.append(f"{flag} (did you mean {guess}?)" if guess else flag)
    what = ", ".join(parts) or " ".join(unknown)
    plural = "s" if len(parts) > 1 else ""
    return f"unknown option{plural} for `maskprune {command}`: {what}; fix: see `maskprune {command} --help`"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        problem = _other_commands_options(args.command, unknown)
        sys.stderr.write(f"maskprune: error: {problem or _unknown_option_error(parser, args.command, unknown)}\n")
        return 2
    _configure_logging(args.verbose, args.quiet)
    progress = not args.quiet
    try:
        if args.command in ("prune", "distill"):
            return _run_prune(args, progress)
        if args.command == "plan":
            return _run_plan(args)
        if args.command == "sweep":
            return _run_sweep(args, progress)
        if args.command == "export-gguf":
            return _run_export_gguf(args)
        if args.command == "report":
            from .report import make_report

            sys.stdout.write(f"{make_report(args.run_dir)}\n")
            return 0
        return _run_eval(args, progress)
    except MaskPruneError as exc:
        sys.stderr.write(f"maskprune: error: {exc}\n")
        return 2
    except Interrupted as exc:
        sys.stderr.write(
            f"maskprune: interrupted at step {exc.step}; a checkpoint was written. Run the same "
            "command with --resume to continue.\n"
        )
        return 130
    except KeyboardInterrupt:
        sys.stderr.write("maskprune: interrupted\n")
        return 130


def _configure_logging(verbose: bool, quiet: bool) -> None:
    """maskprune's log lines at the level asked; the libraries' chatter (HTTP, file locks, matplotlib's font
    search, transformers' progress bars and deprecation notes) only with -v."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*is deprecated.*")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
