"""The training loop (``medcap train``): our own explicit ``fit()`` on accelerate.

Everything a reader needs to trust a run is in this file, top to bottom:

* ``TrainConfig`` / ``RunConfig``: the typed settings, loaded from YAML with dotted overrides
  (``medcap train --config configs/demo.yaml --train.lr 1e-4``);
* the data order: one list of global batches per epoch, a pure function of (seed, epoch), optionally
  bucketed by caption length, each global batch split into equal per-process slices. Because the
  order is a function and not hidden iterator state, "the position in the data" is just
  ``(epoch, batch_in_epoch)`` and a resumed run sees exactly the batches an uninterrupted one would;
* the loss: summed token cross-entropy divided by the number of label tokens in the whole optimizer
  step (all micro-batches, all processes), so gradient accumulation and DDP give the same gradient as
  one big batch (a mean of per-micro-batch means would weight short captions more);
* ``fit()``: accelerate only handles devices, DDP, mixed precision and the gradient scaler;
  accumulation, clipping, the non-finite guard, validation, sample captions, early stopping, logs
  and checkpoints are all written out here;
* checkpoints are written atomically (temporary folder, fsync, rename) as safetensors plus
  ``train_state.pt`` (optimizer, scheduler, scaler, RNG of every process, data position), next to the
  resolved config and the hash of the data manifests; resuming with another config or other data
  says exactly what differs;
* ``dry_run()``: a user's real config for a few steps with random weights of the same architecture,
  on phantom data or the first rows of their data, printing step time, peak memory and PASS/FAIL.

Run directory layout (see docs/ARCHITECTURE.md)::

    RUN/config.yaml  RUN/log.csv  RUN/samples.jsonl  RUN/tensorboard/
    RUN/checkpoints/{last,best}/  config.yaml, weights (model.save_trainable), data_hash.txt,
                                  train_state.pt (last only), metrics.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medcap.config import ConfigError, diff_configs, load_config, save_config, to_dict
from medcap.data import DataConfig, ManifestRow, load_image, read_manifest
from medcap.generate import GenerateConfig
from medcap.model import ModelConfig

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How to train: optimisation, schedule, evaluation, logging, checkpoints and resume."""

    out_dir: Path = Path("runs/demo/run")
    """Run directory: config.yaml, log.csv, samples.jsonl, tensorboard/, checkpoints/{last,best}."""
    seed: int = 0
    """Seeds Python, NumPy and torch (model init, LoRA init, dropout) and the data order."""
    epochs: int = 3
    """Passes over the training split (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; overrides epochs (the schedule spans max_steps)."""
    batch_size: int = 8
    """Micro-batch size per process. Global batch = batch_size x processes x grad_accum."""
    eval_batch_size: int | None = None
    """Batch size for validation loss (default: batch_size)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = 0.05
    """Decoupled weight decay (AdamW) for matrices; biases and norms are never decayed."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """adamw (torch) or adamw8bit (bitsandbytes: 8-bit optimizer state, a quarter of the memory)."""
    warmup_steps: int | None = None
    """Linear warmup length in optimizer steps (exclusive with warmup_ratio)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all optimizer steps, used when warmup_steps is not set."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine to 0, linear to 0, or constant."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (null: no clipping; the norm is still logged)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision. fp16 (V100, T4) uses a gradient scaler and can hit NaN losses; bf16 where the GPU has it."""
    cpu: bool = False
    """Train on the CPU even when a GPU is present."""
    cpu_threads: int | None = None
    """Torch threads when training on the CPU (null: the cores left after data.num_workers decoders,
    at least 1: more threads than cores makes every step wait on the others)."""
    pad_to_multiple_of: int | None = None
    """Round padded batch widths up to a multiple of this (null: 8 on a GPU, 1 on the CPU). Fewer
    distinct shapes means fewer per-shape kernel plans (cuDNN attention) on a GPU."""
    eval_every: int | None = None
    """Validation loss (and sample captions) every N optimizer steps (null: only at epoch ends)."""
    eval_at_epoch_end: bool = True
    """Also validate at the end of every epoch."""
    num_sample_captions: int = 4
    """Validation images captioned at each validation, printed and written to samples.jsonl."""
    patience: int | None = None
    """Early stopping: stop after this many validations without a new best loss (null: never)."""
    min_delta: float = 0.0
    """A validation loss must beat the best by more than this to count as an improvement."""
    save_every: int | None = None
    """Write checkpoints/last every N optimizer steps (it is also written at every validation and at the end)."""
    log_every: int = 10
    """Training loss, learning rate and throughput to log.csv / TensorBoard every N optimizer steps."""
    max_caption_tokens: int = 64
    """Caption tokens per example; longer captions are cut there (without an EOS: they did not end)."""
    bucket_by_length: bool = True
    """Group captions of similar length into batches (less padding), in a seeded random batch order."""
    max_nonfinite_in_row: int = 5
    """A non-finite loss or gradient skips the step; this many in a row stop the run with an error."""
    dry_run_steps: int = 3
    """--dry-run: optimizer steps to run."""
    dry_run_images: int = 16
    """--dry-run: training images (phantoms generated, or the first rows of the user's data)."""
    dry_run_batch_size: int | None = None
    """--dry-run: micro-batch size (null: batch_size on a GPU, at most 2 on a CPU, where a full-size
    model at a GPU batch takes many minutes a step; the dry run checks the config, `medcap plan`
    answers memory)."""
    query_cache: Path | None = None
    """Folder of precomputed query embeddings (medcap features): train from them without the vision tower."""
    resume: bool = False
    """Continue from out_dir/checkpoints/last when it exists (config and data must match)."""
    progress_bar: bool = True
    """Show a tqdm progress bar with loss, learning rate, samples/s and ETA."""
    tensorboard: bool = True
    """Write TensorBoard event files to out_dir/tensorboard."""

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if v is None or v <= 0:
                raise ConfigError(f"train.{name} must be a positive number, got {v!r}")

        for name in ("epochs", "batch_size", "grad_accum", "log_every", "max_nonfinite_in_row"):
            positive(name)
        for name in ("dry_run_steps", "dry_run_images", "max_caption_tokens"):
            positive(name)
        for name in (
            "max_steps",
            "eval_batch_size",
            "eval_every",
            "patience",
            "save_every",
            "dry_run_batch_size",
        ):
            positive(name, allow_none=True)
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must both be in [0, 1), got {list(self.betas)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_ratio > 0:
            raise ConfigError("set train.warmup_steps or train.warmup_ratio, not both")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"train.max_grad_norm must be positive or null, got {self.max_grad_norm}")
        if self.num_sample_captions < 0:
            raise ConfigError(f"train.num_sample_captions must be >= 0, got {self.num_sample_captions}")
        if self.min_delta < 0:
            raise ConfigError(f"train.min_delta must be >= 0, got {self.min_delta}")
        if not self.eval_at_epoch_end and self.eval_every is None and self.patience is not None:
            raise ConfigError(
                "train.patience needs validations: set train.eval_every or train.eval_at_epoch_end"
            )


@dataclass
class RunConfig:
    """Everything one training run needs; written to RUN/config.yaml and next to every checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    """Where the prepared manifests are."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which model, precision and PEFT method."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, evaluation, logging and checkpoints."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Decoding settings for the sample captions (and later for medcap predict)."""


def load_run_config(path: str | Path | None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Read a run config from YAML (``configs/*.yaml``) and apply dotted command-line overrides."""
    return load_config(RunConfig, path, overrides)


# Settings that may change between a run and its resumption without changing the result. The run
# folder and the data folder may be spelled differently (relative/absolute, moved): the checkpoint
# lives in the run folder, and the data is checked by the hash of its manifests instead.
RESUME_MAY_DIFFER = {
    "train.resume",
    "train.out_dir",
    "data.prepared",
    "train.progress_bar",
    "train.log_every",
    "train.tensorboard",
    "data.num_workers",
    "train.dry_run_steps",
    "train.dry_run_images",
    "train.dry_run_batch_size",
}


class TrainingError(RuntimeError):
    """A run cannot start or go on; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    """Too many non-finite losses in a row."""


# ----------------------------------------------------------------------------------------------
# Data: dataset, the order of batches, the hash of the manifests
# ----------------------------------------------------------------------------------------------


class CaptionDataset:
    """Manifest rows -> ``(RGB PIL image, caption)`` for ``CaptionCollator``; decoding runs in the
    loader workers."""

    def __init__(self, rows: Sequence[ManifestRow], min_size: int | None = None):
        self.rows = list(rows)
        # JPEGs are decoded at a reduced scale (Pillow draft mode) but never below the model's
        # input size: the processor resizes to that anyway, and decoding is the loader's main cost.
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, str]:
        row = self.rows[i]
        try:
            image = load_image(row.image, min_size=self.min_size)
        except (OSError, ValueError) as e:
            raise TrainingError(
                f"image {row.image} (id {row.id}) cannot be read: {e}. The manifest is out of date: "
                "run 'medcap data prepare' again"
            ) from e
        return image, row.caption


class _PassBatches:
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


def manifest_hashes(data: DataConfig) -> dict[str, dict[str, Any]]:
    """sha256 and row count of the train and validation manifests (what a checkpoint was trained on)."""
    out: dict[str, dict[str, Any]] = {}
    for split in (data.train_split, data.valid_split):
        path = data.manifest(split)
        digest = hashlib.sha256()
        rows = -1  # the header is not a row
        with path.open("rb") as f:
            for line in f:
                digest.update(line)
                rows += 1
        out[split] = {"sha256": digest.hexdigest(), "rows": max(rows, 0), "path": str(path)}
    return out


def _read_hashes(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            split, sha, rows, manifest = line.split(" ", 3)
            out[split] = {"sha256": sha, "rows": int(rows), "path": manifest}
    return out


def _format_hashes(hashes: dict[str, dict[str, Any]]) -> str:
    return "".join(f"{s} {h['sha256']} {h['rows']} {h['path']}\n" for s, h in hashes.items())


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


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


def _batch_loss(model: Any, batch: dict[str, Any], decoder_only: bool, features: Any) -> Any:
    """Forward one micro-batch and return the summed token loss."""
    labels = batch["labels"]
    if features is not None:
        out = features.forward_from_cache(model, batch)
    else:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids", "captions")}
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


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic folders, train state, RNG
# ----------------------------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint_dir(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Write ``root/name`` atomically: fill ``root/.name.tmp``, fsync it, then swap it in by renames.

    A crash at any moment leaves either the previous folder (possibly parked as ``.name.old``) or the
    new one complete; ``recover_checkpoint_dir`` puts things back in place.
    """
    root.mkdir(parents=True, exist_ok=True)
    final, tmp, old = root / name, root / f".{name}.tmp", root / f".{name}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    if old.exists():
        shutil.rmtree(old)
    return final


def recover_checkpoint_dir(root: Path, name: str) -> Path | None:
    """After a crash: bring back a parked complete checkpoint, drop a half-written one."""
    final, tmp, old = root / name, root / f".{name}.tmp", root / f".{name}.old"
    if tmp.exists():
        shutil.rmtree(tmp)  # never known to be complete: the rename is the commit point
    if not final.exists() and old.exists():
        os.rename(old, final)
    elif old.exists():
        shutil.rmtree(old)
    return final if final.exists() else None


def _rng_state() -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Progress:
    """Where a run is; saved in train_state.pt and restored on resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    best_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    last_valid_loss: float | None = None
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    stopped_early: bool = False


# ----------------------------------------------------------------------------------------------
# Logs: log.csv, samples.jsonl, TensorBoard
# ----------------------------------------------------------------------------------------------

LOG_COLUMNS = [
    "step",
    "epoch",
    "split",
    "loss",
    "lr",
    "samples_per_s",
    "tokens_per_s",
    "grad_norm",
    "nonfinite_skipped",
    "elapsed_s",
]


def _truncate_after(path: Path, step: int, is_csv: bool) -> None:
    """Drop log lines written after ``step`` (a killed run logged steps its checkpoint never saw)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if is_csv:
        head, body = lines[:1], lines[1:]
        keep = [ln for ln in body if ln.strip() and int(ln.split(",", 1)[0]) <= step]
        text = "".join(head + keep)
    else:
        keep = []
        for ln in lines:
            try:
                if json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (ValueError, KeyError):
                pass  # a torn last line from the kill
        text = "".join(keep)
    path.write_text(text, encoding="utf-8")


class RunLog:
    """Appends to RUN/log.csv and RUN/samples.jsonl and writes TensorBoard scalars (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.csv_path = run_dir / "log.csv"
        self.samples_path = run_dir / "samples.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:
            _truncate_after(self.csv_path, resume_step, is_csv=True)
            _truncate_after(self.samples_path, resume_step, is_csv=False)
        new = not self.csv_path.is_file() or self.csv_path.stat().st_size == 0
        self._csv_file = self.csv_path.open("a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=LOG_COLUMNS)
        if new:
            self._csv.writeheader()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def row(self, **values: Any) -> None:
        if not self.enabled:
            return
        self._csv.writerow(
            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items() if k in LOG_COLUMNS}
        )
        self._csv_file.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "samples_per_s", "grad_norm"):
                v = values.get(key)
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(f"{values['split']}/{key}", v, values["step"])

    def samples(self, step: int, epoch: float, items: list[dict[str, str]]) -> None:
        if not self.enabled or not items:
            return
        with self.samples_path.open("a", encoding="utf-8") as f:
            for item in items:
                f.write(
                    json.dumps({"step": step, "epoch": round(epoch, 4), **item}, ensure_ascii=False) + "\n"
                )
        if self.tb is not None:
            text = "\n\n".join(
                f"**{i['id']}**  \nref: {i['reference']}  \npred: {i['prediction']}" for i in items
            )
            self.tb.add_text("samples", text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._csv_file.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------
# fit()
# ----------------------------------------------------------------------------------------------


def _lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup, then the decay."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _make_optimizer(params: list[Any], cfg: TrainConfig) -> Any:
    # Decay matrices only: decaying biases and norm gains shrinks them for no regularisation benefit.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
            raise TrainingError(
                "train.optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes"
            ) from e
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas)
    import torch

    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _peak_memory_gb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _load_features_module() -> Any:
    try:
        import medcap.features as features
    except ImportError as e:
        raise TrainingError(
            f"train.query_cache is set but medcap.features cannot be imported ({e}); "
            "unset train.query_cache to train through the vision tower"
        ) from e
    for name in ("CachedQueryDataset", "forward_from_cache"):
        if not hasattr(features, name):
            raise TrainingError(
                f"train.query_cache is set but medcap.features has no {name}; "
                "unset train.query_cache to train through the vision tower"
            )
    return features


def _check_resume(cfg: RunConfig, ckpt: Path, hashes: dict[str, dict[str, Any]]) -> None:
    """Refuse to resume from a checkpoint trained with other settings or other data, saying what differs."""
    saved = load_run_config(ckpt / "config.yaml")
    diffs = [d for d in diff_configs(saved, cfg) if d.split(":", 1)[0] not in RESUME_MAY_DIFFER]
    problems = [f"  config {d}" for d in diffs]
    saved_hashes = _read_hashes(ckpt / "data_hash.txt")
    for split, h in hashes.items():
        old = saved_hashes.get(split)
        if old is None:
            problems.append(f"  data: the checkpoint has no hash for split {split!r}")
        elif old["sha256"] != h["sha256"]:
            problems.append(
                f"  data: {split} manifest {h['path']} changed since the checkpoint "
                f"(sha256 {old['sha256'][:12]} -> {h['sha256'][:12]}, rows {old['rows']} -> {h['rows']})"
            )
    if problems:
        raise TrainingError(
            f"cannot resume from {ckpt}: it was trained with other settings or data (checkpoint -> now):\n"
            + "\n".join(problems)
            + "\nResume with the original config and data, or start a new run in another train.out_dir."
        )


def fit(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data`` as ``cfg.train`` says; returns a summary dict.

    Launch with ``python -m medcap train`` for one process or ``accelerate launch -m medcap train``
    for several (DDP). Raises ``TrainingError`` with an actionable message when the run cannot
    start (missing data, a checkpoint in the way, a resume mismatch) or cannot go on (non-finite
    losses in a row).
    """
    from medcap.model import import_backends

    # Here, not in the frame that holds the model, optimizer and loaders: see import_backends.
    import_backends()
    return _fit(cfg)


def _fit(cfg: RunConfig) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from medcap import model as model_lib

    tc = cfg.train
    run_dir = Path(tc.out_dir)
    ckpt_root = run_dir / "checkpoints"
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        cpu=tc.cpu,
        # find_unused_parameters costs a graph walk per step; frozen parameters are not "unused".
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if accelerator.device.type == "cpu":
        threads = tc.cpu_threads or max(1, (os.cpu_count() or 1) // world - cfg.data.num_workers)
        torch.set_num_threads(threads)
    elif accelerator.device.type == "cuda":
        # cuDNN attention builds a plan per new batch shape (about 1 s each on H100): see
        # model.set_cuda_attention_backends; bucketed batches would pay it on most steps.
        model_lib.set_cuda_attention_backends(cudnn=False)
        # Bucketed batches change size every step: without this the allocator's reserve grows well
        # past what is allocated (model.set_cuda_allocator_defaults).
        model_lib.set_cuda_allocator_defaults()

    def say(msg: str) -> None:
        if main:
            tqdm.write(msg)

    # --- what to resume from --------------------------------------------------------------
    last_dir = None
    if main:
        last_dir = recover_checkpoint_dir(ckpt_root, "last")
        recover_checkpoint_dir(ckpt_root, "best")
    accelerator.wait_for_everyone()
    last_dir = ckpt_root / "last" if (ckpt_root / "last" / "train_state.pt").is_file() else None
    if last_dir is not None and not tc.resume:
        raise TrainingError(
            f"{run_dir} already holds a checkpoint ({last_dir}). Continue it with --train.resume true "
            f"(or 'medcap train --resume {run_dir}'), or choose another train.out_dir"
        )

    # --- data ------------------------------------------------------------------------------
    train_rows = read_manifest(cfg.data.manifest(cfg.data.train_split), cfg.data.max_train_samples)
    valid_rows = read_manifest(cfg.data.manifest(cfg.data.valid_split), cfg.data.max_eval_samples)
    if not train_rows:
        raise TrainingError(f"{cfg.data.manifest(cfg.data.train_split)} has no rows: nothing to train on")
    if not valid_rows:
        raise TrainingError(f"{cfg.data.manifest(cfg.data.valid_split)} has no rows: nothing to validate on")
    hashes = manifest_hashes(cfg.data)
    if last_dir is not None:
        _check_resume(cfg, last_dir, hashes)

    # --- model -----------------------------------------------------------------------------
    set_seed(tc.seed)  # same seed in every process: identical init (DDP also broadcasts rank 0's)
    model, processor = model_lib.build_model(cfg.model, verbose=main)
    family = model.medcap_family
    decoder_only = model_lib.DECODER_ONLY[family]
    pad_multiple = tc.pad_to_multiple_of or (8 if accelerator.device.type == "cuda" else 1)
    collator = _make_collator(
        model_lib, processor, cfg.model, tc.max_caption_tokens, decoder_only, pad_multiple
    )
    # The model's input side: JPEGs decode in draft mode to no less than it (data.load_image).
    image_side = model_lib.image_side(processor)
    features = _load_features_module() if tc.query_cache is not None else None
    if features is not None:
        train_ds = features.CachedQueryDataset(tc.query_cache, train_rows, collator)
        valid_ds = features.CachedQueryDataset(tc.query_cache, valid_rows, collator)
        collate = getattr(train_ds, "collate", collator)
    else:
        train_ds = CaptionDataset(train_rows, min_size=image_side)
        valid_ds = CaptionDataset(valid_rows, min_size=image_side)
        collate = collator
    tokenizer = getattr(processor, "tokenizer", processor)
    train_len = [
        len(x) for x in tokenizer([r.caption for r in train_rows], add_special_tokens=False)["input_ids"]
    ]
    valid_len = [
        len(x) for x in tokenizer([r.caption for r in valid_rows], add_special_tokens=False)["input_ids"]
    ]

    global_batch = tc.batch_size * world
    batches_per_epoch = math.ceil(len(train_rows) / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.grad_accum)
    total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * steps_per_epoch
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(tc.warmup_ratio * total_steps)
    eval_bs = tc.eval_batch_size or tc.batch_size
    my_eval_batches = eval_batches(valid_len, eval_bs, rank, world)

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError(
            "the model has no trainable parameters: check model.peft / model.train_* settings"
        )
    optimizer = _make_optimizer(trainable, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tc.schedule, warmup, total_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    progress = Progress()
    if last_dir is not None:
        model_lib.load_trainable(accelerator.unwrap_model(model), last_dir)
        state = torch.load(last_dir / "train_state.pt", map_location="cpu", weights_only=True)
        if state["world_size"] != world:
            raise TrainingError(
                f"cannot resume from {last_dir}: it was written by {state['world_size']} processes, "
                f"this run has {world}; the data order and RNG streams depend on it"
            )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        _set_rng_state(_to_plain_rng(state["rng"][rank]))
        say(
            f"resumed from {last_dir} at step {progress.step} (epoch {progress.epoch}, batch {progress.batch_in_epoch})"
        )
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    log = RunLog(run_dir, main, tc.tensorboard, progress.step if last_dir is not None else None)
    n_trainable = sum(p.numel() for p in trainable)
    say(
        f"training {len(train_rows)} images ({batches_per_epoch} global batches of {global_batch}, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps), validating on {len(valid_rows)}; "
        f"{n_trainable:,} trainable parameters; {world} process(es) on {device}, "
        f"mixed precision {tc.mixed_precision}"
    )

    # One DataLoader per dataset for the whole run, its batches replaced before each pass: with
    # workers, the same processes serve every epoch and every validation instead of a fork and a
    # warm-up each time (0.16 s a pass measured on 2 cores, ~66 passes in the demo). The decoding
    # draws no random numbers, so worker seeds do not matter.
    loaders: dict[int, Any] = {}

    def loader(indices: list[list[int]], dataset: Any) -> Iterator[dict[str, Any]]:
        dl = loaders.get(id(dataset))
        if dl is None:
            dl = loaders[id(dataset)] = DataLoader(
                dataset,
                batch_sampler=_PassBatches(),
                collate_fn=collate,
                num_workers=cfg.data.num_workers,
                persistent_workers=cfg.data.num_workers > 0,
                # A private generator: starting a pass must not draw from the global torch RNG,
                # or a resumed run (which starts one mid-epoch) would see other dropout masks.
                generator=torch.Generator().manual_seed(tc.seed * 1_000_003),
                pin_memory=device.type == "cuda",
            )
        dl.batch_sampler.batches = indices
        for batch in dl:
            yield {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}

    def validate() -> float:
        """Mean token loss over the whole validation split (exact over processes)."""
        net = accelerator.unwrap_model(model)
        net.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad(), accelerator.autocast():
            for batch in loader(my_eval_batches, valid_ds):
                total[0] += _batch_loss(net, batch, decoder_only, features).double()
                total[1] += label_token_count(batch["labels"], decoder_only)
        total = accelerator.reduce(total, "sum")
        net.train()
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def sample_captions() -> list[dict[str, str]]:
        rows = valid_rows[: tc.num_sample_captions]
        if not rows or not main:
            return []
        net = accelerator.unwrap_model(model)
        net.eval()
        images = [load_image(r.image, min_size=image_side) for r in rows]
        with torch.no_grad(), accelerator.autocast():
            preds = _caption(net, processor, images, cfg)
        net.train()
        return [
            {"id": r.id, "reference": r.caption, "prediction": p} for r, p in zip(rows, preds, strict=True)
        ]

    def save_last() -> None:
        states = gather_object([_rng_state()])
        if not main:
            accelerator.wait_for_everyone()
            return
        train_state = {
            "progress": dataclasses.asdict(progress),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "rng": states,
            "world_size": world,
        }

        def write(d: Path) -> None:
            model_lib.save_trainable(accelerator.unwrap_model(model), d)
            save_config(cfg, d / "config.yaml")
            (d / "data_hash.txt").write_text(_format_hashes(hashes), encoding="utf-8")
            torch.save(train_state, d / "train_state.pt")
            (d / "metrics.json").write_text(json.dumps(_metrics(progress), indent=1), encoding="utf-8")

        write_checkpoint_dir(ckpt_root, "last", write)
        accelerator.wait_for_everyone()

    def save_best() -> None:
        if main:

            def write(d: Path) -> None:
                model_lib.save_trainable(accelerator.unwrap_model(model), d)
                save_config(cfg, d / "config.yaml")
                (d / "data_hash.txt").write_text(_format_hashes(hashes), encoding="utf-8")
                (d / "metrics.json").write_text(json.dumps(_metrics(progress), indent=1), encoding="utf-8")

            write_checkpoint_dir(ckpt_root, "best", write)
        accelerator.wait_for_everyone()

    def run_validation(epoch_f: float) -> bool:
        """Validate, log, keep the best; returns True when early stopping says stop."""
        loss = validate()
        progress.last_eval_step = progress.step
        progress.last_valid_loss = loss
        improved = math.isfinite(loss) and (
            progress.best_loss is None or loss < progress.best_loss - tc.min_delta
        )
        if improved:
            progress.best_loss, progress.best_step = loss, progress.step
            progress.evals_without_improvement = 0
        else:
            progress.evals_without_improvement += 1
        log.row(
            step=progress.step,
            epoch=round(epoch_f, 4),
            split="valid",
            loss=loss,
            lr=scheduler.get_last_lr()[0],
            elapsed_s=round(time.perf_counter() - t_start, 2),
        )
        samples = sample_captions()
        log.samples(progress.step, epoch_f, samples)
        best = (
            f"{progress.best_loss:.4f} @ step {progress.best_step}"
            if progress.best_loss is not None
            else "n/a"
        )
        say(f"[step {progress.step}] validation loss {loss:.4f} (best {best})")
        for s in samples:
            say(f"  {s['id']}\n    reference:  {s['reference']}\n    prediction: {s['prediction']}")
        if improved:
            save_best()
        if tc.patience is not None and progress.evals_without_improvement >= tc.patience:
            progress.stopped_early = True
            say(f"early stopping: {tc.patience} validations without improvement (best {best})")
            return True
        return False

    # --- the loop --------------------------------------------------------------------------
    model.train()
    t_start = time.perf_counter()
    window = {"t": time.perf_counter(), "samples": 0, "tokens": 0, "loss": 0.0, "n": 0}
    step_times: list[float] = []
    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        disable=not (main and tc.progress_bar),
        desc="train",
        dynamic_ncols=True,
        unit="step",
    )
    stop = progress.stopped_early or progress.step >= total_steps
    while not stop:
        batches = epoch_batches(train_len, global_batch, tc.seed, progress.epoch, tc.bucket_by_length)
        mine = [b[rank * tc.batch_size : (rank + 1) * tc.batch_size] for b in batches]
        it = loader(mine[progress.batch_in_epoch :], train_ds)
        while progress.batch_in_epoch < len(batches) and not stop:
            t_step = time.perf_counter()
            n_micro = min(tc.grad_accum, len(batches) - progress.batch_in_epoch)
            micro = [next(it) for _ in range(n_micro)]
            local_tokens = sum(label_token_count(b["labels"], decoder_only) for b in micro)
            n_tokens = accelerator.reduce(local_tokens.to(device).clone(), "sum").clamp(min=1)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i, batch in enumerate(micro):
                sync = contextlib.nullcontext() if i == n_micro - 1 else accelerator.no_sync(model)
                with sync:
                    s = _batch_loss(model, batch, decoder_only, features)
                    # DDP averages gradients over processes: scale by world so the result is the
                    # gradient of (sum of all token losses) / (all label tokens of the step).
                    accelerator.backward(s * world / n_tokens)
                loss_sum += s.detach().double()
            step_loss = float(accelerator.reduce(loss_sum, "sum") / n_tokens)
            grad_norm = accelerator.clip_grad_norm_(trainable, tc.max_grad_norm or float("inf"))
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            finite = math.isfinite(step_loss) and (math.isfinite(grad_norm) or accelerator.scaler is not None)
            if finite:
                optimizer.step()
                progress.nonfinite_in_row = 0
            else:
                if accelerator.scaler is not None:
                    optimizer.step()  # the scaler sees the inf/NaN gradients, skips and lowers its scale
                progress.nonfinite_total += 1
                progress.nonfinite_in_row += 1
            optimizer.zero_grad(set_to_none=True)
            # The schedule follows the data even over a skipped step, so lr and position stay aligned
            # (torch warns when the very first optimizer step was the one skipped: expected here).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                scheduler.step()
            progress.step += 1
            progress.batch_in_epoch += n_micro
            progress.samples_seen += n_micro * global_batch
            epoch_f = progress.epoch + progress.batch_in_epoch / len(batches)
            if not finite:
                say(
                    f"[step {progress.step}] non-finite loss {step_loss} / grad norm {grad_norm}: step skipped "
                    f"({progress.nonfinite_in_row} in a row, {progress.nonfinite_total} in all)"
                )
                if progress.nonfinite_in_row >= tc.max_nonfinite_in_row:
                    bar.close()
                    log.close()
                    raise NonFiniteLossError(
                        f"{progress.nonfinite_in_row} non-finite losses in a row at step {progress.step}: "
                        f"training diverged. The last good checkpoint is {ckpt_root / 'last'} (if any). "
                        "Lower train.lr, raise train.warmup_steps, keep train.max_grad_norm set, or use "
                        "bf16 instead of fp16 mixed precision"
                    )
            else:
                window["loss"] += step_loss
                window["n"] += 1
            window["samples"] += n_micro * global_batch
            window["tokens"] += int(n_tokens)
            step_times.append(time.perf_counter() - t_step)
            lr_now = scheduler.get_last_lr()[0]
            if progress.step % tc.log_every == 0 or progress.step == total_steps:
                dt = max(time.perf_counter() - window["t"], 1e-9)
                mean_loss = window["loss"] / window["n"] if window["n"] else float("nan")
                log.row(
                    step=progress.step,
                    epoch=round(epoch_f, 4),
                    split="train",
                    loss=mean_loss,
                    lr=lr_now,
                    samples_per_s=round(window["samples"] / dt, 3),
                    tokens_per_s=round(window["tokens"] / dt, 1),
                    grad_norm=grad_norm,
                    nonfinite_skipped=progress.nonfinite_total,
                    elapsed_s=round(time.perf_counter() - t_start, 2),
                )
                bar.set_postfix(
                    loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}", sps=f"{window['samples'] / dt:.1f}"
                )
                window = {"t": time.perf_counter(), "samples": 0, "tokens": 0, "loss": 0.0, "n": 0}
            bar.update(1)

            epoch_done = progress.batch_in_epoch >= len(batches)
            finished = progress.step >= total_steps
            do_eval = (
                (tc.eval_every is not None and progress.step % tc.eval_every == 0)
                or (epoch_done and tc.eval_at_epoch_end)
                or finished
            )
            if epoch_done:
                progress.epoch += 1
                progress.batch_in_epoch = 0
            saved = False
            if do_eval:
                stop = run_validation(epoch_f)
                save_last()
                saved = True
            stop = stop or finished
            if not saved and (
                epoch_done or stop or (tc.save_every is not None and progress.step % tc.save_every == 0)
            ):
                save_last()
            if epoch_done:
                break  # the next epoch has its own batch order
    bar.close()
    log.close()
    # Persistent workers end with their loaders; without this they would live on (idle, holding
    # memory) for as long as anything refers to this frame, e.g. while `medcap run` predicts.
    it = None
    loaders.clear()

    timed = step_times[1:] or step_times
    result = _metrics(progress)
    result.update(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        trainable_parameters=n_trainable,
        seconds_per_step=sum(timed) / len(timed) if timed else float("nan"),
        peak_memory_gb=_peak_memory_gb(device),
        wall_s=time.perf_counter() - t_start,
        run_dir=str(run_dir),
    )
    if main:
        (run_dir / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    say(
        f"done: {progress.step} steps, last validation loss {progress.last_valid_loss:.4f}, best "
        f"{progress.best_loss:.4f} at step {progress.best_step}; checkpoints in {ckpt_root}"
        if progress.best_loss is not None
        else f"done: {progress.step} steps; checkpoints in {ckpt_root}"
    )
    return result


def _to_plain_rng(state: dict[str, Any]) -> dict[str, Any]:
    """RNG states come back from torch.load with lists where Python's random wants tuples."""
    out = dict(state)
    version, keys, gauss = state["python"]
    out["python"] = (version, tuple(keys), gauss)
    return out


def _metrics(progress: Progress) -> dict[str, Any]:
    return {
        "step": progress.step,
        "epoch": progress.epoch,
        "best_valid_loss": progress.best_loss,
        "best_step": progress.best_step,
        "last_valid_loss": progress.last_valid_loss,
        "nonfinite_skipped": progress.nonfinite_total,
        "stopped_early": progress.stopped_early,
    }


def _make_collator(
    model_lib: Any,
    processor: Any,
    model_cfg: Any,
    max_caption_tokens: int,
    decoder_only: bool,
    pad_to_multiple_of: int = 1,
) -> Any:
    """A CaptionCollator whose length cap keeps ``max_caption_tokens`` caption tokens plus the EOS.

    The collator's ``max_length`` counts the whole decoder-only sequence (image tokens and prompt
    included), so the fixed prefix is measured first.
    """
    if not decoder_only:
        return model_lib.CaptionCollator(
            processor, model_cfg, max_length=max_caption_tokens + 1, pad_to_multiple_of=pad_to_multiple_of
        )
    probe = model_lib.CaptionCollator(processor, model_cfg, max_length=1 << 20)
    return model_lib.CaptionCollator(
        processor,
        model_cfg,
        max_length=len(probe.prompt_ids) + max_caption_tokens + 1,
        pad_to_multiple_of=pad_to_multiple_of,
    )


def _caption(model: Any, processor: Any, images: list[Any], cfg: RunConfig) -> list[str]:
    """Captions for sample images with the run's decoding settings (medcap.generate)."""
    from medcap import generate

    return generate.caption_images(model, processor, images, cfg.generate, cfg.model.prompt)


# ----------------------------------------------------------------------------------------------
# Dry run
# ----------------------------------------------------------------------------------------------


def dry_run(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg`` for ``train.dry_run_steps`` steps with random weights of the same architecture.

    Uses the first ``train.dry_run_images`` rows of the configured data when its manifests exist,
    otherwise a small phantom dataset generated into a temporary folder. Nothing is written next to
    the real run. On a CPU it runs smaller (``_dry_run_cpu_settings``: micro-batch at most 2, at most
    2 accumulated, every core, no half precision the CPU multiplies only slowly) and says so. Returns fit()'s
    summary plus ``data`` (which data was used), ``batch_size`` and ``cpu_adjustments``.
    """
    import torch

    tc = cfg.train
    with tempfile.TemporaryDirectory(prefix="medcap-dry-run-") as tmp_name:
        tmp = Path(tmp_name)
        data = cfg.data
        have_data = data.manifest(data.train_split).is_file() and data.manifest(data.valid_split).is_file()
        if have_data:
            source = f"first {tc.dry_run_images} rows of {data.prepared}"
        else:
            source = f"{tc.dry_run_images} phantom images (no manifests at {data.prepared})"
            data = dataclasses.replace(
                data,
                prepared=_dry_run_phantoms(tmp, tc.dry_run_images, tc.seed),
                train_split="train",
                valid_split="valid",
            )
        data = dataclasses.replace(
            data,
            max_train_samples=tc.dry_run_images,
            max_eval_samples=max(2, tc.dry_run_images // 4),
        )
        model = dataclasses.replace(cfg.model, random_init=True)
        train = dataclasses.replace(
            tc,
            batch_size=tc.dry_run_batch_size or tc.batch_size,
            out_dir=tmp / "run",
            max_steps=tc.dry_run_steps,
            eval_every=None,
            save_every=None,
            patience=None,
            resume=False,
            num_sample_captions=min(tc.num_sample_captions, 1),
            log_every=1,
        )
        notes: list[str] = []
        if tc.cpu or not torch.cuda.is_available():
            model, train, notes = _dry_run_cpu_settings(model, train)
        print(
            f"dry run: {cfg.model.name_or_path} with random weights, {tc.dry_run_steps} steps of "
            f"{train.grad_accum} micro-batch(es) of {train.batch_size} on {source}"
        )
        for note in notes:
            print(f"  on this CPU: {note}")
        result = fit(dataclasses.replace(cfg, data=data, model=model, train=train))
        result["data"] = source
        result["batch_size"] = train.batch_size
        result["cpu_adjustments"] = notes
    return result


def _dry_run_cpu_settings(
    model: ModelConfig, train: TrainConfig
) -> tuple[ModelConfig, TrainConfig, list[str]]:
    """What a dry run changes on a CPU so that a GPU config's full-size model finishes in minutes.

    The dry run checks that the config builds, trains (accumulation included), validates, captions
    and checkpoints; memory is `medcap plan`'s question. Measured on 2 cores with native bf16, the
    V100 config (6.7B fp16, batch 8 x 4 accumulated, checkpointing, 6 loader workers) took one torch
    thread and 8 minutes for its first step; micro-batch 2 took 80 s each on the fp32 path.
    Returns the changed settings and one line per change.
    """
    from medcap.model import cpu_has_native_half_matmul

    notes = []
    batch = train.dry_run_batch_size or min(train.batch_size, 2)
    if batch != train.batch_size:
        notes.append(
            f"micro-batch {batch} instead of train.batch_size {train.batch_size} (set train.dry_run_batch_size to choose)"
        )
    accum = min(train.grad_accum, 2)  # two micro-batches still go through the accumulation path
    if accum != train.grad_accum:
        notes.append(
            f"{accum} accumulated micro-batches a step instead of train.grad_accum {train.grad_accum}"
        )
    # fit() leaves a core to each loader worker (a GPU config asks for several); the dry run's loaders
    # decode a handful of images, so the model gets every core of its process.
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    threads = train.cpu_threads or max(1, (os.cpu_count() or 1) // world)
    train = dataclasses.replace(
        train,
        batch_size=batch,
        grad_accum=accum,
        eval_batch_size=min(train.eval_batch_size or train.batch_size, batch),
        cpu_threads=threads,
    )
    # Half precision the CPU cannot multiply natively: bitsandbytes layers multiply in the compute
    # dtype (measured: a 6.7B QLoRA fp16 micro-batch of 2 had not finished its backward after 7
    # minutes), plain layers through fp32 (model.cpu_fp32_matmul, 3-5x slower than native bf16).
    # Random weights make the half format's numerics moot; the config was checked as written.
    compute = model.compute_dtype if model.compute_dtype != "auto" else model.precision
    slow = {h for h in ("fp16", "bf16") if not cpu_has_native_half_matmul(h)}
    if compute in slow and (model.quantization != "none" or "bf16" not in slow):
        to = "bf16" if "bf16" not in slow else "fp32"  # fp32: only bnb layers lack the fp32 path
        model = dataclasses.replace(
            model,
            precision=to if model.precision in slow else model.precision,
            compute_dtype=to if model.compute_dtype in slow else model.compute_dtype,
        )
        if train.mixed_precision in slow:
            train = dataclasses.replace(train, mixed_precision="bf16" if to == "bf16" else "no")
        native = ", bf16 natively" if to == "bf16" else ""
        notes.append(f"{to} instead of {compute} (this CPU multiplies {compute} only slowly{native})")
    return model, train, notes


def _dry_run_phantoms(tmp: Path, n: int, seed: int) -> Path:
    """Generate and prepare a small phantom dataset; returns the prepared folder."""
    from medcap import data as data_lib
    from medcap import phantoms

    root, prepared = tmp / "phantoms", tmp / "prepared"
    # n training images plus a quarter of that for validation and test.
    # Small images: the dry run checks the pipeline, and the processor resizes them anyway.
    phantoms.make_phantoms(root, n=n + 2 * max(2, n // 4), seed=seed, size_range=(96, 192), progress=False)
    code = data_lib.cli_prepare([str(root), "--out", str(prepared), "--color-policy", "all"])
    if code != 0:
        raise TrainingError(f"dry run: preparing the phantom data in {root} failed (exit code {code})")
    return prepared


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the help text of its settings)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def cli(argv: list[str]) -> int:
    """``medcap train --config CONFIG [--dry-run] [--resume RUN] [--section.key VALUE ...]``."""
    defaults = TrainConfig()
    settings = "\n".join(
        f"  --train.{name:<22} {doc} (default: {to_dict(getattr(defaults, name))})"
        for name, doc in field_docs(TrainConfig).items()
    )
    p = argparse.ArgumentParser(
        prog="medcap train",
        description="Fine-tune a captioning model on prepared manifests. Any setting can be overridden "
        "with --section.key VALUE (e.g. --train.lr 1e-4 --model.peft.r 8); sections are data, model, "
        "train and generate (see configs/*.yaml).",
        epilog=f"train settings:\n{settings}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="run config YAML (see configs/); without it, the defaults")
    p.add_argument(
        "--resume", type=Path, metavar="RUN", help="continue the run in RUN from its last checkpoint"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="a few steps with random weights of the same architecture on phantom or the first rows of data",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = p.parse_known_args(argv)
    try:
        overrides = list(rest)
        path = args.config
        if args.resume is not None:
            saved = Path(args.resume) / "config.yaml"
            if path is None:
                if not saved.is_file():
                    raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run directory?")
                path = saved
            overrides += ["--train.resume", "true", "--train.out_dir", str(args.resume)]
        cfg = load_run_config(path, overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.dry_run:
            try:
                result = dry_run(cfg)
            except Exception as e:  # a dry run exists to surface any failure, with its reason
                if not isinstance(e, ConfigError | TrainingError | FileNotFoundError):
                    traceback.print_exc()
                print(f"DRY RUN FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                return 1
            print(
                f"dry run: {result['step']} steps, {result['seconds_per_step']:.2f} s/step, "
                f"peak memory {result['peak_memory_gb']:.2f} GB, validation loss {result['last_valid_loss']:.4f}"
            )
            print("DRY RUN PASSED: the config builds, trains, validates, captions and checkpoints")
            return 0
        fit(cfg)
        return 0
    except ConfigError as e:
        print(f"medcap train: config error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, FileNotFoundError) as e:
        print(f"medcap train: error: {e}", file=sys.stderr)
        return 1
