"""Why a run cannot start or go on."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run cannot start or go on; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    """Too many non-finite losses in a row."""
