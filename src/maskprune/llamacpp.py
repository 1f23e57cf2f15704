"""llama.cpp itself, through llama-cpp-python (the optional extra ``maskprune[llamacpp]``, pinned to the version
whose converter :mod:`maskprune.gguf_export` uses; pip compiles its llama.cpp once and caches the wheel).

What it is for: quantizing to llama.cpp's k-quants (``llama_model_quantize``, the code behind
``llama-quantize``), and checking a GGUF where users run it: WikiText-2 perplexity by maskprune's own protocol
on llama.cpp's logits (the same token ids and windows as :func:`maskprune.evaluate.perplexity`), prefill and
decode speed, and greedy generation.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import MaskPruneError

__all__ = [
    "QUANT_TYPES",
    "LLAMA_CPP_PYTHON",
    "CONVERTER_TYPES",
    "GGUF_TYPES",
    "available",
    "require",
    "quantize",
    "perplexity",
    "speed",
    "generate",
    "SpeedReport",
]

QUANT_TYPES = {  # GGUF type name -> llama_ftype (llama.h)
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k_m": 12,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
}
"""The types llama.cpp's quantizer writes from an f16/f32 GGUF (the converter writes f32, f16, bf16, q8_0)."""
LLAMA_CPP_PYTHON = "0.3.36"
"""The llama-cpp-python version pinned: its source distribution's vendored llama.cpp converts
(:mod:`maskprune.gguf_export`), its compiled llama.cpp quantizes and checks (this module)."""
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
"""GGUF types llama.cpp's Python converter writes without its compiled quantizer."""
GGUF_TYPES = CONVERTER_TYPES + tuple(QUANT_TYPES)
"""Every type ``export-gguf`` writes (the quantized ones through the quantizer)."""


def available() -> bool:
    """Whether llama-cpp-python (a compiled llama.cpp) is importable."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


def require():
    """The ``llama_cpp`` module, or a clear error saying how to get it."""
    try:
        import llama_cpp
    except Exception as exc:
        raise MaskPruneError(
            "llama.cpp is not available here (llama-cpp-python is not installed or did not load)",
            found=f"{type(exc).__name__}: {exc}",
            fix=f"pip install 'maskprune[llamacpp]' (llama-cpp-python=={LLAMA_CPP_PYTHON}; pip compiles "
            "llama.cpp once, about 10 minutes on 2 cores, with a C++ compiler and cmake)",
        ) from None
    return llama_cpp


def quantize(src: str | Path, dst: str | Path, gguf_type: str, *, threads: int = 0) -> Path:
    """llama.cpp's quantizer: ``src`` (an f16/f32 GGUF) to ``dst`` of ``gguf_type`` (one of :data:`QUANT_TYPES`)."""
    if gguf_type not in QUANT_TYPES:
        raise MaskPruneError(f"unknown quantized GGUF type {gguf_type!r}", expected=f"one of {', '.join(QUANT_TYPES)}")
    lc = require()
    params = lc.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[gguf_type]
    params.nthread = threads
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not Path(dst).is_file():
        raise MaskPruneError(f"llama.cpp's quantizer failed on {str(src)!r}", found=f"return code {rc}")
    return Path(dst)


def _load(gguf: str | Path, *, n_ctx: int, threads: int | None, logits_all: bool = False):
    lc = require()
    return lc.Llama(
        model_path=str(gguf),
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 512),
        n_threads=threads,
        logits_all=logits_all,
        verbose=False,
    )


def perplexity(gguf: str | Path, windows, *, threads: int | None = None) -> dict:
    """exp(mean NLL) of llama.cpp's logits on ``windows`` (``[n, seq_len]`` token ids, e.g. from
    :func:`maskprune.data.tokenize_windows`): every token after the first of each window scored, as
    maskprune's own perplexity scores them, so the figure compares with the HF checkpoint's directly."""
    import numpy as np

    n, seq = int(windows.shape[0]), int(windows.shape[1])
    llm = _load(gguf, n_ctx=seq, threads=threads, logits_all=True)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[: seq - 1], dtype=np.float64)  # position i predicts token i + 1
        m = logits.max(axis=1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        target = np.asarray(row[1:])
        nll += float((logz - logits[np.arange(seq - 1), target]).sum())
        count += seq - 1
    return {
        "ppl": math.exp(nll / count),
        "nll": nll / count,
        "windows": n,
        "seq_len": seq,
        "tokens_scored": count,
        "seconds": round(time.perf_counter() - t0, 2),
    }


@dataclass
class SpeedReport:
    prompt_tokens: int
    generated_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    threads: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def speed(
    gguf: str | Path, *, prompt_tokens: int = 512, gen_tokens: int = 128, threads: int | None = None, repeats: int = 3
) -> SpeedReport:
    """Prefill (one batch of ``prompt_tokens``) and decode (``gen_tokens`` single-token steps) throughput in
    llama.cpp; the best of ``repeats`` runs of each (the first warms the caches)."""
    llm = _load(gguf, n_ctx=prompt_tokens + gen_tokens, threads=threads)
    vocab = llm.n_vocab()
    prompt = [(17 * i + 11) % vocab for i in range(prompt_tokens)]  # fixed ids: the speed does not depend on them
    best_pre, best_dec = math.inf, math.inf
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        best_pre = min(best_pre, time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(gen_tokens):
            llm.eval([(31 * i + 7) % vocab])
        best_dec = min(best_dec, time.perf_counter() - t)
    return SpeedReport(prompt_tokens, gen_tokens, prompt_tokens / best_pre, gen_tokens / best_dec, threads)


def generate(gguf: str | Path, prompt: str, *, max_tokens: int = 32, threads: int | None = None) -> str:
    """Greedy continuation of ``prompt`` by llama.cpp (its own tokenizer and sampler, temperature 0)."""
    llm = _load(gguf, n_ctx=512, threads=threads)
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]
