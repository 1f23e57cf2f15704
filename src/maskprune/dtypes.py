"""The dtype names the config and the CLI use, and which one ``auto`` means on this hardware."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "resolve_dtype", "autocast_dtype"]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype names the config and the CLI use."""


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> str:
    """A config ``dtype`` name with ``auto`` settled for ``device``: ``bf16`` where the hardware computes it
    natively (CUDA with bf16 support; a CPU with AVX512-BF16 or AMX), else ``fp32``. On a CPU without those
    instructions bf16 matmuls are emulated and run several times slower than fp32, not faster."""
    if name != "auto":
        return name
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if dev.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bf16" if native else "fp32"
    return "fp32"


def autocast_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The autocast dtype of a config ``dtype`` name (``auto`` settled for ``device``); ``None`` for fp32
    (autocast off)."""
    name = resolve_dtype(name, device)
    return None if name == "fp32" else DTYPES[name]
