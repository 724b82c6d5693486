"""Frozen query-embedding cache: train LoRA without running the vision side (``medcap features``).

When only the language model is adapted (the original project's LoRA on q,v) and images are not
augmented, the vision side gives the same output for an image in every epoch. This module computes
that output ONCE per image and stores it, so that training reads it from disk. What "the vision
side" is, and how its output re-enters the model, is the family's (``family.query_cache``; BLIP-2:
the vision tower and the Q-Former, ``medcap/model/families/blip2/query_cache.py``); families without
such hooks are refused with the reason. For BLIP-2:

* ``medcap features --config CONFIG --out DIR`` (or ``--checkpoint RUN/checkpoints/best``) runs the
  vision tower and Q-Former over the chosen splits (default: the config's train and valid splits)
  in eval mode and writes ``DIR/{split}.f16`` (a raw numpy memmap, fp16, shape
  ``[images, num_query_tokens, qformer_hidden]``) and ``DIR/index.json`` (IDs per split, shapes,
  and the hash of everything the values depend on: model name or folder, random-init seed, precision,
  quantization, image size and normalisation, and a fingerprint of the vision tower, Q-Former and
  query-token weights);
* ``train.query_cache: DIR`` makes ``fit()`` read batches through ``CachedQueryDataset`` and run
  ``forward_from_cache(model, batch)``: the cached Q-Former outputs go through the (trainable or not)
  ``language_projection`` and are scattered into the ``<image>`` token positions exactly as
  the model's own forward does; no image is decoded and the vision tower never runs.
  ``strip_vision(model)`` frees the vision tower and Q-Former (do it before moving the model to the
  GPU: about 1.1B parameters, 2.4 GB for BLIP2-OPT-6.7B: the ViT in bf16 and the fp32 Q-Former).

What is stored is the Q-Former output BEFORE ``language_projection``: 768 values per query token
instead of 4096 (5.3x less disk: ROCOv2's 59,958 training images take 2.9 GB instead of 15.7 GB in
fp16), and the projection can still be trained. Scattering is then bit-for-bit the normal path's
operation on the projection's output.

One difference from the normal path, on purpose: the cache is computed in eval mode, so the frozen
Q-Former's dropout (p=0.1 in the Salesforce configs) is off. The normal path runs the frozen Q-Former
in train mode, with dropout noise on the image tokens. The tests compare both in eval mode.

Refused, with the reason: configs that train the vision tower or the Q-Former (``train_vision``,
``train_qformer``, ``full_finetune``, PEFT targets inside them) or augment images.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.model.adapters import unwrap

if TYPE_CHECKING:
    from medcap.config.data import DataConfig
    from medcap.config.model import ModelConfig
    from medcap.config.train import TrainConfig

INDEX_NAME = "index.json"
FORMAT_VERSION = 1


class FeatureCacheError(ValueError):
    """The query cache cannot be built or used for this config; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Is the vision side frozen?
# ---------------------------------------------------------------------------------------------


def cache_refusal(
    model_cfg: ModelConfig,
    data_cfg: DataConfig | None = None,
    train_cfg: TrainConfig | None = None,
    lora_modules=None,
) -> str | None:
    """Why a query cache cannot stand in for the vision side with these settings (None: it can).

    ``lora_modules``: the module names that got adapters (``model.medcap_lora_modules``), to catch a
    list of target names that reaches the frozen side (``fc1`` reaches BLIP-2's vision tower).
    """
    from medcap.model.families import resolve_family

    family = resolve_family(model_cfg)
    hooks = family.query_cache
    if hooks is None:
        return (
            f"the {family.name} family cannot train from cached image features (its vision side's output "
            "is not fixed per image); unset train.query_cache"
        )
    reasons = []
    if getattr(model_cfg, "full_finetune", False):
        reasons.append("model.full_finetune trains the vision side")
    if getattr(model_cfg, "train_vision", False):
        reasons.append("model.train_vision trains the vision tower")
    if getattr(model_cfg, "train_qformer", False):
        reasons.append("model.train_qformer trains the Q-Former")
    peft = getattr(model_cfg, "peft", None)
    if peft is not None and peft.method != "none":
        if isinstance(peft.targets, str):
            parts = {"qformer": "the Q-Former", "vision": "the vision tower"}
            on = sorted({parts[p.split("-")[0]] for p in peft.targets.split("+") if p.split("-")[0] in parts})
            if on:
                reasons.append(f"model.peft.targets {peft.targets!r} puts adapters on {' and '.join(on)}")
        frozen = hooks.FROZEN
        vision_side = [
            n for n in (lora_modules or []) if n.removeprefix("base_model.model.").split(".")[0] in frozen
        ]
        if vision_side:
            reasons.append(
                f"model.peft.targets reach the vision side ({vision_side[0]} and {len(vision_side) - 1} more): "
                "use a preset such as lm-qv, or scope the names to language_model"
            )
    for cfg, section in ((data_cfg, "data"), (train_cfg, "train")):
        for name in ("augment", "augmentation", "image_augmentation"):
            value = getattr(cfg, name, None) if cfg is not None else None
            if value not in (None, False, "none", "", [], {}):
                reasons.append(
                    f"{section}.{name} augments images, so an image's embedding changes every epoch"
                )
    if not reasons:
        return None
    return (
        "a query-embedding cache needs a frozen vision side and unaugmented images, but "
        + "; ".join(reasons)
        + ". Train through the vision tower instead (unset train.query_cache)"
    )


