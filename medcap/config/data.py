"""Where training and evaluation read their prepared data (the ``data`` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class DataConfig:
    """Where training and evaluation read their prepared data."""

    prepared: Path = Path("runs/demo/prepared")
    """Folder written by ``medcap data prepare`` (holds one sub-folder per split)."""
    train_split: str = "train"
    """Split trained on."""
    valid_split: str = "valid"
    """Split validated on (loss, sample captions, best checkpoint, early stopping)."""
    test_split: str = "test"
    """Split captioned by ``medcap predict`` unless told otherwise."""
    max_train_samples: int | None = None
    """Use only the first N training rows (quick runs, dry runs)."""
    max_eval_samples: int | None = None
    """Use only the first N validation/test rows."""
    num_workers: int = 2
    """DataLoader worker processes for decoding images."""

    def manifest(self, split: str) -> Path:
        """The manifest of ``split`` in the prepared folder."""
        from medcap.layout import PreparedLayout

        return PreparedLayout(self.prepared).manifest(split)


__all__ = ["DataConfig"]
