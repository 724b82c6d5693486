"""A trained concept model: head, vocabulary and thresholds (``ConceptModel``), and with the vision
side that feeds it, a predictor of images' concepts (``ConceptPredictor``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcap.concepts.features import ConceptError, build_vision, images_features, vision_fingerprint
from medcap.concepts.thresholds import decide
from medcap.concepts.vocab import ConceptVocab
from medcap.config.concepts import ConceptRunConfig, read_concepts_config
from medcap.data.manifest import MODALITY_CUIS
from medcap.layout import ConceptCheckpointLayout, resolve_concept_checkpoint


@dataclass
class ImageConcepts:
    """What a concept model says about one image."""

    cuis: list[str]
    """The predicted CUIs (thresholds passed), most probable first."""
    probabilities: list[float]
    """The probability of each predicted CUI."""
    modality: str | None
    """The most probable of the modality CUIs in the vocabulary, as a manifest modality (ct, mri ...),
    whether or not it passed its threshold (every image has one); None without modality CUIs."""


@dataclass
class ConceptModel:
    """Head, vocabulary and thresholds of a trained concept model (no vision side)."""

    head: Any
    vocab: ConceptVocab
    thresholds: np.ndarray
    cfg: ConceptRunConfig
    vision_fingerprint: str | None
    """The vision weights the head was trained on (checked before features from another model are used)."""
    checkpoint: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """thresholds.json's other entries (global threshold, validation F1)."""

    @property
    def modality_columns(self) -> list[tuple[int, str]]:
        """``(vocabulary index, modality)`` of the modality CUIs the vocabulary holds."""
        return [(self.vocab.index[c], m) for c, m in MODALITY_CUIS.items() if c in self.vocab.index]

    def probabilities(self, features: Any) -> np.ndarray:
        """``[images, labels]`` probabilities from vision features ``[images, tokens, width]``."""
        import torch

        self.head.eval()
        with torch.no_grad():
            device = next(self.head.parameters()).device
            return torch.sigmoid(self.head(features.to(device))).float().cpu().numpy()

    def decide(self, probs: np.ndarray) -> list[ImageConcepts]:
        """Thresholds applied (``concepts.at_least_one``, ``concepts.max_concepts``): per image, its CUIs."""
        c = self.cfg.concepts
        pred = decide(probs, self.thresholds, c.at_least_one, c.max_concepts)
        modality = self.modality_columns
        out = []
        for p, row in zip(probs, pred, strict=True):
            idx = np.flatnonzero(row)
            idx = idx[np.argsort(-p[idx], kind="stable")]
            mod = max(modality, key=lambda km: p[km[0]])[1] if modality else None
            out.append(ImageConcepts([self.vocab.cuis[i] for i in idx], [float(p[i]) for i in idx], mod))
        return out

    def save(self, folder: Path) -> None:
        """head.safetensors, vocab.json and thresholds.json (the caller writes config.yaml)."""
        from safetensors.torch import save_file

        ckpt = ConceptCheckpointLayout(folder)
        tmp = ckpt.head.with_name(ckpt.head.name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp))
        tmp.replace(ckpt.head)
        self.vocab.save(ckpt.vocab)
        data = {
            **self.extra,
            "vision_fingerprint": self.vision_fingerprint,
            "thresholds": dict(zip(self.vocab.cuis, map(float, self.thresholds), strict=True)),
        }
        ckpt.thresholds.write_text(json.dumps(data, indent=0), encoding="utf-8")


def new_head(cfg: ConceptRunConfig, tokens: int, width: int, labels: int) -> Any:
    """The head the config describes, for features of ``tokens`` x ``width``."""
    from medcap.concepts.head import ConceptHead

    c = cfg.concepts
    return ConceptHead(tokens, width, labels, c.head, c.hidden, c.dropout, c.pool)


def load_concept_model(path: str | Path, device: Any = "cpu") -> ConceptModel:
    """A concept checkpoint (or a concept run folder: its best, else last checkpoint)."""
    from medcap.model.checkpoint import load_tensors

    ckpt = ConceptCheckpointLayout(resolve_concept_checkpoint(path))
    cfg = read_concepts_config(ckpt.root)
    vocab = ConceptVocab.load(ckpt.vocab)
    state = load_tensors(ckpt.head)
    data = json.loads(ckpt.thresholds.read_text(encoding="utf-8")) if ckpt.thresholds.is_file() else {}
    by_cui = data.get("thresholds") or {}
    thresholds = np.array([by_cui.get(c, 0.5) for c in vocab.cuis], dtype=np.float64)
    shape = data.get("feature_shape")
    if not shape:
        raise ConceptError(
            f"{ckpt.thresholds}: no feature_shape; the checkpoint is incomplete, train it again"
        )
    head = new_head(cfg, shape[0], shape[1], len(vocab))
    head.load_state_dict(state)
    head.to(device).eval()
    extra = {k: v for k, v in data.items() if k not in ("thresholds", "vision_fingerprint")}
    return ConceptModel(head, vocab, thresholds, cfg, data.get("vision_fingerprint"), ckpt.root, extra)


@dataclass
class ConceptPredictor:
    """A concept model with the vision side that feeds it: images in, concepts out."""

    concepts: ConceptModel
    vision: Any
    processor: Any

    def predict(self, images: list[Any]) -> list[ImageConcepts]:
        """The concepts of PIL images (read with the one image reader, as training read them)."""
        if not images:
            return []
        feats = images_features(self.vision, self.processor, images)
        return self.concepts.decide(self.concepts.probabilities(feats))


def load_concept_predictor(
    path: str | Path, device: Any = None, share: tuple[Any, Any] | None = None, verbose: bool = False
) -> ConceptPredictor:
    """A concept model and its vision side. ``share`` (a loaded caption model and its processor) is
    used when its vision weights are those the concept model was trained on (no second model
    loaded); otherwise the concept config's vision side is built and checked."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    concepts = load_concept_model(path, device)
    want = concepts.vision_fingerprint
    if share is not None and want is not None:
        try:
            same = vision_fingerprint(share[0]) == want
        except Exception:  # noqa: BLE001 - a model without a readable vision side is simply not shared
            same = False
        if same:
            return ConceptPredictor(concepts, share[0], share[1])
    cfg = concepts.cfg
    vision, processor = build_vision(cfg.model, cfg.concepts.vision_checkpoint, verbose=verbose)
    vision.to(device)
    have = vision_fingerprint(vision)
    if want is not None and have != want:
        raise ConceptError(
            f"{concepts.checkpoint}: the concept model was trained on vision weights {want}, but its config "
            f"builds {have} (model.name_or_path {cfg.model.name_or_path}, init_seed {cfg.model.init_seed}); "
            "its features would be other ones: retrain it or restore those weights"
        )
    return ConceptPredictor(concepts, vision, processor)


__all__ = [
    "ConceptModel",
    "ConceptPredictor",
    "ImageConcepts",
    "load_concept_model",
    "load_concept_predictor",
    "new_head",
]
