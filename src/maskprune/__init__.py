"""maskprune: layer-uniform structured pruning of LLMs with learned masks (MaskPrune, arXiv 2502.14008).

Public API::

    from maskprune import PruneConfig, load_config, prune, evaluate
    report = prune(load_config(overrides={"model": "smollm2-135m", "sparsity": 0.5}))
    results = evaluate([report["out"]], seq_lens=[2048], tasks=["piqa"])
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import PruneConfig, load_config  # noqa: E402
from .errors import MaskPruneError  # noqa: E402
from .evaluate import evaluate_models as evaluate  # noqa: E402
from .pipeline import prune  # noqa: E402

__all__ = ["PruneConfig", "load_config", "prune", "evaluate", "MaskPruneError", "__version__"]
