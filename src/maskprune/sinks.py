"""Where per-step metrics go: the run's JSONL file always; TensorBoard and Weights & Biases when asked
for and installed (import-guarded, off by default)."""

from __future__ import annotations

import logging
from typing import Any

from .errors import MaskPruneError

__all__ = ["ExtraSinks"]

log = logging.getLogger(__name__)


class ExtraSinks:
    """Fan a metrics dict out to the optional trackers named in ``names`` (``tensorboard``, ``wandb``)."""

    @staticmethod
    def check(names: tuple[str, ...]) -> None:
        """Fail early (before any heavy work) if a tracker is unknown or its package is missing."""
        for name in names:
            module = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}.get(name)
            if module is None:
                raise MaskPruneError(f"unknown tracker {name!r}", expected="tensorboard, wandb")
            try:
                __import__(module)
            except ImportError:
                raise MaskPruneError(
                    f"--trackers {name} needs the {name} package",
                    fix=f"pip install {name}, or drop {name} from --trackers",
                ) from None

    def __init__(self, names: tuple[str, ...], log_dir: str, config: dict[str, Any]) -> None:
        self.check(names)
        self._tb = None
        self._wandb = None
        for name in names:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise MaskPruneError(
                        "--trackers tensorboard needs the tensorboard package",
                        fix="pip install tensorboard, or drop tensorboard from --trackers",
                    ) from None
                self._tb = SummaryWriter(log_dir=log_dir)
            elif name == "wandb":
                try:
                    import wandb
                except ImportError:
                    raise MaskPruneError(
                        "--trackers wandb needs the wandb package",
                        fix="pip install wandb, or drop wandb from --trackers",
                    ) from None
                self._wandb = wandb.init(project="maskprune", config=config)
            else:
                raise MaskPruneError(f"unknown tracker {name!r}", expected="tensorboard, wandb")

    def write(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
