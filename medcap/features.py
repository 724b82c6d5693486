"""Frozen query-embedding cache: train LoRA without running the vision side (``medcap features``).

When only the language model is adapted (the original project's LoRA on q,v) and images are not
augmented, the vision tower and the Q-Former give the same output for an image in every epoch. This
module computes that output ONCE per image and stores it, so that training reads it from disk:

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
  ``Blip2ForConditionalGeneration.forward`` does; no image is decoded and the vision tower never runs.
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

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
#: What the cache holds: the Q-Former's last hidden state, before language_projection.
STAGE = "qformer_output"


class FeatureCacheError(ValueError):
    """The query cache cannot be built or used for this config; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Is the vision side frozen?
# ---------------------------------------------------------------------------------------------


def cache_refusal(
    model_cfg: Any, data_cfg: Any = None, train_cfg: Any = None, lora_modules=None
) -> str | None:
    """Why a query cache cannot stand in for the vision side with these settings (None: it can).

    ``lora_modules``: the module names that got adapters (``model.medcap_lora_modules``), to catch a
    list of target names that reaches the vision tower or the Q-Former (``fc1`` does).
    """
    reasons = []
    if getattr(model_cfg, "full_finetune", False):
        reasons.append("model.full_finetune trains the vision tower and Q-Former")
    if getattr(model_cfg, "train_vision", False):
        reasons.append("model.train_vision trains the vision tower")
    if getattr(model_cfg, "train_qformer", False):
        reasons.append("model.train_qformer trains the Q-Former")
    peft = getattr(model_cfg, "peft", None)
    if peft is not None and peft.method != "none":
        if isinstance(peft.targets, str) and "qformer" in peft.targets:
            reasons.append(f"model.peft.targets {peft.targets!r} puts adapters on the Q-Former")
        vision_side = [n for n in (lora_modules or []) if n.split(".")[0] in ("vision_model", "qformer")]
        vision_side += [
            n
            for n in (lora_modules or [])
            if n.startswith("base_model.model.") and n.split(".")[2] in ("vision_model", "qformer")
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


def check_cacheable(model_cfg: Any, data_cfg: Any = None, train_cfg: Any = None, lora_modules=None) -> None:
    """Raise ``FeatureCacheError`` when ``cache_refusal`` has a reason."""
    reason = cache_refusal(model_cfg, data_cfg, train_cfg, lora_modules)
    if reason:
        raise FeatureCacheError(reason)


# ---------------------------------------------------------------------------------------------
# What the cached values depend on
# ---------------------------------------------------------------------------------------------


def _unwrap(model: Any) -> Any:
    """The Blip2ForConditionalGeneration inside DDP / PeftModel wrappers."""
    inner = getattr(model, "module", model)  # DDP
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


def vision_fingerprint(model: Any) -> str:
    """A hash of the vision tower, Q-Former and query tokens: names, shapes, dtypes and, per tensor,
    its first and last 64 values and its sum (cheap, and any retraining or re-seeding changes it)."""
    import torch

    inner = _unwrap(model)
    h = hashlib.sha256()
    named = []
    for prefix in ("vision_model", "qformer"):
        module = getattr(inner, prefix, None)
        if module is None or isinstance(module, RemovedModule):
            raise FeatureCacheError(f"the model's {prefix} was removed; fingerprint it before strip_vision")
        named += [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]
    named.append(("query_tokens", inner.query_tokens))
    with torch.no_grad():
        for name, p in named:
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


def cache_key(model: Any, processor: Any, model_cfg: Any) -> dict[str, Any]:
    """Everything the cached values depend on, as a JSON-able dict (its hash names the cache)."""
    inner = _unwrap(model)
    ip = processor.image_processor
    size = getattr(ip, "size", None)
    return {
        "name_or_path": str(model_cfg.name_or_path),
        "random_init": bool(model_cfg.random_init),
        "init_seed": int(model_cfg.init_seed) if model_cfg.random_init else None,
        "precision": model_cfg.precision,
        "quantization": model_cfg.quantization,
        "image_size": int(inner.config.vision_config.image_size),
        "image_processor": {
            "size": dict(size) if size is not None else None,
            "mean": list(getattr(ip, "image_mean", []) or []),
            "std": list(getattr(ip, "image_std", []) or []),
        },
        "num_query_tokens": int(inner.config.num_query_tokens),
        "qformer_hidden": int(inner.config.qformer_config.hidden_size),
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
    if index.get("version") != FORMAT_VERSION or index.get("stage") != STAGE:
        raise FeatureCacheError(
            f"{path}: format {index.get('version')}/{index.get('stage')} is not {FORMAT_VERSION}/{STAGE}; "
            "rebuild the cache with this medcap"
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
    """The Q-Former's last hidden state for a batch of images (what ``get_image_features`` computes
    before ``language_projection``), in the Q-Former's dtype. Call under ``torch.no_grad()``."""
    import torch

    inner = _unwrap(model)
    dtype = inner.vision_model.embeddings.patch_embedding.weight.dtype
    image_embeds = inner.vision_model(pixel_values=pixel_values.to(dtype), return_dict=True).last_hidden_state
    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    queries = inner.query_tokens.expand(image_embeds.shape[0], -1, -1)
    return inner.qformer(
        query_embeds=queries,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=mask,
        return_dict=True,
    ).last_hidden_state


class _ImageRows:
    """Manifest rows -> processed pixel values (decoded in DataLoader workers)."""

    def __init__(self, rows: list[Any], image_processor: Any):
        from medcap.model import image_side

        self.rows = rows
        self.image_processor = image_processor
        # Same draft-mode decode as training, so the cache holds what fit() sees.
        self.min_size = image_side(image_processor)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from medcap.data import load_image

        row = self.rows[i]
        try:
            image = load_image(row.image, min_size=self.min_size)
        except (OSError, ValueError) as e:
            raise FeatureCacheError(
                f"image {row.image} (id {row.id}) cannot be read: {e}; run 'medcap data prepare' again"
            ) from e
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


def cache_query_embeddings(
    model: Any,
    processor: Any,
    model_cfg: Any,
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
    index: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "stage": STAGE,
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
    inner = _unwrap(model)
    was_training = inner.training
    inner.eval()
    device = next(inner.language_projection.parameters()).device
    nq, hq = key["num_query_tokens"], key["qformer_hidden"]
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
                _ImageRows(rows, processor.image_processor),
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
    """The model's forward with the cached Q-Former outputs in place of the vision side.

    ``batch`` holds ``query_embeds`` ([B, nq, hq]), ``input_ids``, ``attention_mask``, ``labels`` (and
    ``decoder_attention_mask`` for T5). The query outputs are cast as ``get_image_features`` casts them
    (to the vision tower's dtype), projected by ``language_projection`` and passed to the model's own
    forward as its precomputed image features, so the scattering into the ``<image>`` positions and
    the language model run exactly as in the normal path. Returns the model output (with ``logits``).
    """
    from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

    inner = _unwrap(model)
    want = batch.get("query_cache_weights")
    if want is not None and getattr(inner, "_medcap_cache_checked", None) != want:
        have = getattr(inner, "medcap_vision_fingerprint", None) or vision_fingerprint(model)
        if have != want:
            raise FeatureCacheError(
                f"the query cache was computed with other vision weights (fingerprint {want}, this model "
                f"{have}): rebuild it with 'medcap features' for this model or checkpoint"
            )
        inner._medcap_cache_checked = want
    proj = inner.language_projection
    weight = proj.weight
    dtype = getattr(inner, "medcap_vision_dtype", None) or _vision_dtype(inner)
    q = batch["query_embeds"].to(device=weight.device).to(dtype)
    image_features = proj(q)
    features = BaseModelOutputWithVisionQformerOutputs(pooler_output=image_features)
    kwargs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch.get("attention_mask"),
        "pixel_values": None,
        "mm_encoder_outputs": {"image": features},
    }
    if not inner.config.use_decoder_only_language_model:
        kwargs["labels"] = batch["labels"]
        if "decoder_attention_mask" in batch:
            kwargs["decoder_attention_mask"] = batch["decoder_attention_mask"]
    return model(**kwargs)


def _vision_dtype(inner: Any) -> Any:
    vision = getattr(inner, "vision_model", None)
    if vision is None or isinstance(vision, RemovedModule):
        return inner.language_projection.weight.dtype
    return vision.embeddings.patch_embedding.weight.dtype


class RemovedModule:
    """Stands where the vision tower / Q-Former were: calling it says why they are gone."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise FeatureCacheError(
            f"the {self.what} was removed (strip_vision) because this model trains from cached query "
            "embeddings; caption with medcap.features.caption_from_cache or rebuild the full model"
        )


def strip_vision(model: Any) -> int:
    """Free the vision tower and Q-Former of a model that trains from the cache; returns bytes freed.

    Records the vision dtype and weight fingerprint first (``forward_from_cache`` casts as the normal
    path would and checks the cache against the fingerprint). The query tokens (32 x 768) stay:
    checkpoints fingerprint them.
    """
    import torch

    inner = _unwrap(model)
    if not isinstance(getattr(inner, "vision_model", None), RemovedModule):
        inner.medcap_vision_dtype = _vision_dtype(inner)
        inner.medcap_vision_fingerprint = vision_fingerprint(model)
    freed = 0
    for name in ("vision_model", "qformer"):
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
    """Greedy (or ``generate_kwargs``) captions from cached Q-Former outputs, without the vision side.

    Builds the inputs as ``Blip2ForConditionalGeneration.generate`` does (image tokens + BOS + prompt,
    projected queries scattered in) and calls the language model's ``generate``.
    """
    import torch
    from PIL import Image

    from medcap import model as model_lib

    inner = _unwrap(model)
    family = getattr(model, "medcap_family", None) or getattr(inner, "medcap_family", "blip2-opt")
    blank = [Image.new("RGB", (8, 8))] * len(query_embeds)
    enc = model_lib.generation_inputs(processor, blank, prompt, family)
    proj = inner.language_projection
    dtype = getattr(inner, "medcap_vision_dtype", None) or _vision_dtype(inner)
    with torch.no_grad():
        feats = proj(query_embeds.to(proj.weight.device).to(dtype))
        input_ids = enc["input_ids"].to(proj.weight.device)
        embeds = inner.get_input_embeddings()(input_ids)
        mask = (input_ids == inner.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
        inputs = {"inputs_embeds": embeds, "attention_mask": enc["attention_mask"].to(proj.weight.device)}
        if inner.config.use_decoder_only_language_model:
            inputs["input_ids"] = input_ids
        out = inner.language_model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    prompt_len = input_ids.shape[1] if inner.config.use_decoder_only_language_model else 0
    return model_lib.decode_captions(processor, out, prompt_len, family)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    """``medcap features (--config CONFIG | --checkpoint DIR) --out DIR [--split train valid]``."""
    import yaml

    from medcap import model as model_lib
    from medcap.config import ConfigError, from_dict
    from medcap.data import read_manifest
    from medcap.train import RunConfig, load_run_config

    p = argparse.ArgumentParser(
        prog="medcap features",
        description="Compute the frozen vision side's query embeddings (Q-Former outputs) once per image and "
        "store them memory-mapped in fp16, so LoRA training on the language model can skip the vision "
        "tower: train with --train.query_cache DIR. Settings can be overridden with --section.key VALUE.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="run config YAML (its model and data sections)")
    src.add_argument("--checkpoint", type=Path, help="a checkpoint folder (config.yaml + weights)")
    p.add_argument("--out", type=Path, required=True, help="cache folder (index.json + {split}.f16)")
    p.add_argument(
        "--split", nargs="+", help="splits to cache (default: the config's train and valid splits)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made for other weights")
    args, rest = p.parse_known_args(argv)
    try:
        if args.checkpoint is not None:
            cfg_path = args.checkpoint / "config.yaml"
            if not cfg_path.is_file():
                raise FeatureCacheError(f"{args.checkpoint} is not a checkpoint: no config.yaml")
            run_cfg = from_dict(RunConfig, yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {})
            if rest:
                raise ConfigError(f"overrides {rest} cannot be combined with --checkpoint")
            model, processor, _ = model_lib.load_checkpoint(args.checkpoint)
        else:
            run_cfg = load_run_config(args.config, rest)
            check_cacheable(run_cfg.model, run_cfg.data, run_cfg.train)
            model, processor = model_lib.build_model(run_cfg.model)
        check_cacheable(
            run_cfg.model, run_cfg.data, run_cfg.train, getattr(model, "medcap_lora_modules", None)
        )
        splits = args.split or [run_cfg.data.train_split, run_cfg.data.valid_split]
        rows = {s: read_manifest(run_cfg.data.manifest(s)) for s in splits}
        index = cache_query_embeddings(
            model,
            processor,
            run_cfg.model,
            rows,
            args.out,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
        )
    except (FeatureCacheError, ConfigError, FileNotFoundError) as e:
        print(f"medcap features: {e}", file=sys.stderr)
        return 2
    total = sum(info["shape"][0] for info in index["splits"].values())
    size = sum((args.out / info["file"]).stat().st_size for info in index["splits"].values())
    counts = ", ".join(f"{s}: {i['shape'][0]}" for s, i in index["splits"].items())
    print(
        f"cached {total} images ({counts}), "
        f"{size / 1e6:.1f} MB in {args.out} (hash {index['hash']}); train with --train.query_cache {args.out}"
    )
    return 0
