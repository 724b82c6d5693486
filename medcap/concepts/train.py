"""``medcap concepts train``: a multi-label CUI classifier on a captioning model's frozen vision side,
read top to bottom as ``medcap train``'s recipe is.

    fit_concepts(cfg)
      setup(cfg) -> ConceptRun   vocabulary (train split, min_freq), targets and their audit, features
                                 (query cache, or the vision tower on every batch), head, loss weights,
                                 AdamW + warmup/cosine, resume point, logs
      for every step:
        train_step(run, ...)     class-balanced BCE on one batch, clip, step
        validate(run)            probabilities of the whole validation split, thresholds tuned for the
                                 official per-image F1, best checkpoint by that F1, early stopping
        save(run, "last"|"best") atomic checkpoint folders (train.state.write_checkpoint_dir)
      finish(run) -> summary (RUN/result.json)

The vision side never trains: with a cache it is not even built (``train.query_cache``); without one
it runs under ``no_grad`` on every training batch, and the validation features, fixed as they are, are
computed once and kept in memory. The run folder is a ``RunLayout`` (config.yaml, log.csv, tensorboard/,
checkpoints/{best,last}, result.json); its checkpoints are ``ConceptCheckpointLayout``s.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcap.concepts.features import (
    CachedFeatures,
    ConceptError,
    VisionFeatures,
    build_vision,
    vision_fingerprint,
)
from medcap.concepts.head import concept_loss_sum, loss_weights
from medcap.concepts.model import ConceptModel, new_head
from medcap.concepts.thresholds import Tuned, tune_thresholds
from medcap.concepts.vocab import ConceptVocab, CuiAudit, build_vocab, find_name_table, read_name_table
from medcap.config.concepts import CONCEPT_RESUME_MAY_DIFFER, ConceptRunConfig, read_concepts_config
from medcap.config.loader import diff_configs, save_config
from medcap.data.manifest import ManifestRow, read_manifest
from medcap.layout import ConceptCheckpointLayout, RunLayout
from medcap.train.batches import epoch_batches
from medcap.train.logs import RunLog, flat_hyperparameters
from medcap.train.optim import lr_lambda
from medcap.train.state import (
    format_hashes,
    manifest_hashes,
    read_hashes,
    recover_checkpoint_dir,
    rng_state,
    set_rng_state,
    to_plain_rng,
    write_checkpoint_dir,
)

LOG_COLUMNS = [
    "step",
    "epoch",
    "split",
    "loss",
    "lr",
    "samples_per_s",
    "f1",
    "f1_global",
    "threshold",
    "elapsed_s",
]


@dataclass
class ConceptProgress:
    """Where a concept run is; saved in train_state.pt and restored on resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_f1: float | None = None
    best_step: int | None = None
    last_f1: float | None = None
    last_valid_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