def check_cacheable(
    model_cfg: ModelConfig,
    data_cfg: DataConfig | None = None,
    train_cfg: TrainConfig | None = None,
    lora_modules=None,
) -> None:
    """Raise ``FeatureCacheError`` when ``cache_refusal`` has a reason."""
    reason = cache_refusal(model_cfg, data_cfg, train_cfg, lora_modules)
    if reason:
        raise FeatureCacheError(reason)


# ---------------------------------------------------------------------------------------------
# What the cached values depend on
# ---------------------------------------------------------------------------------------------


def _hooks(model: Any) -> Any:
    """The query-cache hooks of a built model's family (refused where the family has none)."""
    from medcap.model.families import family_of

    family = family_of(model)
    if family.query_cache is None:
        raise FeatureCacheError(f"the {family.name} family cannot train from cached image features")
    return family.query_cache


def vision_fingerprint(model: Any) -> str:
    """A hash of the frozen vision side (BLIP-2: vision tower, Q-Former and query tokens): names,
    shapes, dtypes and, per tensor, its first and last 64 values and its sum (cheap, and any
    retraining or re-seeding changes it)."""
    import torch

    inner = unwrap(model)
    hooks = _hooks(model)
    for prefix in hooks.FROZEN:
        if isinstance(getattr(inner, prefix, None), RemovedModule):
            raise FeatureCacheError(f"the model's {prefix} was removed; fingerprint it before strip_vision")
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in hooks.frozen_parameters(inner):
            flat = p.detach().reshape(-1)
            if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                flat = flat.to(torch.float32) if flat.is_floating_point() else flat.view(torch.uint8).float()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(flat[:64].float().cpu().numpy().tobytes())
            h.update(flat[-64:].float().cpu().numpy().tobytes())
            # The sum in float64, rounded: a float32 sum's last bits depend on the thread count
            # (the reduction is split per thread), and the same weights must give the same hash.
            h.update(f"{flat.double().sum().item():.10e}".encode())
    return h.hexdigest()[:20]


