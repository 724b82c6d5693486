"""The auxiliary concept head of a caption run (``train.concept_loss_weight``).

A multi-label head (``ConceptHead``: layer norm, linear) on the mean of the Q-Former's query
embeddings predicts each training image's CUIs; its class-balanced BCE, times the weight, is added to
the caption loss, so the gradient pushes the queries (Q-Former, and the vision tower where it trains)
to carry the image's concepts. The embeddings are read with a forward hook on the family's Q-Former
during the model's own forward: nothing of the caption path changes.

``AuxiliaryConcepts.wrap(dataset)`` adds each row's multi-hot target to the dataset's items and
``collate`` puts them in the batch as ``concept_targets`` (``batch_loss`` does not pass it to the model).
The head and its vocabulary are saved in each checkpoint (``concept_head.safetensors``,
``concept_vocab.json``) and restored on resume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcap.concepts.head import ConceptHead, concept_loss_sum, loss_weights
from medcap.concepts.vocab import ConceptVocab, CuiAudit, build_vocab
from medcap.layout import ConceptCheckpointLayout
from medcap.model.adapters import unwrap
from medcap.train.errors import TrainingError


class _WithTargets:
    """A dataset whose items carry their row's concept target: ``(item, target)``."""

    def __init__(self, dataset: Any, targets: np.ndarray):
        self.dataset, self.targets = dataset, targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, np.ndarray]:
        return self.dataset[i], self.targets[i]


class AuxiliaryConcepts:
    """The auxiliary head, its vocabulary, targets, loss weights and the hook that feeds it."""

    def __init__(self, model: Any, train_rows: Sequence[Any], weight: float, min_freq: int, device: Any):
        import torch

        inner = unwrap(model)
        qformer = getattr(inner, "qformer", None)
        if qformer is None or getattr(model, "medcap_family", None) is None:
            family = getattr(getattr(model, "medcap_family", None), "name", "this")
            raise TrainingError(
                f"train.concept_loss_weight: the auxiliary head reads the Q-Former's query embeddings, and the "
                f"{family} family has no Q-Former; set train.concept_loss_weight 0"
            )
        if not any(
            p.requires_grad for n, p in inner.named_parameters() if n.startswith(("qformer", "vision_model"))
        ):
            raise TrainingError(
                "train.concept_loss_weight: neither the Q-Former nor the vision tower trains, so the auxiliary "
                "loss cannot change the query embeddings; set model.train_qformer true (or full_finetune)"
            )
        self.weight = weight
        self.vocab, self.audit = build_vocab(train_rows, min_freq)
        if not len(self.vocab):
            raise TrainingError(
                f"train.concept_loss_weight: no CUI is in at least train.concept_min_freq={min_freq} training "
                "images (manifest column cuis); lower it or set the weight to 0"
            )
        hidden = int(inner.config.qformer_config.hidden_size)
        tokens = int(inner.config.num_query_tokens)
        self.head = ConceptHead(tokens, hidden, len(self.vocab), "linear", dropout=0.0).to(device)
        w, _ = loss_weights(self.vocab.counts, self.vocab.train_images, "class_balanced")
        self.class_weight = w.to(device)
        self._captured: Any = None
        self._hook = qformer.register_forward_hook(self._capture)
        self.last_losses: list[float] = []
        self._torch = torch

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def parameters(self) -> list[Any]:
        return list(self.head.parameters())

    def targets(self, rows: Sequence[Any]) -> tuple[np.ndarray, CuiAudit]:
        return self.vocab.targets(rows)

    def wrap(self, dataset: Any, rows: Sequence[Any]) -> _WithTargets:
        return _WithTargets(dataset, self.targets(rows)[0])

    def collate(
        self, collate: Callable[[list[Any]], dict[str, Any]]
    ) -> Callable[[list[Any]], dict[str, Any]]:
        import torch

        def with_targets(items: list[tuple[Any, np.ndarray]]) -> dict[str, Any]:
            batch = collate([item for item, _ in items])
            batch["concept_targets"] = torch.from_numpy(np.stack([t for _, t in items]))
            return batch

        return with_targets

    def loss_sum(self, batch: dict[str, Any]) -> Any:
        """The summed (over images) class-balanced BCE of the batch the model just ran forward."""
        feats, self._captured = self._captured, None
        if feats is None:
            raise TrainingError("the auxiliary concept head saw no query embeddings in the forward")
        self.head.train()
        logits = self.head(feats.float())
        return concept_loss_sum(logits, batch["concept_targets"].to(logits.device), self.class_weight, None)

    def clear(self) -> None:
        self._captured = None

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        ckpt = ConceptCheckpointLayout(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(ckpt.auxiliary_head))
        self.vocab.save(ckpt.auxiliary_vocab)

    def load(self, folder: Path) -> None:
        from medcap.model.checkpoint import load_tensors

        ckpt = ConceptCheckpointLayout(folder)
        saved = ConceptVocab.load(ckpt.auxiliary_vocab)
        if saved.cuis != self.vocab.cuis:
            raise TrainingError(
                f"{ckpt.auxiliary_vocab}: the auxiliary head's vocabulary differs from this data's"
            )
        self.head.load_state_dict(load_tensors(ckpt.auxiliary_head))


__all__ = ["AuxiliaryConcepts"]
