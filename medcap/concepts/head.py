"""The concept classifier: a linear or small MLP head on the pooled vision features, and its
class-balanced multi-label loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn


class ConceptHead(nn.Module):
    """Vision features ``[batch, tokens, width]`` -> one logit per CUI ``[batch, labels]``.

    The tokens (BLIP-2: the query embeddings) are pooled by their mean, or laid side by side
    (``concat``); a layer norm, dropout, then a linear layer or a one-hidden-layer MLP.
    """

    def __init__(
        self,
        tokens: int,
        width: int,
        labels: int,
        kind: Literal["linear", "mlp"] = "linear",
        hidden: int = 512,
        dropout: float = 0.1,
        pool: Literal["mean", "concat"] = "mean",
    ) -> None:
        super().__init__()
        self.pool = pool
        d = width if pool == "mean" else tokens * width
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        if kind == "linear":
            self.out = nn.Linear(d, labels)
        else:
            self.out = nn.Sequential(
                nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, labels)
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float()
        x = x.mean(dim=1) if self.pool == "mean" else x.flatten(1)
        return self.out(self.drop(self.norm(x)))


def loss_weights(
    counts: Sequence[int],
    images: int,
    loss: Literal["bce", "pos_weight", "class_balanced"],
    beta: float = 0.999,
    max_pos_weight: float = 100.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(weight, pos_weight)`` per CUI for ``BCEWithLogits`` from the training counts.

    class_balanced: weight (1 - beta) / (1 - beta^n) per CUI, normalised to mean 1 (rare CUIs count
    more; Cui et al. 2019). pos_weight: positives weighted by negatives / positives, capped.
    """
    n = torch.tensor(list(counts), dtype=torch.float64).clamp(min=1)
    if loss == "class_balanced":
        w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
        return (w / w.mean()).float(), None
    if loss == "pos_weight":
        return None, ((images - n) / n).clamp(min=1.0, max=max_pos_weight).float()
    return None, None


def concept_loss_sum(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
) -> torch.Tensor:
    """Sum over images of the mean over CUIs of the (weighted) binary cross-entropy."""
    per = nn.functional.binary_cross_entropy_with_logits(
        logits.float(),
        targets.float(),
        weight=weight.to(logits.device) if weight is not None else None,
        pos_weight=pos_weight.to(logits.device) if pos_weight is not None else None,
        reduction="none",
    )
    return per.mean(dim=1).sum()


__all__ = ["ConceptHead", "concept_loss_sum", "loss_weights"]
