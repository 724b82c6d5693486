"""The folders medcap writes and reads, spelled in one place.

Every stage finds a file through these classes instead of joining names itself, so the layout
below is the whole truth (docs/ARCHITECTURE.md shows it with what each file holds)::

    PREP/prepare.json  PREP/plots/*.png                     PreparedLayout (medcap data prepare)
    PREP/{split}/manifest.csv skipped.csv notes.csv stats.json
    PREP/images/{source split}/<ID>.<ext>                  images extracted from parquet bytes
    PREP/datasets/                                          medcap data to-datasets (default)

    RUN/config.yaml  log.csv  samples.jsonl  tensorboard/  result.json  report.html     RunLayout
    RUN/checkpoints/{best,last}/                           CheckpointLayout (one each)
    RUN/predictions/{split}.csv .zip .meta.json            medcap predict
    RUN/eval/{split}/metrics.json per_caption.csv          medcap evaluate

    CKPT/config.yaml adapter/ trainable.safetensors base.safetensors base_fingerprint.txt
    CKPT/train_state.pt (last only) data_hash.txt metrics.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The resolved run config, in a run folder and in every checkpoint.
CONFIG_FILE = "config.yaml"


def config_file(folder: str | Path) -> Path:
    """The ``config.yaml`` of a run or checkpoint folder."""
    return Path(folder) / CONFIG_FILE


@dataclass(frozen=True)
class PreparedLayout:
    """A prepared-data folder (``medcap data prepare --out PREP``)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def summary(self) -> Path:
        """Options used and totals of the whole prepare run."""
        return self.root / "prepare.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def split_dir(self, split: str) -> Path:
        return self.root / split

    def extracted_images(self, source_split: str) -> Path:
        """Images written out of a source that holds them as bytes (the Hub's parquet shards): the
        manifests point at these files, so they stay with the prepared folder."""
        return self.root / "images" / source_split

    def manifest(self, split: str) -> Path:
        """One row per kept image (``medcap.data.manifest.MANIFEST_COLUMNS``)."""
        return self.root / split / "manifest.csv"

    def skipped(self, split: str) -> Path:
        """One row per dropped item, with the reason."""
        return self.root / split / "skipped.csv"

    def notes(self, split: str) -> Path:
        """One row per kept item that needed a remark."""
        return self.root / split / "notes.csv"

    def stats(self, split: str) -> Path:
        """Counts (rows in = kept + skipped), policies, modality, lengths."""
        return self.root / split / "stats.json"

    def splits(self) -> list[str]:
        """The splits that have a manifest, in the usual order (train, valid, test, then others)."""
        found = sorted(p.parent.name for p in self.root.glob("*/manifest.csv"))
        order = {"train": 0, "valid": 1, "validation": 1, "test": 2}
        return sorted(found, key=lambda s: (order.get(s, 3), s))


