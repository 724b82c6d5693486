"""The data side of training: the dataset, the order of batches (a pure function of seed and epoch,
so a resumed run sees exactly the batches an uninterrupted one would), and the validation batches."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from medcap.data.images import read_image
from medcap.data.manifest import ManifestRow
from medcap.train.errors import TrainingError


class CaptionDataset:
    """Manifest rows -> ``(RGB PIL image, caption)`` for ``CaptionCollator``, or ``(image, caption,
    prompt)`` with per-row ``prompts`` (``data.prompt_with``); decoding runs in the loader workers."""

    def __init__(
        self, rows: Sequence[ManifestRow], min_size: int | None = None, prompts: Sequence[str] | None = None
    ):
        self.rows = list(rows)
        self.prompts = list(prompts) if prompts is not None else None
        # JPEGs are decoded at a reduced scale (Pillow draft mode) but never below the model's
        # input size: the processor resizes to that anyway, and decoding is the loader's main cost.
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        row = self.rows[i]
        try:
            image = read_image(row.image, min_size=self.min_size)
        except (OSError, ValueError) as e:
            raise TrainingError(
                f"image {row.image} (id {row.id}) cannot be read: {e}. The manifest is out of date: "
                "run 'medcap data prepare' again"
            ) from e
        return (image, row.caption) if self.prompts is None else (image, row.caption, self.prompts[i])


class PassBatches:
    """The batch sampler of fit()'s long-lived loaders: the batches of the next pass (an epoch's
    remaining batches, or the validation batches), set before each pass."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def epoch_batches(
    lengths: Sequence[int], global_batch: int, seed: int, epoch: int, bucket: bool
) -> list[list[int]]:
    """The global batches of one epoch, a pure function of its arguments.

    Indices are shuffled with a generator seeded by (seed, epoch). The last batch is filled up with
    indices from the start of the permutation so every batch is full and splits evenly over
    processes. With ``bucket``, indices are sorted by length inside mega-batches of 50 global
    batches (less padding) and the batch order is shuffled again, so long and short batches mix.
    """
    n = len(lengths)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    total = math.ceil(n / global_batch) * global_batch
    perm = np.resize(perm, total)  # wraps around: the filler repeats the first indices
    if bucket:
        lens = np.asarray(lengths)
        mega = global_batch * 50
        parts = [perm[i : i + mega] for i in range(0, total, mega)]
        perm = np.concatenate([p[np.argsort(-lens[p], kind="stable")] for p in parts])
    batches = perm.reshape(-1, global_batch)
    if bucket:
        batches = batches[rng.permutation(len(batches))]
    return batches.tolist()


def eval_batches(lengths: Sequence[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Validation batches of this process: every index exactly once over all processes (sums stay
    exact), sorted by length so that padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))[rank::world]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def calibration_batches(
    rows: Sequence[ManifestRow],
    family: Any,
    model_cfg: Any,
    max_caption_tokens: int,
    batch_size: int,
    n_batches: int,
    seed: int,
    progress: bool = True,
) -> Any:
    """``calibration(processor, per_batch)`` for ``medcap.model.peft_methods.AdapterSetup``: the
    statistics of EVA and CorDA come from ``n_batches`` x ``batch_size`` training examples drawn with
    a private seeded generator (the training order's random state is left alone), collated in
    batches of ``per_batch`` (None: ``batch_size``)."""

    def make(processor: Any, per_batch: int | None) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        collate = family.collator(processor, model_cfg, max_caption_tokens)
        dataset = CaptionDataset(rows, min_size=family.image_side(processor))
        count = min(len(rows), n_batches * batch_size)
        chosen = np.random.default_rng([seed, 17]).choice(len(rows), size=count, replace=False)
        step = per_batch or batch_size
        return [
            collate([dataset[int(i)] for i in chosen[start : start + step]])
            for start in tqdm(
                range(0, count, step), desc="peft init: reading training batches", disable=not progress
            )
        ]

    return make
