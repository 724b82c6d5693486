"""A concept-detection run's whole configuration (``medcap concepts train``): the same ``data`` and
``model`` sections as ``medcap train`` (the model's frozen vision side gives the features), the
classifier (``concepts``) and its training (``train``). Written to ``CRUN/config.yaml`` and next to
every checkpoint; ``medcap concepts train --config NAME`` finds the shipped ones
(``medcap/config/recipes/concepts/``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medcap.config.data import DataConfig
from medcap.config.loader import ConfigError, load_config
from medcap.config.model import ModelConfig
from medcap.config.train import REPORT_TO

#: The shipped concept-detection configs, found by name.
CONCEPT_RECIPES_DIR = Path(__file__).resolve().parent / "recipes" / "concepts"


@dataclass
class ConceptHeadConfig:
    """The concept classifier: its vocabulary, head, loss and decision thresholds."""

    min_freq: int = 5
    """A CUI enters the vocabulary when at least this many training images have it (rarer ones are
    counted as out of the vocabulary and never predicted)."""
    head: Literal["linear", "mlp"] = "linear"
    """linear: one layer on the pooled features; mlp: one hidden layer (GELU, dropout)."""
    hidden: int = 512
    """Hidden width of the mlp head."""
    dropout: float = 0.1
    """Dropout on the pooled features (and the mlp's hidden layer) while training."""
    pool: Literal["mean", "concat"] = "mean"
    """How the vision side's tokens (BLIP-2: the query embeddings) become one vector: their mean, or
    all of them side by side (tokens x width inputs: more parameters, keeps which query said what)."""
    loss: Literal["bce", "pos_weight", "class_balanced"] = "class_balanced"
    """bce: plain binary cross-entropy; pos_weight: positives weighted by negatives/positives of each
    CUI (capped at max_pos_weight); class_balanced: each CUI weighted by the inverse effective number
    of its training images, (1 - beta) / (1 - beta^n) (Cui et al., CVPR 2019), normalised to mean 1."""
    cb_beta: float = 0.999
    """class_balanced: beta of the effective number (0.99-0.9999; closer to 1 weights rare CUIs more)."""
    max_pos_weight: float = 100.0
    """pos_weight: the largest weight a rare CUI's positives get."""
    threshold: Literal["global", "per_label"] = "per_label"
    """global: one probability threshold for every CUI, tuned on the validation split for the official
    per-image F1; per_label: then each CUI's own (CUIs with fewer than min_label_positives validation
    images keep the global one)."""
    min_label_positives: int = 5
    """per_label: validation images a CUI needs before it gets its own threshold."""
    at_least_one: bool = True
    """Predict the most probable CUI for an image where none passes its threshold (every ROCOv2 image
    has concepts, and an empty prediction scores 0)."""
    max_concepts: int = 100
    """Most CUIs predicted per image (the evaluator refuses more than 100)."""
    names: Path | None = None
    """Name table (``CUI,Canonical name``, ROCOv2's cui_mapping.csv); default: cui_mapping.csv of the
    dataset data.prepared was prepared from. Saved with the model; prompts name concepts by it."""
    vision_checkpoint: Path | None = None
    """A caption checkpoint whose vision side gives the features (one that trained the Q-Former);
    default: the model section's base weights."""

    def __post_init__(self) -> None:
        if self.min_freq < 1:
            raise ConfigError(f"concepts.min_freq must be at least 1, got {self.min_freq}")
        if self.hidden < 1:
            raise ConfigError(f"concepts.hidden must be at least 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"concepts.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.cb_beta < 1.0:
            raise ConfigError(f"concepts.cb_beta must be in (0, 1), got {self.cb_beta}")
        if self.max_pos_weight < 1.0:
            raise ConfigError(f"concepts.max_pos_weight must be at least 1, got {self.max_pos_weight}")
        if not 1 <= self.max_concepts <= 100:
            raise ConfigError(
                f"concepts.max_concepts must be 1-100 (the evaluator refuses more), got {self.max_concepts}"
            )
        if self.min_label_positives < 1:
            raise ConfigError(
                f"concepts.min_label_positives must be at least 1, got {self.min_label_positives}"
            )


@dataclass
class ConceptTrainConfig:
    """How the concept classifier trains, validates, logs and checkpoints (as ``medcap train``)."""

    out_dir: Path = Path("runs/concepts")
    """Run directory: config.yaml, log.csv, tensorboard/, checkpoints/{last,best}, result.json."""
    seed: int = 0
    """Seeds the head's initialisation, dropout and the data order."""
    epochs: int = 20
    """Passes over the training split (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; overrides epochs."""
    batch_size: int = 64
    """Images per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), reached after warmup_ratio of the steps; cosine decay after."""
    weight_decay: float = 1e-4
    """AdamW weight decay of the head's matrices."""
    warmup_ratio: float = 0.05
    """Linear warmup as a fraction of all steps."""
    eval_every: int | None = None
    """Validate (F1 with thresholds tuned) every N steps (null: at each epoch's end)."""
    patience: int | None = None
    """Early stopping: stop after this many validations without a better F1 (null: never)."""
    log_every: int = 10
    """Training loss, learning rate and throughput to log.csv every N steps."""
    query_cache: Path | None = None
    """Folder of cached vision features (``medcap features``): train without running the vision
    tower (null: run it on every batch, its output computed under no_grad)."""
    feature_batch_size: int = 16
    """Images per vision-tower forward when validating or training without a cache."""
    num_workers: int = 2
    """Image decoding processes when training without a cache."""
    resume: bool = False
    """Continue from out_dir/checkpoints/last when it exists (config and data must match)."""
    progress_bar: bool = True
    """Show a progress bar with the loss."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard", "csv"])
    """Where losses and validation F1 go: csv (RUN/log.csv) and any of accelerate's trackers, as
    train.report_to of medcap train."""
    tracker_project: str = "medcap"
    """Project name at the online trackers."""
    cpu: bool = False
    """Train on the CPU even when a GPU is present."""
    cpu_threads: int | None = None
    """Torch threads on the CPU (null: all cores)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("max_steps", "eval_every", "patience", "cpu_threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"train.{name} must be a positive number or null, got {v!r}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers must be >= 0, got {self.num_workers}")
        unknown = [t for t in self.report_to if t not in REPORT_TO]
        if unknown:
            raise ConfigError(
                f"train.report_to: {', '.join(map(repr, unknown))} is not a place medcap can log to; "
                f"choose from {', '.join(REPORT_TO)}"
            )


@dataclass
class ConceptRunConfig:
    """Everything one concept-detection run needs; written to CRUN/config.yaml and every checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    """Where the prepared manifests are (their cuis column is the ground truth)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model whose frozen vision side gives the features (its PEFT settings are not used)."""
    concepts: ConceptHeadConfig = field(default_factory=ConceptHeadConfig)
    """Vocabulary, head, loss and thresholds."""
    train: ConceptTrainConfig = field(default_factory=ConceptTrainConfig)
    """Optimisation, validation, logging and checkpoints."""


#: Settings that may change between a run and its resumption (as medcap train's RESUME_MAY_DIFFER).
CONCEPT_RESUME_MAY_DIFFER = frozenset(
    {
        "train.resume",
        "train.out_dir",
        "data.prepared",
        "data.num_workers",
        "train.num_workers",
        "train.progress_bar",
        "train.log_every",
        "train.report_to",
        "train.tracker_project",
        "train.max_steps",
        "train.epochs",
        "train.eval_every",
        "train.patience",
        "train.query_cache",
        "train.feature_batch_size",
        "train.cpu_threads",
    }
)


def shipped_concept_configs() -> dict[str, Path]:
    """``{name: path}`` of the shipped concept-detection configs."""
    return {p.stem: p for p in sorted(CONCEPT_RECIPES_DIR.glob("*.yaml"))}


def load_concepts_config(
    path: str | Path | None, overrides: list[str] | dict | None = None
) -> ConceptRunConfig:
    """Read a concept-detection config (a YAML file or a shipped config's name) with dotted overrides."""
    if path is not None and not Path(path).is_file():
        shipped = shipped_concept_configs()
        name = Path(path).name.removesuffix(".yaml")
        if name not in shipped:
            raise ConfigError(
                f"concept config {path!r} is neither a YAML file nor a shipped config; shipped: "
                f"{', '.join(shipped) or 'none'}"
            )
        path = shipped[name]
    return load_config(ConceptRunConfig, path, overrides)


def read_concepts_config(folder: str | Path) -> ConceptRunConfig:
    """The typed ``ConceptRunConfig`` saved in a concept run or checkpoint folder."""
    from medcap.layout import config_file

    path = config_file(folder)
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a concept-detection run or checkpoint: no {path.name} there"
        )
    try:
        return load_config(ConceptRunConfig, path)
    except ConfigError as e:
        raise ConfigError(f"{path}: not a concept-detection config ({e})") from None


__all__ = [
    "CONCEPT_RESUME_MAY_DIFFER",
    "ConceptHeadConfig",
    "ConceptRunConfig",
    "ConceptTrainConfig",
    "load_concepts_config",
    "read_concepts_config",
    "shipped_concept_configs",
]
