"""Decision thresholds tuned on the validation split for the official score (mean per-image F1), and
the decision itself (thresholds, at least one CUI per image, at most ``max_concepts``).

The per-image F1 counts every true CUI of the image, also those outside the vocabulary (the model
can never predict them, and the evaluator counts them as misses): ``truth_counts`` carries them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Candidate thresholds.
GRID = np.round(np.concatenate([np.arange(0.01, 0.1, 0.01), np.arange(0.1, 0.96, 0.025)]), 4)


def decide(
    probs: np.ndarray, thresholds: np.ndarray, at_least_one: bool = True, max_concepts: int = 100
) -> np.ndarray:
    """Boolean predictions ``[images, labels]``: probability at or above the CUI's threshold; the most
    probable CUI where none passes (``at_least_one``); at most ``max_concepts`` (the most probable)."""
    pred = probs >= thresholds[None, :]
    if at_least_one and probs.shape[1]:
        empty = ~pred.any(axis=1)
        pred[empty, probs[empty].argmax(axis=1)] = True
    too_many = pred.sum(axis=1) > max_concepts
    for i in np.flatnonzero(too_many):
        keep = np.argsort(-np.where(pred[i], probs[i], -1.0))[:max_concepts]
        pred[i] = False
        pred[i, keep] = True
    return pred


def mean_f1(pred: np.ndarray, truth: np.ndarray, truth_counts: np.ndarray) -> float:
    """Mean per-image F1 ``2 |P & G| / (|P| + |G|)`` over images with a true CUI (in the vocabulary or
    not: ``truth_counts`` holds all of them)."""
    scored = truth_counts > 0
    if not scored.any():
        return float("nan")
    tp = (pred & truth).sum(axis=1)
    f1 = 2.0 * tp / (pred.sum(axis=1) + truth_counts).clip(min=1)
    return float(f1[scored].mean())


@dataclass
class Tuned:
    """Thresholds per CUI and the validation F1 they reach."""

    thresholds: np.ndarray
    global_threshold: float
    f1: float
    f1_global: float
    """The F1 with the global threshold only."""
    own: int
    """CUIs that got a threshold of their own (per_label)."""


def tune_thresholds(
    probs: np.ndarray,
    truth: np.ndarray,
    truth_counts: np.ndarray,
    mode: str = "per_label",
    min_label_positives: int = 5,
    at_least_one: bool = True,
    max_concepts: int = 100,
) -> Tuned:
    """Thresholds that maximise the mean per-image F1 on ``probs`` against ``truth``.

    global: the best of ``GRID``. per_label: from there, each CUI with at least
    ``min_label_positives`` positives in turn (most frequent first) takes the grid value that raises
    the mean F1 most, the others held fixed; one pass (later passes change little and overfit).
    """
    labels = probs.shape[1]
    truth = truth.astype(bool)
    scored = truth_counts > 0
    best_t, best_f1 = float(GRID[0]), -1.0
    for t in GRID:
        f1 = mean_f1(decide(probs, np.full(labels, t), at_least_one, max_concepts), truth, truth_counts)
        if f1 > best_f1:
            best_t, best_f1 = float(t), f1
    thresholds = np.full(labels, best_t)
    own = 0
    if mode == "per_label" and labels:
        pred = probs >= thresholds[None, :]
        tp = (pred & truth).sum(axis=1).astype(np.float64)
        npred = pred.sum(axis=1).astype(np.float64)
        denom_truth = truth_counts.astype(np.float64)
        positives = truth.sum(axis=0)
        for c in np.argsort(-positives, kind="stable"):
            if positives[c] < min_label_positives:
                break
            col, y = pred[:, c], truth[:, c]
            # F1 of every scored image with each candidate threshold for this CUI.
            cand = probs[:, c][None, :] >= GRID[:, None]  # [grid, images]
            new_tp = tp[None, :] - (col & y)[None, :] + (cand & y[None, :])
            new_np = npred[None, :] - col[None, :] + cand
            f1 = np.where(scored[None, :], 2.0 * new_tp / np.maximum(new_np + denom_truth, 1), 0.0)
            k = int(f1.sum(axis=1).argmax())
            if GRID[k] != thresholds[c]:
                thresholds[c] = GRID[k]
                own += 1
                pred[:, c] = cand[k]
                tp, npred = new_tp[k], new_np[k]
    final = mean_f1(decide(probs, thresholds, at_least_one, max_concepts), truth, truth_counts)
    if final < best_f1:  # at_least_one and the cap interact with the search: never worse than global
        thresholds, final, own = np.full(labels, best_t), best_f1, 0
    return Tuned(thresholds, best_t, final, best_f1, own)


__all__ = ["GRID", "Tuned", "decide", "mean_f1", "tune_thresholds"]
