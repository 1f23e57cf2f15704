"""GGUF out: a pruned checkpoint converted by llama.cpp's own converter (``convert_hf_to_gguf.py``).

The llama.cpp sources ship inside the llama-cpp-python source distribution; maskprune pins one version
(:data:`LLAMA_CPP_PYTHON`), fetches that sdist once from the package index with pip, unpacks the converter
and its ``gguf-py`` into the cache, and runs it as a subprocess on the exported folder. The types the Python
converter writes itself need nothing else (f32, f16, bf16, q8_0); the other quantized types (q4_k_m, ...) are
written by llama.cpp's compiled quantizer from an f16 conversion, through llama-cpp-python of the same version
(the optional extra ``maskprune[llamacpp]``, :mod:`maskprune.llamacpp`), and refused with that said where it is
not installed. The output is written under a temporary name and renamed when every step succeeded; the f16
file can be checked against the HF export's logits with :func:`check_logits`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from . import llamacpp
from .errors import MaskPruneError
from .llamacpp import CONVERTER_TYPES, GGUF_TYPES, LLAMA_CPP_PYTHON, QUANT_TYPES

log = logging.getLogger(__name__)

__all__ = ["LLAMA_CPP_PYTHON", "CONVERTER_TYPES", "GGUF_TYPES", "converter_dir", "export_gguf", "check_logits"]


def converter_dir(cache: Path | None = None) -> Path:
    """The unpacked llama.cpp converter (``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``), fetched
    once. ``MASKPRUNE_LLAMA_CPP`` may name an existing llama.cpp checkout instead."""
    require_converter_modules()
    env = os.environ.get("MASKPRUNE_LLAMA_CPP")
    if env:
        path = Path(env)
        if not (path / "convert_hf_to_gguf.py").is_file():
            raise MaskPruneError(
                f"MASKPRUNE_LLAMA_CPP={env!r} holds no convert_hf_to_gguf.py", fix="point it at a llama.cpp checkout"
            )
        return path
    from .cache import build_once, cache_dir

    target = (cache or cache_dir()) / f"llama.cpp-{LLAMA_CPP_PYTHON}"

    def fetch(staged: Path) -> None:
        log.info(
            "fetching llama.cpp's converter once (the llama-cpp-python==%s source distribution, about a minute); "
            "cached in %s",
            LLAMA_CPP_PYTHON,
            target,
        )
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp]
            r = subprocess.run(cmd + [f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], capture_output=True, text=True)
            sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if r.returncode != 0 or not sdists:
                raise MaskPruneError(
                    f"cannot fetch llama.cpp's converter (llama-cpp-python=={LLAMA_CPP_PYTHON} source distribution)",
                    found=(r.stderr.strip().splitlines() or ["no file"])[-1],
                    fix="connect to the package index once, or set MASKPRUNE_LLAMA_CPP to a llama.cpp checkout",
                )
            prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
            keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
            with tarfile.open(sdists[0]) as tar:
                for m in tar.getmembers():
                    rel = m.name[len(prefix) :]
                    if m.name.startswith(prefix) and rel.startswith(keep) and (m.isfile() or m.isdir()):
                        m.name = rel
                        tar.extract(m, staged, filter="data")

    return build_once(target, lambda t: (t / "convert_hf_to_gguf.py").is_file(), fetch)


CONVERTER_MODULES = {"sentencepiece": "maskprune[gguf]", "gguf": "maskprune", "numpy": "maskprune"}
"""What llama.cpp's converter imports besides torch and transformers, and the extra that installs it."""


def require_converter_modules() -> None:
    """Refuse, before fetching or converting anything, an environment the converter would fail in."""
    import importlib.util

    missing = {m: extra for m, extra in CONVERTER_MODULES.items() if importlib.util.find_spec(m) is None}
    if missing:
        raise MaskPruneError(
            f"llama.cpp's converter needs {', '.join(missing)}, which is not installed",
            fix=f"pip install '{sorted(set(missing.values()))[-1]}' (the `gguf` extra), then run again",
        )


def preflight(gguf_type: str) -> None:
    """Everything ``export_gguf`` needs besides the checkpoint, checked now (prune --gguf calls this before
    its run): a known type, the converter (fetched once), and llama.cpp's quantizer for the quantized types."""

    gguf_type = gguf_type.lower()
    if gguf_type not in GGUF_TYPES:
        raise MaskPruneError(f"unknown GGUF type {gguf_type!r}", expected=f"one of {', '.join(GGUF_TYPES)}")
    if gguf_type in QUANT_TYPES:
        llamacpp.require()
    converter_dir()


def export_gguf(
    folder: str | Path, out: str | Path | None = None, *, gguf_type: str = "f16", overwrite: bool = False
) -> Path:
    """Convert the HF checkpoint ``folder`` (a maskprune export, or any supported model folder) to a GGUF
    file of ``gguf_type``; return its path (default ``<folder>/<folder name>-<type>.gguf``)."""
    folder = Path(folder)
    gguf_type = gguf_type.lower()
    if gguf_type not in GGUF_TYPES:
        raise MaskPruneError(f"unknown GGUF type {gguf_type!r}", expected=f"one of {', '.join(GGUF_TYPES)}")
    quantized = gguf_type in QUANT_TYPES
    if quantized:
        llamacpp.require()  # refuse now, before converting, where the compiled quantizer is missing
    if not (folder / "config.json").is_file():
        raise MaskPruneError(f"{str(folder)!r} is not a checkpoint folder", expected="a folder with config.json")
    out = Path(out) if out is not None else folder / f"{folder.name}-{gguf_type}.gguf"
    if out.exists() and not overwrite:
        raise MaskPruneError(f"{str(out)!r} exists", fix="pass --overwrite or another --out")
    llama_cpp = converter_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(llama_cpp / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    f16 = out.with_name(f".{out.name}.f16-{os.getpid()}") if quantized else tmp
    cmd = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(f16)]
    try:
        r = subprocess.run(
            cmd + ["--outtype", "f16" if quantized else gguf_type], capture_output=True, text=True, env=env
        )
        if r.returncode != 0 or not f16.is_file():
            tail = "\n".join(r.stderr.strip().splitlines()[-3:])
            raise MaskPruneError(f"llama.cpp's converter failed on {str(folder)!r}", found=tail)
        if quantized:
            from .llamacpp import quantize

            quantize(f16, tmp, gguf_type)
        os.replace(tmp, out)
    finally:
        for leftover in {tmp, f16}:
            if leftover.exists():
                leftover.unlink()
    return out


def check_logits(folder: str | Path, gguf: str | Path, ids) -> tuple[float, float]:
    """Max |logit difference| between the HF checkpoint and its GGUF reloaded by transformers
    (``gguf_file=``, dequantized to fp32), and the largest |logit| of the checkpoint, on token ids ``ids``."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = Path(gguf)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gg = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = hf(input_ids=ids).logits, gg(input_ids=ids).logits
    return float((a - b).abs().max()), float(a.abs().max())
