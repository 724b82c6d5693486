"""Where training and evaluation read their prepared data (the ``data`` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


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
    prompt_with: Literal["none", "modality", "concepts"] = "none"
    """What of an image's concepts goes into its caption prompt, before model.prompt: none; modality
    ("CT image."); concepts (its first prompt_concepts concepts by name: "Concepts: computed
    tomography, liver, mass."). Training takes them from the ground truth (manifest columns modality
    and cuis); predict, caption and the service from a concept model (--concepts CRUN)."""
    prompt_concepts: int = 5
    """prompt_with concepts: how many concepts the prompt names (the concept model's most probable)."""
    concept_names: Path | None = None
    """prompt_with concepts: the name table (CUI,Canonical name; ROCOv2's cui_mapping.csv); default:
    the cui_mapping.csv of the dataset data.prepared was prepared from; without one, CUIs stand as
    they are."""

    def __post_init__(self) -> None:
        if self.prompt_concepts < 1:
            from medcap.config.loader import ConfigError

            raise ConfigError(f"data.prompt_concepts must be at least 1, got {self.prompt_concepts}")

    def manifest(self, split: str) -> Path:
        """The manifest of ``split`` in the prepared folder."""
        from medcap.layout import PreparedLayout

        return PreparedLayout(self.prepared).manifest(split)


__all__ = ["DataConfig"]
