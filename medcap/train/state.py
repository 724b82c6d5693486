"""What a run keeps to survive a crash: atomic checkpoint folders, the RNG state of every process,
the position in the data, and the hash of the manifests a checkpoint was trained on."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcap.config.data import DataConfig


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


def read_hashes(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            split, sha, rows, manifest = line.split(" ", 3)
            out[split] = {"sha256": sha, "rows": int(rows), "path": manifest}
    return out


def format_hashes(hashes: dict[str, dict[str, Any]]) -> str:
    return "".join(f"{s} {h['sha256']} {h['rows']} {h['path']}\n" for s, h in hashes.items())


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
    write(begin_checkpoint_dir(root, name))
    return commit_checkpoint_dir(root, name)


def begin_checkpoint_dir(root: Path, name: str) -> Path:
    """A fresh, empty ``root/.name.tmp`` to fill (the first half of ``write_checkpoint_dir``; with
    several processes writing shards into it, they fill it between the two halves)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint_dir(root: Path, name: str) -> Path:
    """fsync ``root/.name.tmp`` and swap it in as ``root/name`` (the second half)."""
    final, tmp, old = root / name, root / f".{name}.tmp", root / f".{name}.old"
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


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
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
    """Validation loss of checkpoints/best."""
    best_step: int | None = None
    """Step of checkpoints/best: the best validation figure of train.select_by."""
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    last_valid_loss: float | None = None
    best_score: float | None = None
    """The selection metric of checkpoints/best (train.select_by a metric; None when by loss)."""
    last_score: float | None = None
    """The selection metric at the last validation."""
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    stopped_early: bool = False


def to_plain_rng(state: dict[str, Any]) -> dict[str, Any]:
    """RNG states come back from torch.load with lists where Python's random wants tuples."""
    out = dict(state)
    version, keys, gauss = state["python"]
    out["python"] = (version, tuple(keys), gauss)
    return out


def progress_metrics(progress: Progress) -> dict[str, Any]:
    return {
        "step": progress.step,
        "epoch": progress.epoch,
        "best_valid_loss": progress.best_loss,
        "best_step": progress.best_step,
        "last_valid_loss": progress.last_valid_loss,
        "best_score": progress.best_score,
        "last_score": progress.last_score,
        "nonfinite_skipped": progress.nonfinite_total,
        "stopped_early": progress.stopped_early,
    }
