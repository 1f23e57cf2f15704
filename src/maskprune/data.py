"""Text -> token windows: calibration data for mask learning and the WikiText-2 evaluation text.

Sources: the copies shipped in ``maskprune/resources`` (``default``), local ``.txt`` / ``.jsonl`` /
``.json`` files (optionally ``.gz``) or a folder of them, or a hub dataset (online users).
"""

from __future__ import annotations

import gzip
import importlib.resources
import io
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import MaskPruneError

__all__ = ["iter_texts", "pack_windows", "calibration_windows", "wikitext2_test_text"]

log = logging.getLogger(__name__)

_SUFFIXES = (".txt", ".jsonl", ".json", ".raw")


def _resource(name: str) -> Path:
    return Path(str(importlib.resources.files("maskprune.resources").joinpath(name)))


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    kind = _base_suffix(path)
    with _open_text(path) as fh:
        if kind in (".jsonl", ".json"):
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MaskPruneError(
                        f"{path}:{lineno} is not valid JSON ({exc.msg})",
                        expected=f"one JSON object per line with a {text_field!r} field",
                    ) from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise MaskPruneError(
                        f"{path}:{lineno} has no string field {text_field!r}",
                        expected=f'lines like {{"{text_field}": "..."}}',
                        found=line[:80],
                    )
                yield row[text_field]
        else:  # plain text: paragraphs separated by blank lines are documents
            buf: list[str] = []
            for line in fh:
                if line.strip():
                    buf.append(line)
                elif buf:
                    yield "".join(buf)
                    buf = []
            if buf:
                yield "".join(buf)


def iter_texts(source: str, *, config: str | None = None, text_field: str = "text") -> Iterator[str]:
    """Documents from ``source``: ``default`` (shipped C4 sample), a file, a folder, or a hub id."""
    if source == "default":
        yield from _iter_file(_resource("c4-sample.jsonl.gz"), "text")
        return
    path = Path(source).expanduser()
    if path.is_file():
        if _base_suffix(path) not in _SUFFIXES:
            raise MaskPruneError(
                f"calibration file {source!r} has an unknown type",
                expected=f"one of {', '.join(_SUFFIXES)} (optionally .gz)",
            )
        yield from _iter_file(path, text_field)
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _base_suffix(p) in _SUFFIXES)
        if not files:
            raise MaskPruneError(
                f"calibration folder {source!r} holds no text files",
                expected=f"files ending in {', '.join(_SUFFIXES)} (optionally .gz)",
            )
        for f in files:
            yield from _iter_file(f, text_field)
        return
    if "/" in source and not source.startswith((".", "/", "~")) and not path.suffix:
        yield from _iter_hub(source, config, text_field)
        return
    raise MaskPruneError(
        f"calibration data {source!r} does not exist",
        expected="'default', a .txt/.jsonl/.json(.gz) file or folder, or a hub dataset id like allenai/c4",
        fix="check the --calib path",
    )


def _iter_hub(name: str, config: str | None, text_field: str) -> Iterator[str]:  # pragma: no cover
    from datasets import load_dataset  # online users only

    if name == "allenai/c4" and config is None:
        config = "en"
    ds = load_dataset(name, config, split="train", streaming=True)
    for row in ds:
        yield row[text_field]


def pack_windows(texts: Iterable[str], tokenizer, *, seq_len: int, num_windows: int) -> torch.Tensor:
    """Tokenize documents, join them with EOS, and cut ``num_windows`` windows of ``seq_len``.

    Returns ``[n, seq_len]`` (long), ``n <= num_windows``. Raises if not even one window fits.
    """
    eos = tokenizer.eos_token_id
    need = seq_len * num_windows
    ids: list[int] = []
    docs = 0
    for text in texts:
        if not text.strip():
            continue
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        docs += 1
        if len(ids) >= need:
            break
    n = min(num_windows, len(ids) // seq_len)
    if n == 0:
        raise MaskPruneError(
            "calibration data is empty or shorter than one window",
            expected=f"at least {seq_len} tokens (one window of seq_len)",
            found=f"{len(ids)} tokens in {docs} documents",
            fix="give more text with --calib or a smaller --seq-len",
        )
    if n < num_windows:
        log.warning(
            "calibration data gave %d windows of %d tokens, fewer than the %d asked for", n, seq_len, num_windows
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # [n, seq_len]


def calibration_windows(
    source: str, tokenizer, *, seq_len: int, num_windows: int, config: str | None = None
) -> torch.Tensor:
    return pack_windows(iter_texts(source, config=config), tokenizer, seq_len=seq_len, num_windows=num_windows)


def wikitext2_test_text(source: str = "default") -> str:
    """WikiText-2 raw test as the HF ``wikitext-2-raw-v1`` loader gives it, rows joined by "\\n\\n".

    ``default``: the shipped copy; a path: a local ``wiki.test.raw``; ``hub``: the hub dataset.
    """
    if source == "hub":  # pragma: no cover - needs the network
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "\n\n".join(rows)
    path = _resource("wikitext-2-raw-test.raw.gz") if source == "default" else Path(source).expanduser()
    if not path.is_file():
        raise MaskPruneError(
            f"WikiText-2 file {source!r} does not exist", expected="'default', 'hub', or the path of wiki.test.raw"
        )
    with _open_text(path) as fh:
        # Each line keeps its newline; a line of only white space becomes "" (the HF loader's rows).
        rows = [line if line.strip() else "" for line in fh]
    return "\n\n".join(rows)
