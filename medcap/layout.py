"""The folders medcap writes and reads, spelled in one place.

Every stage finds a file through these classes instead of joining names itself, so the layout
below is the whole truth (docs/ARCHITECTURE.md shows it with what each file holds)::

    PREP/prepare.json  PREP/plots/*.png                     PreparedLayout (medcap data prepare)
    PREP/{split}/manifest.csv skipped.csv notes.csv stats.json
    PREP/images/{source split}/<ID>.<ext>                  images extracted from parquet bytes
    PREP/datasets/                                          medcap data to-datasets (default)

    RUN/config.yaml  log.csv  samples.jsonl  tensorboard/  result.json  report.html     RunLayout
    RUN/peft_init/                                         EVA / CorDA statistics of the training split
    RUN/checkpoints/{best,last}/                           CheckpointLayout (one each)
    RUN/predictions/{split}.csv .zip .meta.json            medcap predict
    RUN/eval/{split}/metrics.json per_caption.csv          medcap evaluate
    RUN/eval/{split}/metrics.json per_image.csv per_concept.csv   medcap evaluate --task concepts

    CKPT/config.yaml adapter/ adapter_init/ trainable.safetensors base.safetensors base_fingerprint.txt
    CKPT/train_state.pt sharded/ (last only) data_hash.txt metrics.json
    CKPT/concept_head.safetensors concept_vocab.json       the auxiliary concept head (train.concept_loss_weight)

    CRUN/ (medcap concepts train): RunLayout's files; CRUN/checkpoints/{best,last}/:  ConceptCheckpointLayout
    config.yaml head.safetensors vocab.json thresholds.json train_state.pt data_hash.txt metrics.json

    STUDY/space.yaml study.db trials/NNNN/ trials.csv best.yaml report.html   StudyLayout (medcap tune)
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
    def adapter_init(self) -> Path:
        """The adapter as it started, for inits that rewrite the base weights (pissa, olora, corda):
        how the base is restored on load, and what an unmerged export is converted against."""
        return self.root / "adapter_init"

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
    def sharded(self) -> Path:
        """FSDP / DeepSpeed (``last`` only): each process's shard of the trainable parameters and the
        optimizer state (torch.distributed.checkpoint, or DeepSpeed's own checkpoint)."""
        return self.root / "sharded"

    @property
    def data_hash(self) -> Path:
        """sha256 and rows of the train and valid manifests the checkpoint was trained on."""
        return self.root / "data_hash.txt"

    @property
    def metrics(self) -> Path:
        """Step and validation figures when the checkpoint was written."""
        return self.root / "metrics.json"

    #: The model files ``medcap.model.checkpoint.save_trainable`` may write.
    MODEL_FILES = (
        "adapter",
        "trainable.safetensors",
        "base.safetensors",
        "base_fingerprint.txt",
        "adapter_init",
    )

    def is_checkpoint(self) -> bool:
        """A config and at least one model file: what ``load_checkpoint`` can rebuild."""
        return self.config.is_file() and any((self.root / n).exists() for n in self.MODEL_FILES[:3])


@dataclass(frozen=True)
class ConceptCheckpointLayout:
    """One checkpoint of a concept-detection run (``CRUN/checkpoints/best`` or ``last``), and the
    auxiliary concept head a caption checkpoint carries (``concept_head.safetensors``,
    ``concept_vocab.json``)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def head(self) -> Path:
        """The classifier's weights."""
        return self.root / "head.safetensors"

    @property
    def vocab(self) -> Path:
        """The CUIs the head predicts, their training counts and names."""
        return self.root / "vocab.json"

    @property
    def thresholds(self) -> Path:
        """The decision threshold of every CUI, tuned on the validation split."""
        return self.root / "thresholds.json"

    @property
    def train_state(self) -> Path:
        """Optimizer, scheduler, RNG, data position (``last`` only)."""
        return self.root / "train_state.pt"

    @property
    def data_hash(self) -> Path:
        return self.root / "data_hash.txt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def auxiliary_head(self) -> Path:
        """In a caption checkpoint: the auxiliary concept head (``train.concept_loss_weight``)."""
        return self.root / "concept_head.safetensors"

    @property
    def auxiliary_vocab(self) -> Path:
        """In a caption checkpoint: the auxiliary head's vocabulary."""
        return self.root / "concept_vocab.json"

    def is_checkpoint(self) -> bool:
        return self.config.is_file() and self.head.is_file() and self.vocab.is_file()


def resolve_concept_checkpoint(path: str | Path) -> Path:
    """A concept checkpoint folder, or a concept run folder's ``checkpoints/best`` (else ``last``)."""
    path = Path(path)
    if ConceptCheckpointLayout(path).is_checkpoint():
        return path
    run = RunLayout(path)
    for name in ("best", "last"):
        if ConceptCheckpointLayout(run.checkpoints / name).is_checkpoint():
            return run.checkpoints / name
    raise FileNotFoundError(
        f"{path} is neither a concept checkpoint (config.yaml, head.safetensors, vocab.json) nor a concept "
        "run folder (with checkpoints/best or last); train one with 'medcap concepts train'"
    )


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
    def peft_init(self) -> Path:
        """Statistics of the data-driven LoRA inits (EVA, CorDA) from the training split, with the key
        they were computed for; reused while it matches (``medcap.model.peft_methods``)."""
        return self.root / "peft_init"

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

    @property
    def per_image(self) -> Path:
        """Concept detection: one row per image (true and predicted CUIs, F1, F1 on the manual CUIs)."""
        return self.root / "per_image.csv"

    @property
    def per_concept(self) -> Path:
        """Concept detection: one row per CUI (support, true/false positives, misses, F1)."""
        return self.root / "per_concept.csv"


@dataclass(frozen=True)
class StudyLayout:
    """A hyperparameter study folder (``medcap tune --study STUDY``)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def space(self) -> Path:
        """The search space the study was started with (a resumed study must use the same)."""
        return self.root / "space.yaml"

    @property
    def database(self) -> Path:
        """The default storage: Optuna's SQLite database (``--storage`` names another)."""
        return self.root / "study.db"

    @property
    def trials_dir(self) -> Path:
        return self.root / "trials"

    def trial(self, number: int) -> RunLayout:
        """The run folder of a trial: a normal medcap run (config.yaml, log.csv, checkpoints ...)."""
        return RunLayout(self.trials_dir / f"{number:04d}")

    @property
    def trials_table(self) -> Path:
        """One row per trial: number, state, objective, settings, run folder."""
        return self.root / "trials.csv"

    @property
    def best_config(self) -> Path:
        """The run config of the best trial so far (``medcap train --config`` takes it)."""
        return self.root / "best.yaml"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


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
    "ConceptCheckpointLayout",
    "EvalLayout",
    "PreparedLayout",
    "RunLayout",
    "StudyLayout",
    "config_file",
    "eval_dir_for",
    "prediction_meta",
    "resolve_checkpoint",
    "resolve_concept_checkpoint",
    "run_of_checkpoint",
]
