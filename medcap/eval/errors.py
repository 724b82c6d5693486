"""The error of the evaluation stage."""

from __future__ import annotations


class EvaluationError(ValueError):
    """Bad evaluation input; the message names the file, row and what to do."""
