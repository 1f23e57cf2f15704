"""maskprune: layer-uniform structured pruning of LLMs with learned masks (MaskPrune, arXiv 2502.14008).

Public API::

    import maskprune
    result = maskprune.prune("smollm2-135m", sparsity=0.5, steps=120)  # .model, .tokenizer, .report
    maskprune.prune("smollm2-135m", sparsity=0.2, out="runs/s20")      # also written to runs/s20
    maskprune.distill("runs/s20", teacher="smollm2-135m", steps=60, out="runs/s20-distilled")
    maskprune.evaluate(["runs/s20"], seq_lens=[2048], tasks=["piqa"], data_dir="data")

See :mod:`maskprune.api`.
"""

from __future__ import annotations

from .api import PruneResult, distill, prune, sweep
from .config import PruneConfig, load_config
from .errors import MaskPruneError
from .evaluate import evaluate_models as evaluate
from .version import __version__

__all__ = [
    "PruneConfig",
    "PruneResult",
    "load_config",
    "prune",
    "distill",
    "sweep",
    "evaluate",
    "MaskPruneError",
    "__version__",
]
