"""The loss: summed token cross-entropy, normalised by the label tokens of the whole optimizer step.

Dividing by the number of label tokens in the whole step (all micro-batches, all processes) makes
gradient accumulation and DDP give the same gradient as one big batch (a mean of per-micro-batch
means would weight short captions more)."""

from __future__ import annotations

from typing import Any

from medcap.train.errors import TrainingError


def label_token_count(labels: Any, decoder_only: bool) -> Any:
    """Number of tokens that are predicted (labels not -100; shifted by one for decoder-only LMs)."""
    return ((labels[:, 1:] if decoder_only else labels) != -100).sum()


def token_loss_sum(logits: Any, labels: Any, decoder_only: bool) -> Any:
    """Summed cross-entropy over label tokens (fp32). For decoder-only language models the token at
    position t predicts label t+1; encoder-decoder (T5) logits are already aligned with labels."""
    import torch.nn.functional as F

    if decoder_only:
        logits, labels = logits[:, :-1], labels[:, 1:]
    # logits may be longer than labels if a model prepends query embeddings: keep the tail.
    logits = logits[:, -labels.shape[1] :]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1).to(logits.device),
        ignore_index=-100,
        reduction="sum",
    )


def batch_loss(model: Any, batch: dict[str, Any], decoder_only: bool, features: Any) -> Any:
    """Forward one micro-batch and return the summed token loss."""
    labels = batch["labels"]
    if features is not None:
        out = features.forward_from_cache(model, batch)
    else:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids", "captions", "concept_targets")}
        if not decoder_only:
            inputs["labels"] = labels  # T5 builds its decoder inputs from the labels
        out = model(**inputs)
    logits = getattr(out, "logits", None)
    if logits is None:
        if not hasattr(out, "ndim") or out.ndim != 0:
            raise TrainingError("the forward returned neither logits nor a scalar loss")
        # A mean loss over label tokens: turn it back into a sum so the step's normalisation holds.
        return out.float() * label_token_count(labels, decoder_only)
    return token_loss_sum(logits, labels, decoder_only)