def cache_key(model: Any, processor: Any, model_cfg: ModelConfig) -> dict[str, Any]:
    """Everything the cached values depend on, as a JSON-able dict (its hash names the cache)."""
    inner = unwrap(model)
    ip = processor.image_processor
    size = getattr(ip, "size", None)
    shape = _hooks(model).shape_key(inner)
    return {
        "name_or_path": str(model_cfg.name_or_path),
        "random_init": bool(model_cfg.random_init),
        "init_seed": int(model_cfg.init_seed) if model_cfg.random_init else None,
        "precision": model_cfg.precision,
        "quantization": model_cfg.quantization,
        "image_size": shape.pop("image_size"),
        "image_processor": {
            "size": dict(size) if size is not None else None,
            "mean": list(getattr(ip, "image_mean", []) or []),
            "std": list(getattr(ip, "image_std", []) or []),
        },
        **shape,
        "weights": vision_fingerprint(model),
    }


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_index(cache_dir: str | Path) -> dict[str, Any]:
    """The cache's ``index.json``; clear errors when it is missing or from another version."""
    cache_dir = Path(cache_dir)
    path = cache_dir / INDEX_NAME
    if not path.is_file():
        raise FeatureCacheError(
            f"{cache_dir} is not a query cache (no {INDEX_NAME}); build it with "
            "'medcap features --config CONFIG --out DIR'"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FeatureCacheError(f"{path}: not valid JSON ({e}); rebuild the cache") from None
    if index.get("version") != FORMAT_VERSION or not isinstance(index.get("stage"), str):
        raise FeatureCacheError(
            f"{path}: format {index.get('version')} is not {FORMAT_VERSION}; rebuild the cache with this medcap"
        )
    return index


def _write_index(cache_dir: Path, index: dict[str, Any]) -> None:
    tmp = cache_dir / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    tmp.replace(cache_dir / INDEX_NAME)


# ---------------------------------------------------------------------------------------------
# Computing the embeddings
# ---------------------------------------------------------------------------------------------


def query_outputs(model: Any, pixel_values: Any) -> Any:
    """The vision side's output for a batch of images: what the cache stores (the family's hook)."""
    return _hooks(model).image_features(model, pixel_values)


class _ImageRows:
    """Manifest rows -> processed pixel values (decoded in DataLoader workers)."""

    def __init__(self, rows: list[Any], image_processor: Any, min_size: int | None):
        self.rows = rows
        self.image_processor = image_processor
        # Same draft-mode decode as training, so the cache holds what fit() sees.
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from medcap.data.images import read_image

        row = self.rows[i]
        try:
            image = read_image(row.image, min_size=self.min_size)
        except (OSError, ValueError) as e:
            raise FeatureCacheError(
                f"image {row.image} (id {row.id}) cannot be read: {e}; run 'medcap data prepare' again"
            ) from e
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


def cache_query_embeddings(
    model: Any,
    processor: Any,
    model_cfg: ModelConfig,
    rows_by_split: dict[str, list[Any]],
    out: str | Path,
    batch_size: int = 16,
    num_workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute and store the Q-Former outputs of every row of every split; returns the index.

    Each split is written to ``{split}.f16.tmp`` and renamed when complete, and the index is updated
    after each split, so a killed run leaves only whole splits. A cache made for other weights or
    settings (another hash) is refused unless ``overwrite``.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = cache_key(model, processor, model_cfg)
    digest = key_hash(key)
    hooks = _hooks(model)
    index: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "stage": hooks.STAGE,
        "hash": digest,
        "key": key,
        "splits": {},
    }
    if (out / INDEX_NAME).is_file():
        old = read_index(out)
        if old["hash"] != digest and not overwrite:
            raise FeatureCacheError(
                f"{out} holds a cache for other weights or settings (hash {old['hash']}, this model "
                f"{digest}): differences {_key_diff(old['key'], key)}; choose another --out or pass --overwrite"
            )
        if old["hash"] == digest:
            index["splits"] = old["splits"]
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    device = hooks.output_device(inner)
    nq, hq = hooks.feature_shape(key)
    side = model.medcap_family.image_side(processor)
    try:
        for split, rows in rows_by_split.items():
            if not rows:
                raise FeatureCacheError(f"split {split!r} has no rows to cache")
            ids = [r.id for r in rows]
            if len(set(ids)) != len(ids):
                raise FeatureCacheError(f"split {split!r} has duplicate IDs; prepare the data again")
            path = out / f"{split}.f16"
            tmp = out / f"{split}.f16.tmp"
            data = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(len(rows), nq, hq))
            loader = DataLoader(
                _ImageRows(rows, processor.image_processor, side),
                batch_size=batch_size,
                num_workers=num_workers,
                shuffle=False,
            )
            start = 0
            t0 = time.perf_counter()
            bar = tqdm(total=len(rows), desc=f"query embeddings {split}", unit="img", disable=not progress)
            with torch.no_grad():
                for pixel_values in loader:
                    q = query_outputs(model, pixel_values.to(device))
                    data[start : start + len(q)] = q.float().cpu().numpy().astype(np.float16)
                    start += len(q)
                    bar.update(len(q))
            bar.close()
            data.flush()
            del data
            os.replace(tmp, path)
            index["splits"][split] = {
                "file": path.name,
                "ids": ids,
                "shape": [len(rows), nq, hq],
                "dtype": "float16",
                "seconds": round(time.perf_counter() - t0, 2),
            }
            _write_index(out, index)
    finally:
        inner.train(was_training)
    return index


def _key_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs) or "none"


# ---------------------------------------------------------------------------------------------
# Training from the cache
# ---------------------------------------------------------------------------------------------