@dataclass
class ConceptRun:
    """Everything a concept run holds while it trains; built by ``setup``."""

    cfg: ConceptRunConfig
    layout: RunLayout
    device: Any
    train_rows: list[ManifestRow]
    valid_rows: list[ManifestRow]
    vocab: ConceptVocab
    audits: dict[str, CuiAudit]
    y_train: np.ndarray
    valid_truth: np.ndarray
    valid_counts: np.ndarray
    """True CUIs per validation image, in the vocabulary or not (what the per-image F1 divides by)."""
    train_features: Any
    valid_features: Any
    feature_shape: tuple[int, int]
    fingerprint: str | None
    head: Any
    optimizer: Any
    scheduler: Any
    weight: Any
    pos_weight: Any
    total_steps: int
    steps_per_epoch: int
    progress: ConceptProgress
    log: ConceptLog
    hashes: dict[str, dict[str, Any]]
    tuned: Tuned | None = None
    valid_cache: Any = None
    """Validation features kept in memory when computed by the vision tower (it is frozen)."""
    t_start: float = field(default_factory=time.perf_counter)
    step_times: list[float] = field(default_factory=list)

    def say(self, msg: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(msg)


class ConceptLog:
    """RUN/log.csv of a concept run (``LOG_COLUMNS``) and the trackers of ``train.report_to``."""

    def __init__(self, cfg: ConceptRunConfig, layout: RunLayout, resume_step: int | None):
        self.path = layout.log
        self.enabled = "csv" in cfg.train.report_to
        if self.enabled and resume_step is not None and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            keep = [ln for ln in lines[1:] if ln.strip() and int(ln.split(",", 1)[0]) <= resume_step]
            self.path.write_text("".join(lines[:1] + keep), encoding="utf-8")
        trackers = [t for t in cfg.train.report_to if t != "csv"]
        self.trackers = RunLog(
            layout, True, trackers, resume_step, flat_hyperparameters(cfg), cfg.train.tracker_project
        )

    def row(self, **values: Any) -> None:
        if self.enabled:
            new = not self.path.is_file() or self.path.stat().st_size == 0
            with self.path.open("a", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
                if new:
                    w.writeheader()
                w.writerow(
                    {
                        k: (f"{v:.6g}" if isinstance(v, float) else v)
                        for k, v in values.items()
                        if k in LOG_COLUMNS
                    }
                )
        numbers = {
            f"{values['split']}/{k}": float(v)
            for k in ("loss", "lr", "samples_per_s", "f1")
            if isinstance(v := values.get(k), int | float) and math.isfinite(v)
        }
        for tracker in self.trackers.trackers:
            tracker.log(numbers, step=values["step"])

    def close(self) -> None:
        self.trackers.close()


def fit_concepts(cfg: ConceptRunConfig) -> dict[str, Any]:
    """Train the concept classifier ``cfg`` describes; returns the summary (also RUN/result.json)."""
    from medcap.model.build import import_backends

    import_backends()
    from tqdm.auto import tqdm

    run = setup(cfg)
    tc, progress = cfg.train, run.progress
    bar = tqdm(
        total=run.total_steps,
        initial=progress.step,
        disable=not tc.progress_bar,
        desc="concepts",
        unit="step",
    )
    stop = progress.stopped_early or progress.step >= run.total_steps
    window: list[float] = []
    t_window = time.perf_counter()
    try:
        while not stop:
            batches = epoch_batches([1] * len(run.train_rows), tc.batch_size, tc.seed, progress.epoch, False)
            source = run.train_features.batches(batches[progress.batch_in_epoch :])
            while progress.batch_in_epoch < len(batches) and not stop:
                t0 = time.perf_counter()
                idx = batches[progress.batch_in_epoch]
                loss = train_step(run, next(source), run.y_train[idx])
                progress.batch_in_epoch += 1
                run.step_times.append(time.perf_counter() - t0)
                window.append(loss)
                epoch_f = progress.epoch + progress.batch_in_epoch / len(batches)
                if progress.step % tc.log_every == 0 or progress.step == run.total_steps:
                    dt = max(time.perf_counter() - t_window, 1e-9)
                    run.log.row(
                        step=progress.step,
                        epoch=round(epoch_f, 4),
                        split="train",
                        loss=float(np.mean(window)),
                        lr=run.scheduler.get_last_lr()[0],
                        samples_per_s=round(len(window) * tc.batch_size / dt, 2),
                        elapsed_s=round(time.perf_counter() - run.t_start, 2),
                    )
                    bar.set_postfix(loss=f"{np.mean(window):.4f}")
                    window, t_window = [], time.perf_counter()
                bar.update(1)
                epoch_done = progress.batch_in_epoch >= len(batches)
                finished = progress.step >= run.total_steps
                due = (
                    (tc.eval_every is not None and progress.step % tc.eval_every == 0)
                    or epoch_done
                    or finished
                )
                if epoch_done:
                    progress.epoch += 1
                    progress.batch_in_epoch = 0
                if due:
                    stop = validate(run, epoch_f)
                stop = stop or finished
                if due or stop:
                    save(run, "last")
                if epoch_done:
                    break
    finally:
        bar.close()
        run.log.close()
    return finish(run)


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------


def setup(cfg: ConceptRunConfig) -> ConceptRun:
    """Data and vocabulary, features, head, loss, optimizer, resume point and logs."""
    import torch

    tc, cc = cfg.train, cfg.concepts
    layout = RunLayout(tc.out_dir)
    torch.manual_seed(tc.seed)
    if tc.cpu_threads:
        torch.set_num_threads(tc.cpu_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not tc.cpu else "cpu")
    recover_checkpoint_dir(layout.checkpoints, "last")
    recover_checkpoint_dir(layout.checkpoints, "best")
    last = ConceptCheckpointLayout(layout.checkpoints / "last")
    resuming = last.train_state.is_file()
    if resuming and not tc.resume:
        raise ConceptError(
            f"{layout.root} already holds a checkpoint ({last.root}). Continue it with --train.resume true "
            f"(or 'medcap concepts train --resume {layout.root}'), or choose another train.out_dir"
        )

    # --- data and vocabulary ---------------------------------------------------------------
    train_rows = read_manifest(cfg.data.manifest(cfg.data.train_split), cfg.data.max_train_samples)
    valid_rows = read_manifest(cfg.data.manifest(cfg.data.valid_split), cfg.data.max_eval_samples)
    if not train_rows or not valid_rows:
        raise ConceptError(f"{cfg.data.prepared}: the train and valid manifests need rows")
    hashes = manifest_hashes(cfg.data)
    if resuming:
        check_concept_resume(cfg, last, hashes)
    names_path = cc.names or find_name_table(cfg.data.prepared)
    names = read_name_table(names_path) if names_path is not None else {}
    if resuming:
        vocab = ConceptVocab.load(last.vocab)  # the vocabulary the head was built for
    else:
        vocab, _ = build_vocab(train_rows, cc.min_freq, names)
    if not len(vocab):
        raise ConceptError(
            f"no CUI is in at least concepts.min_freq={cc.min_freq} of the {len(train_rows)} training images "
            f"(manifest column cuis of {cfg.data.manifest(cfg.data.train_split)}); lower min_freq"
        )
    y_train, train_audit = vocab.targets(train_rows)
    valid_truth, valid_audit = vocab.targets(valid_rows)
    # Every distinct true CUI counts in the F1, also those outside the vocabulary (as the evaluator).
    valid_counts = np.array([len({c.strip().upper() for c in r.cuis if c.strip()}) for r in valid_rows])
    audits = {cfg.data.train_split: train_audit, cfg.data.valid_split: valid_audit}

    # --- features ----------------------------------------------------------------------------
    if tc.query_cache is not None:
        train_features = CachedFeatures(tc.query_cache, train_rows)
        valid_features = CachedFeatures(tc.query_cache, valid_rows)
        _check_cache_model(cfg, train_features)
        fingerprint = train_features.fingerprint
    else:
        vision, processor = build_vision(cfg.model, cc.vision_checkpoint)
        vision.to(device)
        fingerprint = vision_fingerprint(vision)
        train_features = VisionFeatures(vision, processor, train_rows, tc.num_workers)
        valid_features = VisionFeatures(vision, processor, valid_rows, tc.num_workers)
    probe = next(valid_features.batches([[0]]))
    feature_shape = (int(probe.shape[1]), int(probe.shape[2]))

    # --- head, loss, optimizer ----------------------------------------------------------------
    head = new_head(cfg, *feature_shape, len(vocab)).to(device)
    weight, pos_weight = loss_weights(
        vocab.counts, vocab.train_images, cc.loss, cc.cb_beta, cc.max_pos_weight
    )
    decay = [p for p in head.parameters() if p.ndim >= 2]
    rest = [p for p in head.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=tc.lr
    )
    steps_per_epoch = math.ceil(len(train_rows) / tc.batch_size)
    total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda("cosine", int(tc.warmup_ratio * total_steps), total_steps)
    )
    progress = ConceptProgress()
    if resuming:
        from medcap.model.checkpoint import load_tensors

        head.load_state_dict(load_tensors(last.head))
        state = torch.load(last.train_state, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(to_plain_rng(state["rng"]))
        progress = ConceptProgress(**state["progress"])
        if progress.stopped_early and (
            tc.patience is None or progress.evals_without_improvement < tc.patience
        ):
            progress.stopped_early = False
    else:
        layout.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, layout.config)
    run = ConceptRun(
        cfg=cfg,
        layout=layout,
        device=device,
        train_rows=train_rows,
        valid_rows=valid_rows,
        vocab=vocab,
        audits=audits,
        y_train=y_train,
        valid_truth=valid_truth,
        valid_counts=valid_counts,
        train_features=train_features,
        valid_features=valid_features,
        feature_shape=feature_shape,
        fingerprint=fingerprint,
        head=head,
        optimizer=optimizer,
        scheduler=scheduler,
        weight=weight,
        pos_weight=pos_weight,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        progress=progress,
        log=ConceptLog(cfg, layout, progress.step if resuming else None),
        hashes=hashes,
    )
    for split, audit in audits.items():
        run.say(audit.describe(split))
    run.say(
        f"concepts: {len(vocab)} CUIs in the vocabulary (min_freq {cc.min_freq}, {len(vocab.names)} named); "
        f"{len(train_rows)} training images, {len(valid_rows)} validation; features {feature_shape[0]} x "
        f"{feature_shape[1]} from {'the cache ' + str(tc.query_cache) if tc.query_cache else 'the vision tower'}; "
        f"{sum(p.numel() for p in head.parameters()):,} head parameters; {total_steps} steps on {device}"
        + (f"; resumed at step {progress.step}" if resuming else "")
    )
    return run


def _check_cache_model(cfg: ConceptRunConfig, cache: CachedFeatures) -> None:
    """A cache of another model's features is refused (the config's model is what predict rebuilds)."""
    key = cache.index["key"]
    if cfg.concepts.vision_checkpoint is not None:
        return  # the checkpoint's vision side: checked by fingerprint when predict builds it
    m = cfg.model
    mine = {"name_or_path": str(m.name_or_path), "random_init": bool(m.random_init)}
    if m.random_init:  # as the cache key records it (a tiny model's seed is in its fingerprint)
        mine["init_seed"] = int(m.init_seed)
    diff = [f"{k}: cache {key.get(k)!r}, config {v!r}" for k, v in mine.items() if key.get(k) != v]
    if diff:
        raise ConceptError(
            f"{cache.cache_dir} holds features of another model ({'; '.join(diff)}); build the cache with this "
            "config's model section ('medcap features --config ...') or fix model.*"
        )


def check_concept_resume(
    cfg: ConceptRunConfig, ckpt: ConceptCheckpointLayout, hashes: dict[str, Any]
) -> None:
    """Refuse to resume from a checkpoint trained with other settings or data, saying what differs."""
    saved = read_concepts_config(ckpt.root)
    problems = [
        f"  config {d}"
        for d in diff_configs(saved, cfg)
        if d.split(":", 1)[0] not in CONCEPT_RESUME_MAY_DIFFER
    ]
    for split, h in hashes.items():
        old = read_hashes(ckpt.data_hash).get(split)
        if old is None or old["sha256"] != h["sha256"]:
            problems.append(f"  data: the {split} manifest {h['path']} changed since the checkpoint")
    if problems:
        raise ConceptError(
            f"cannot resume from {ckpt.root}: it was trained with other settings or data (checkpoint -> now):\n"
            + "\n".join(problems)
            + "\nResume with the original config and data, or start a new run in another train.out_dir."
        )


# ----------------------------------------------------------------------------------------------
# one step
# ----------------------------------------------------------------------------------------------


def train_step(run: ConceptRun, features: Any, targets: np.ndarray) -> float:
    """One optimizer step on a batch: the mean over images of the (weighted) BCE, clipped at norm 1."""
    import torch

    run.head.train()
    logits = run.head(features.to(run.device))
    y = torch.from_numpy(targets).to(run.device)
    loss = concept_loss_sum(logits, y, run.weight, run.pos_weight) / len(targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.head.parameters(), 1.0)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.progress.step += 1
    return float(loss.detach())


# ----------------------------------------------------------------------------------------------
# validate
# ----------------------------------------------------------------------------------------------


def valid_probabilities(run: ConceptRun) -> tuple[np.ndarray, float]:
    """Probabilities ``[images, labels]`` of the validation split and its mean loss."""
    import torch

    bs = run.cfg.train.feature_batch_size
    idx = [list(range(i, min(i + bs, len(run.valid_rows)))) for i in range(0, len(run.valid_rows), bs)]
    if run.valid_cache is None:
        feats = list(run.valid_features.batches(idx))
        if isinstance(run.valid_features, VisionFeatures):  # frozen: compute once, keep (fp16)
            run.valid_cache = [f.half() for f in feats]
    else:
        feats = run.valid_cache
    run.head.eval()
    probs, loss = [], 0.0
    with torch.no_grad():
        for f, i in zip(feats, idx, strict=True):
            logits = run.head(f.float().to(run.device))
            y = torch.from_numpy(run.valid_truth[i]).to(run.device)
            loss += float(concept_loss_sum(logits, y, run.weight, run.pos_weight))
            probs.append(torch.sigmoid(logits).cpu().numpy())
    return np.concatenate(probs), loss / len(run.valid_rows)


def validate(run: ConceptRun, epoch_f: float) -> bool:
    """Tune thresholds on the validation split, log the F1, keep the best; True when early stopping
    says stop. The F1 is the official per-image F1 with the thresholds tuned on this same split
    (optimistic for unseen data: score the test split with ``medcap evaluate --task concepts``)."""
    cc, tc, progress = run.cfg.concepts, run.cfg.train, run.progress
    probs, loss = valid_probabilities(run)
    tuned = tune_thresholds(
        probs,
        run.valid_truth,
        run.valid_counts,
        cc.threshold,
        cc.min_label_positives,
        cc.at_least_one,
        cc.max_concepts,
    )
    run.tuned = tuned
    progress.last_f1, progress.last_valid_loss = tuned.f1, loss
    improved = progress.best_f1 is None or tuned.f1 > progress.best_f1
    if improved:
        progress.best_f1, progress.best_step, progress.evals_without_improvement = tuned.f1, progress.step, 0
    else:
        progress.evals_without_improvement += 1
    run.log.row(
        step=progress.step,
        epoch=round(epoch_f, 4),
        split="valid",
        loss=loss,
        lr=run.scheduler.get_last_lr()[0],
        f1=tuned.f1,
        f1_global=tuned.f1_global,
        threshold=tuned.global_threshold,
        elapsed_s=round(time.perf_counter() - run.t_start, 2),
    )
    run.say(
        f"[step {progress.step}] validation F1 {tuned.f1:.4f} (global threshold {tuned.global_threshold:.3f}: "
        f"{tuned.f1_global:.4f}; {tuned.own} CUIs with their own), loss {loss:.4f}; best {progress.best_f1:.4f} "
        f"at step {progress.best_step}"
    )
    if improved:
        save(run, "best")
    if tc.patience is not None and progress.evals_without_improvement >= tc.patience:
        progress.stopped_early = True
        run.say(f"early stopping: {tc.patience} validations without a better F1")
        return True
    return False


# ----------------------------------------------------------------------------------------------
# save and finish
# ----------------------------------------------------------------------------------------------


def concept_model(run: ConceptRun) -> ConceptModel:
    """The run's model as it is now, with the last tuned thresholds."""
    tuned = run.tuned
    thresholds = tuned.thresholds if tuned is not None else np.full(len(run.vocab), 0.5)
    extra = {
        "feature_shape": list(run.feature_shape),
        "global_threshold": tuned.global_threshold if tuned else 0.5,
        "valid_f1": tuned.f1 if tuned else None,
        "step": run.progress.step,
    }
    return ConceptModel(run.head, run.vocab, thresholds, run.cfg, run.fingerprint, None, extra)


def save(run: ConceptRun, which: str) -> None:
    """Write ``checkpoints/last`` (with the train state) or ``checkpoints/best``, atomically."""
    import torch

    def write(folder: Path) -> None:
        ckpt = ConceptCheckpointLayout(folder)
        concept_model(run).save(folder)
        save_config(run.cfg, ckpt.config)
        ckpt.data_hash.write_text(format_hashes(run.hashes), encoding="utf-8")
        metrics = {
            **dataclasses.asdict(run.progress),
            "audit": {s: a.as_dict() for s, a in run.audits.items()},
        }
        ckpt.metrics.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
        if which == "last":
            state = {
                "progress": dataclasses.asdict(run.progress),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "rng": rng_state(),
            }
            torch.save(state, ckpt.train_state)

    write_checkpoint_dir(run.layout.checkpoints, which, write)


def finish(run: ConceptRun) -> dict[str, Any]:
    """The run's summary (also RUN/result.json)."""
    p = run.progress
    timed = run.step_times[1:] or run.step_times
    result = {
        **dataclasses.asdict(p),
        "total_steps": run.total_steps,
        "vocabulary": len(run.vocab),
        "features": "query cache" if run.cfg.train.query_cache else "vision tower",
        "seconds_per_step": sum(timed) / len(timed) if timed else float("nan"),
        "wall_s": time.perf_counter() - run.t_start,
        "audit": {s: a.as_dict() for s, a in run.audits.items()},
        "run_dir": str(run.layout.root),
    }
    run.layout.result.write_text(json.dumps(result, indent=1), encoding="utf-8")
    best = (
        f"best validation F1 {p.best_f1:.4f} at step {p.best_step}"
        if p.best_f1 is not None
        else "no validation"
    )
    run.say(f"done: {p.step} steps, {best}; checkpoints in {run.layout.checkpoints}")
    return result


__all__ = ["ConceptProgress", "ConceptRun", "fit_concepts", "save", "setup", "train_step", "validate"]
