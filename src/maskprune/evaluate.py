"""Perplexity as METHOD.md's evaluation protocol defines it.

The text is tokenized once (the tokenizer's own special-token handling, recorded as ``bos``), cut
into non-overlapping windows of ``seq_len`` tokens with the remainder dropped, and
``ppl = exp(mean NLL)`` over every predicted token (``seq_len - 1`` per window).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "tokenize_windows", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float
    seq_len: int
    windows: int
    total_windows: int
    tokens_scored: int
    bos: str
    dtype: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_windows(text: str, tokenizer, seq_len: int) -> tuple[torch.Tensor, str]:
    """``([n, seq_len] long, bos description)``; remainder tokens are dropped."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]  # [N]
    bos_id = tokenizer.bos_token_id
    bos = "prepended once at the start of the text" if (bos_id is not None and len(ids) and
                                                         int(ids[0]) == bos_id) else "none added"
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len), bos  # [n, seq_len]


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
               max_windows: int | None = None, autocast_dtype: torch.dtype | None = None,
               bos: str = "", progress: bool = True, desc: str = "ppl") -> PerplexityResult:
    """exp(mean token NLL) of ``model`` over ``windows`` ``[n, seq_len]`` (first ``max_windows``)."""
    total = windows.shape[0]
    if total == 0:
        raise ValueError("no evaluation window: the text is shorter than seq_len")
    use = windows[: max_windows] if max_windows else windows
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(0, use.shape[0], batch_size), desc=desc, disable=not progress,
                      leave=False):
            batch = use[i: i + batch_size].to(device)  # [b, T]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                logits = model(input_ids=batch, use_cache=False).logits  # [b, T, V]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   batch[:, 1:].reshape(-1), reduction="sum")
            nll_sum += float(loss)
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    nll = nll_sum / count
    dtype = str(autocast_dtype or next(model.parameters()).dtype).replace("torch.", "")
    return PerplexityResult(ppl=math.exp(nll), nll=nll, seq_len=int(use.shape[1]),
                            windows=int(use.shape[0]), total_windows=int(total),
                            tokens_scored=count, bos=bos, dtype=dtype,
                            seconds=time.perf_counter() - start)