class CachedQueryDataset:
    """Manifest rows -> ``(cached Q-Former output [nq, hq] fp16, caption)``, read from the memmaps.

    ``collate`` builds the same text tensors as ``collator`` (the model's ``CaptionCollator``: image
    tokens, prompt, caption, EOS, labels masked at padding, image tokens and prompt) and adds
    ``query_embeds`` instead of ``pixel_values``. Index ``i`` is ``rows[i]``, as for the image dataset.
    """

    def __init__(self, cache_dir: str | Path, rows: list[Any], collator: Any):
        from PIL import Image

        self.cache_dir = Path(cache_dir)
        model_cfg = getattr(collator, "cfg", None)
        if model_cfg is not None:
            check_cacheable(model_cfg)
        self.index = read_index(self.cache_dir)
        self.collator = collator
        self.rows = list(rows)
        where: dict[str, tuple[str, int]] = {}
        for split, info in self.index["splits"].items():
            for k, id_ in enumerate(info["ids"]):
                where[id_] = (split, k)
        missing = [r.id for r in self.rows if r.id not in where]
        if missing:
            raise FeatureCacheError(
                f"{self.cache_dir}: {len(missing)} of {len(self.rows)} images have no cached embedding "
                f"(first: {', '.join(missing[:3])}); run 'medcap features' for their split "
                f"(cached splits: {', '.join(self.index['splits']) or 'none'})"
            )
        self._where = [where[r.id] for r in self.rows]
        self._maps: dict[str, np.memmap] = {}
        nq = self.index["key"]["num_query_tokens"]
        if getattr(collator, "num_query_tokens", nq) != nq:
            raise FeatureCacheError(
                f"{self.cache_dir} holds {nq} query tokens per image but the model uses "
                f"{collator.num_query_tokens}: the cache is for another model"
            )
        # The processor needs an image to build the prompt; a tiny blank one (its pixels are dropped).
        self._blank = Image.new("RGB", (8, 8))

    def _map(self, split: str) -> np.memmap:
        # Opened lazily, so each DataLoader worker maps the file itself.
        if split not in self._maps:
            info = self.index["splits"][split]
            self._maps[split] = np.memmap(
                self.cache_dir / info["file"], dtype=np.float16, mode="r", shape=tuple(info["shape"])
            )
        return self._maps[split]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        import torch

        split, k = self._where[i]
        return torch.from_numpy(np.array(self._map(split)[k])), self.rows[i].caption

    def collate(self, batch: list[tuple[Any, str]]) -> dict[str, Any]:
        import torch

        text = self.collator([(self._blank, cap) for _, cap in batch])
        text.pop("pixel_values", None)
        text["query_embeds"] = torch.stack([q for q, _ in batch])
        # forward_from_cache checks once that the model's vision side is the one that was cached.
        text["query_cache_weights"] = self.index["key"]["weights"]
        return text


def forward_from_cache(model: Any, batch: dict[str, Any]) -> Any:
    """The model's forward with the cached features (``batch["query_embeds"]``) in place of the vision
    side, through the family's hook; checks once that the model's vision side is the cached one."""
    inner = unwrap(model)
    want = batch.get("query_cache_weights")
    if want is not None and getattr(inner, "_medcap_cache_checked", None) != want:
        have = getattr(inner, "medcap_vision_fingerprint", None) or vision_fingerprint(model)
        if have != want:
            raise FeatureCacheError(
                f"the query cache was computed with other vision weights (fingerprint {want}, this model "
                f"{have}): rebuild it with 'medcap features' for this model or checkpoint"
            )
        inner._medcap_cache_checked = want
    return _hooks(model).forward(model, batch["query_embeds"], batch)


class RemovedModule:
    """Stands where the vision tower / Q-Former were: calling it says why they are gone."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise FeatureCacheError(
            f"the {self.what} was removed (strip_vision) because this model trains from cached query "
            "embeddings; caption with medcap.train.query_cache.caption_from_cache or rebuild the full model"
        )


def strip_vision(model: Any) -> int:
    """Free the frozen vision side of a model that trains from the cache; returns bytes freed.

    Records the vision dtype and weight fingerprint first (``forward_from_cache`` casts as the normal
    path would and checks the cache against the fingerprint). Small parameters the family keeps
    outside the removed modules (BLIP-2's query tokens) stay: checkpoints fingerprint them.
    """
    import torch

    inner = unwrap(model)
    hooks = _hooks(model)
    if not any(isinstance(getattr(inner, n, None), RemovedModule) for n in hooks.FROZEN):
        inner.medcap_vision_dtype = hooks.vision_dtype(inner)
        inner.medcap_vision_fingerprint = vision_fingerprint(model)
    freed = 0
    for name in hooks.FROZEN:
        module = getattr(inner, name)
        if isinstance(module, RemovedModule):
            continue
        freed += sum(p.numel() * p.element_size() for p in module.parameters())
        # Replace the submodule by a plain object: nn.Module.__setattr__ would refuse a non-Module.
        del inner._modules[name]
        object.__setattr__(inner, name, RemovedModule(f"{name} ({type(module).__name__})"))
        del module
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed


def caption_from_cache(
    model: Any,
    processor: Any,
    query_embeds: Any,
    prompt: str = "",
    max_new_tokens: int = 30,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy (or ``generate_kwargs``) captions from cached features, without the vision side."""
    return _hooks(model).caption(model, processor, query_embeds, prompt, max_new_tokens, **generate_kwargs)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
