"""Errors that reach the user.

Every error raised on bad input is a :class:`MaskPruneError`. Its message says what was expected,
what was found and what to change, so the CLI can print it as is and exit non-zero.
"""

from __future__ import annotations

__all__ = ["MaskPruneError", "UnsupportedModelError", "ParityError", "NonFiniteError", "Interrupted"]


class MaskPruneError(ValueError):
    """Bad input or a broken promise, with a message written for the user."""

    def __init__(
        self, what: str, *, expected: str | None = None, found: str | None = None, fix: str | None = None
    ) -> None:
        parts = [what]
        if expected:
            parts.append(f"expected: {expected}")
        if found:
            parts.append(f"found: {found}")
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__("; ".join(parts))


class UnsupportedModelError(MaskPruneError):
    """The model's architecture has no adapter."""


class ParityError(MaskPruneError):
    """The exported checkpoint does not reproduce the masked model."""


class NonFiniteError(MaskPruneError):
    """A loss, mask or multiplier became NaN or infinite during learning."""


class Interrupted(Exception):
    """Learning stopped on request (SIGINT / SIGTERM) after a checkpoint was written. Not an error of the
    input: the CLI reports it and exits with 130 so the run can be resumed."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped at step {step}")
        self.step = step
