"""Where a concept model's inputs come from: the frozen vision side of a captioning model (BLIP-2:
the Q-Former's query embeddings), read from the query cache of ``medcap features`` or computed
from the images (``VisionFeatures``). Both give ``[images, tokens, width]`` float tensors; the
vision side is the model family's (``family.vision_inputs`` / ``family.vision_features``, any
family); where the family has a query cache its features are the tensor the cache stores, so a head
trained on one reads the other."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcap.data.manifest import ManifestRow


class ConceptError(ValueError):
    """A concept model cannot be trained or used as asked; the message says why and what to do."""


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def build_vision(
    model_cfg: Any, vision_checkpoint: Path | None = None, verbose: bool = False
) -> tuple[Any, Any]:
    """The model whose vision side gives the features, in eval mode: a caption checkpoint's
    (``vision_checkpoint``) or ``model_cfg``'s base weights without adapters."""
    if vision_checkpoint is not None:
        from medcap.model.checkpoint import load_checkpoint

        model, processor, _ = load_checkpoint(vision_checkpoint, verbose=verbose)
        return model, processor
    from medcap.config.model import PeftSettings
    from medcap.model.build import build_model

    with _quiet("medcap.config.model"):  # nothing of it trains: the config says so, which is noise here
        cfg = dataclasses.replace(
            model_cfg,
            peft=PeftSettings(method="none"),
            full_finetune=False,
            train_vision=False,
            train_qformer=False,
            train_language_projection=False,
            gradient_checkpointing=False,
        )
    model, processor = build_model(cfg, verbose=verbose)
    model.eval()
    return model, processor


def vision_fingerprint(model: Any) -> str:
    """The hash of the frozen vision side's weights. Where the family has a query cache it is the
    cache's own fingerprint (a head trained from the cache is checked against the model that
    predicts); elsewhere the same kind of hash over the family's vision, Q-Former and projection
    parameters."""
    import hashlib

    import torch

    from medcap.model.adapters import unwrap
    from medcap.model.families import family_of

    family = family_of(model)
    if family.query_cache is not None:
        from medcap.train.query_cache import vision_fingerprint as fingerprint

        return fingerprint(model)
    prefixes = tuple(p for part in ("vision", "qformer", "projection") for p in family.parts.get(part, ()))
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in unwrap(model).named_parameters():
            if not name.startswith(prefixes):
                continue
            flat = p.detach().reshape(-1).float()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(flat[:64].cpu().numpy().tobytes())
            h.update(flat[-64:].cpu().numpy().tobytes())
            h.update(f"{flat.double().sum().item():.10e}".encode())
    return h.hexdigest()[:20]


def read_row_image(row: ManifestRow, min_size: int | None) -> Any:
    """A manifest row's image through the one image reader, or a ConceptError naming it."""
    from medcap.data.images import read_image

    try:
        return read_image(row.image, min_size=min_size)
    except (OSError, ValueError) as e:
        raise ConceptError(
            f"image {row.image} (id {row.id}) cannot be read: {e}; run 'medcap data prepare' again"
        ) from e


class RowImages:
    """Manifest rows -> decoded images, and batches of them -> the family's vision inputs (both in
    DataLoader workers, as ``medcap features`` decodes)."""

    def __init__(self, rows: Sequence[ManifestRow], family: Any, processor: Any):
        self.rows, self.family, self.processor = list(rows), family, processor
        self.min_size = family.image_side(processor)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return read_row_image(self.rows[i], self.min_size)

    def collate(self, images: list[Any]) -> dict[str, Any]:
        return self.family.vision_inputs(self.processor, images)


def image_features(model: Any, inputs: dict[str, Any]) -> Any:
    """The frozen vision side's output ``[images, tokens, width]`` (float32, no gradient) for the
    family's vision inputs."""
    from medcap.model.families import family_of

    return family_of(model).vision_features(model, inputs)


def images_features(model: Any, processor: Any, images: Sequence[Any]) -> Any:
    """The frozen vision side's output for PIL images."""
    from medcap.model.families import family_of

    return image_features(model, family_of(model).vision_inputs(processor, list(images)))


class VisionFeatures:
    """Features of manifest rows computed by the vision side, a batch of rows at a time."""

    def __init__(self, model: Any, processor: Any, rows: Sequence[ManifestRow], num_workers: int = 0):
        from medcap.model.families import family_of

        self.model, self.processor, self.rows = model, processor, list(rows)
        self.dataset = RowImages(self.rows, family_of(model), processor)
        self.num_workers = num_workers
        self._loader: Any = None

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, indices: list[list[int]]) -> Iterator[Any]:
        """Features ``[batch, tokens, width]`` of each list of row indices, decoded in workers."""
        import torch
        from torch.utils.data import DataLoader

        from medcap.train.batches import PassBatches

        if self._loader is None:
            self._loader = DataLoader(
                self.dataset,
                batch_sampler=PassBatches(),
                collate_fn=self.dataset.collate,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                generator=torch.Generator().manual_seed(0),
            )
        self._loader.batch_sampler.batches = indices
        for inputs in self._loader:
            yield image_features(self.model, inputs)


class CachedFeatures:
    """Features of manifest rows read from a query cache (``medcap features --out DIR``)."""

    def __init__(self, cache_dir: str | Path, rows: Sequence[ManifestRow]):
        from medcap.train.query_cache import FeatureCacheError, read_index

        self.cache_dir = Path(cache_dir)
        try:
            self.index = read_index(self.cache_dir)
        except FeatureCacheError as e:
            raise ConceptError(str(e)) from None
        where: dict[str, tuple[str, int]] = {}
        for split, info in self.index["splits"].items():
            for k, image_id in enumerate(info["ids"]):
                where[image_id] = (split, k)
        missing = [r.id for r in rows if r.id not in where]
        if missing:
            raise ConceptError(
                f"{self.cache_dir}: {len(missing)} of {len(rows)} images have no cached features (first: "
                f"{', '.join(missing[:3])}); run 'medcap features' for their split (cached: "
                f"{', '.join(self.index['splits']) or 'none'})"
            )
        self._where = [where[r.id] for r in rows]
        self._maps: dict[str, np.memmap] = {}

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the vision weights the cache was computed with."""
        return self.index["key"]["weights"]

    def __len__(self) -> int:
        return len(self._where)

    def _map(self, split: str) -> np.memmap:
        if split not in self._maps:
            info = self.index["splits"][split]
            self._maps[split] = np.memmap(
                self.cache_dir / info["file"], dtype=np.float16, mode="r", shape=tuple(info["shape"])
            )
        return self._maps[split]

    def batches(self, indices: list[list[int]]) -> Iterator[Any]:
        import torch

        for idx in indices:
            yield torch.from_numpy(
                np.stack([self._map(s)[k] for s, k in (self._where[i] for i in idx)])
            ).float()


__all__ = [
    "CachedFeatures",
    "ConceptError",
    "RowImages",
    "VisionFeatures",
    "build_vision",
    "image_features",
    "images_features",
    "read_row_image",
    "vision_fingerprint",
]