@dataclass(frozen=True)
class CheckpointLayout:
    """One checkpoint folder (``RUN/checkpoints/best`` or ``last``)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def adapter(self) -> Path:
        """The PEFT adapter (``save_pretrained``), loadable by peft itself."""
        return self.root / "adapter"

    @property
    def trainable(self) -> Path:
        """Every other trained parameter, by plain module name."""
        return self.root / "trainable.safetensors"

    @property
    def base(self) -> Path:
        """Random-init / tiny base weights (no hub has them), up to a size limit."""
        return self.root / "base.safetensors"

    @property
    def base_fingerprint(self) -> Path:
        """For larger random-init bases: rebuilt from the seed and checked against this hash."""
        return self.root / "base_fingerprint.txt"

    @property
    def train_state(self) -> Path:
        """Optimizer, scheduler, scaler, RNG of every process, data position (``last`` only)."""
        return self.root / "train_state.pt"

    @property
    def data_hash(self) -> Path:
        """sha256 and rows of the train and valid manifests the checkpoint was trained on."""
        return self.root / "data_hash.txt"

    @property
    def metrics(self) -> Path:
        """Step and validation figures when the checkpoint was written."""
        return self.root / "metrics.json"

    #: The model files ``medcap.model.checkpoint.save_trainable`` may write.
    MODEL_FILES = ("adapter", "trainable.safetensors", "base.safetensors", "base_fingerprint.txt")

    def is_checkpoint(self) -> bool:
        """A config and at least one model file: what ``load_checkpoint`` can rebuild."""
        return self.config.is_file() and any((self.root / n).exists() for n in self.MODEL_FILES[:3])


@dataclass(frozen=True)
class RunLayout:
    """A training run folder (``train.out_dir``)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def log(self) -> Path:
        """One row per logged step and per validation."""
        return self.root / "log.csv"

    @property
    def samples(self) -> Path:
        """Sample captions written at each validation."""
        return self.root / "samples.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def tracker_ids(self) -> Path:
        """Ids of the online tracker runs (W&B), so a resumed run continues the same one."""
        return self.root / "trackers.json"

    @property
    def result(self) -> Path:
        """``fit()``'s summary."""
        return self.root / "result.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> CheckpointLayout:
        return CheckpointLayout(self.checkpoints / "best")

    @property
    def last(self) -> CheckpointLayout:
        return CheckpointLayout(self.checkpoints / "last")

    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    def predictions(self, split: str) -> Path:
        """The submission CSV of ``split`` (``ID,Caption``)."""
        return self.predictions_dir / f"{split}.csv"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval(self, split: str) -> EvalLayout:
        return EvalLayout(self.eval_dir / split)

    def evals(self) -> dict[str, EvalLayout]:
        """The evaluated splits (``eval/<split>/metrics.json`` present), by name."""
        if not self.eval_dir.is_dir():
            return {}
        return {
            d.name: EvalLayout(d)
            for d in sorted(self.eval_dir.iterdir())
            if d.is_dir() and (d / "metrics.json").is_file()
        }


@dataclass(frozen=True)
class EvalLayout:
    """The output folder of one evaluation (``RUN/eval/<split>``, or ``medcap evaluate --out``)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def metrics(self) -> Path:
        """The summary with bootstrap intervals."""
        return self.root / "metrics.json"

    @property
    def per_caption(self) -> Path:
        """One row per caption pair with every metric."""
        return self.root / "per_caption.csv"


def prediction_meta(predictions_csv: str | Path) -> Path:
    """``RUN/predictions/test.meta.json`` next to ``test.csv``: model, decoding, timing."""
    p = Path(predictions_csv)
    return p.with_name(p.stem + ".meta.json")


def run_of_checkpoint(checkpoint: str | Path) -> Path | None:
    """The run folder that holds a checkpoint (``RUN/checkpoints/best`` -> ``RUN``), or None."""
    p = Path(checkpoint)
    return p.parent.parent if p.parent.name == "checkpoints" else None


def eval_dir_for(predictions_csv: str | Path) -> Path:
    """Where ``medcap evaluate`` writes by default: ``RUN/eval/<split>`` for ``RUN/predictions/<split>.csv``,
    else an ``eval/<name>`` folder next to the predictions."""
    pred = Path(predictions_csv)
    if pred.parent.name == "predictions":
        return RunLayout(pred.parent.parent).eval(pred.stem).root
    return pred.parent / "eval" / pred.stem


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint folder, run folder or None)`` for a checkpoint folder or a run folder.

    A run folder (``RUN``) resolves to ``RUN/checkpoints/best``, else ``RUN/checkpoints/last``.
    """
    path = Path(path)
    if config_file(path).is_file() and path.parent.name == "checkpoints":
        return path, path.parent.parent
    run = RunLayout(path)
    for ckpt in (run.best, run.last):
        if ckpt.config.is_file():
            return ckpt.root, path
    if CheckpointLayout(path).is_checkpoint():
        return path, None
    raise FileNotFoundError(
        f"{path} is neither a checkpoint folder (config.yaml with adapter/ or trainable.safetensors) "
        "nor a run folder (with checkpoints/best or checkpoints/last); train one with 'medcap train'"
    )


__all__ = [
    "CONFIG_FILE",
    "CheckpointLayout",
    "EvalLayout",
    "PreparedLayout",
    "RunLayout",
    "config_file",
    "eval_dir_for",
    "prediction_meta",
    "resolve_checkpoint",
    "run_of_checkpoint",
]
