"""The training recipe (``medcap train``): our own explicit loop on accelerate, read top to bottom.

    fit(cfg)
      setup(cfg) -> Run           accelerator, resume point, data, model, optimizer, loaders, logs
      for every optimizer step:
        train_step(run, micro)    forward and backward of each micro-batch, clip, step (or skip)
        log_step(run, ...)        log.csv / TensorBoard / the progress bar every train.log_every
        validate(run)             loss over the whole validation split, captions of the
                                  selection subset (train.select_by) or samples, best
                                  checkpoint, early stopping
        save(run, "last"|"best")  atomic checkpoint folders
      finish(run) -> summary

accelerate only handles devices, DDP, mixed precision and the gradient scaler; accumulation,
clipping, the non-finite guard, validation, early stopping, logs and checkpoints are written out
here. The pieces they use live next to this file: ``batches`` (the data order), ``loss``,
``optim``, ``state`` (checkpoint folders, RNG, position), ``logs``, ``query_cache``, ``select``
(checkpoints chosen by a caption metric), ``sharding`` (FSDP and DeepSpeed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import resource
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from medcap.concepts.prompts import row_prompts
from medcap.config.loader import diff_configs, save_config
from medcap.config.run import RunConfig, read_run_config
from medcap.config.train import RESUME_MAY_DIFFER, RESUME_MAY_DIFFER_SECTIONS
from medcap.data.manifest import ManifestRow, read_manifest
from medcap.layout import CheckpointLayout, RunLayout
from medcap.train import sharding
from medcap.train.batches import (
    CaptionDataset,
    PassBatches,
    calibration_batches,
    epoch_batches,
    eval_batches,
)
from medcap.train.errors import NonFiniteLossError, TrainingError
from medcap.train.logs import RunLog, flat_hyperparameters
from medcap.train.loss import batch_loss, label_token_count
from medcap.train.optim import lr_lambda, make_optimizer
from medcap.train.select import improves, make_selector, share_figure, validation_captions
from medcap.train.state import (
    Progress,
    begin_checkpoint_dir,
    commit_checkpoint_dir,
    format_hashes,
    manifest_hashes,
    progress_metrics,
    read_hashes,
    recover_checkpoint_dir,
    rng_state,
    set_rng_state,
    to_plain_rng,
)


@dataclass
class Run:
    """Everything a run holds while it trains; built by ``setup``, read by the functions below."""

    cfg: RunConfig
    layout: RunLayout
    accelerator: Any
    model: Any  # prepared by accelerate (DDP-wrapped on several processes)
    processor: Any
    family: Any
    optimizer: Any
    scheduler: Any
    trainable: list[Any]
    train_rows: list[ManifestRow]
    valid_rows: list[ManifestRow]
    train_ds: Any
    valid_ds: Any
    collate: Any
    train_len: list[int]
    eval_batches: list[list[int]]
    hashes: dict[str, dict[str, Any]]
    image_side: int | None
    query_cache: Any  # the medcap.train.query_cache module when training from cached features
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    progress: Progress
    log: RunLog
    resumed: bool
    selector: Any = None  # medcap.train.select.Selector when train.select_by is a metric
    sharded: bool = False  # FSDP or ZeRO-3: every forward gathers parameter shards (lockstep generation)
    save_base: bool = False  # a small random-init base goes into the checkpoint (gathered when sharded)
    base_print: str | None = None  # a large random-init base's fingerprint, taken before sharding
    on_validation: Callable[[int, float | None], bool] | None = None  # see fit()
    stopped_by_caller: bool = False
    loaders: dict[int, Any] = field(default_factory=dict)
    aux: Any = None
    """The auxiliary concept head (``train.concept_loss_weight``), or None."""
    step_times: list[float] = field(default_factory=list)
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> Any:
        return self.accelerator.device

    @property
    def decoder_only(self) -> bool:
        return self.family.decoder_only

    def say(self, msg: str) -> None:
        """Print on the main process without breaking the progress bar."""
        if self.main:
            from tqdm.auto import tqdm

            tqdm.write(msg)


@dataclass
class StepResult:
    """What one optimizer step did."""

    loss: float
    grad_norm: float
    finite: bool
    micro_batches: int
    tokens: int


def fit(cfg: RunConfig, on_validation: Callable[[int, float | None], bool] | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data`` as ``cfg.train`` says; returns a summary dict.

    Launch with ``medcap train`` for one process or ``accelerate launch -m medcap train`` for
    several (DDP, FSDP, DeepSpeed). Raises ``TrainingError`` with an actionable message when the run
    cannot start (missing data, a checkpoint in the way, a resume mismatch) or cannot go on
    (non-finite losses in a row).

    ``on_validation(step, figure)`` is called after every validation with the figure of
    ``train.select_by`` (``medcap tune`` reports it to the pruner); returning True stops the run
    there, as early stopping does (``stopped_by_caller`` in the summary).
    """
    from medcap.model.build import import_backends

    # Here, not in the frame that holds the model, optimizer and loaders: see import_backends.
    import_backends()
    return _fit(cfg, on_validation)


def _fit(cfg: RunConfig, on_validation: Callable[[int, float | None], bool] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    run = setup(cfg)
    run.on_validation = on_validation
    tc, progress = cfg.train, run.progress
    run.model.train()
    window = _Window()
    bar = tqdm(
        total=run.total_steps,
        initial=progress.step,
        disable=not (run.main and tc.progress_bar),
        desc="train",
        dynamic_ncols=True,
        unit="step",
    )
    stop = progress.stopped_early or progress.step >= run.total_steps
    try:
        while not stop:
            batches = epoch_batches(
                run.train_len, run.global_batch, tc.seed, progress.epoch, tc.bucket_by_length
            )
            rank, size = run.accelerator.process_index, tc.batch_size
            mine = [b[rank * size : (rank + 1) * size] for b in batches]
            it = _load(run, mine[progress.batch_in_epoch :], run.train_ds)
            while progress.batch_in_epoch < len(batches) and not stop:
                t_step = time.perf_counter()
                micro = [next(it) for _ in range(min(tc.grad_accum, len(batches) - progress.batch_in_epoch))]
                step = train_step(run, micro)
                progress.batch_in_epoch += step.micro_batches
                progress.samples_seen += step.micro_batches * run.global_batch
                epoch_f = progress.epoch + progress.batch_in_epoch / len(batches)
                _count_nonfinite(run, step)
                window.add(step, run.global_batch)
                run.step_times.append(time.perf_counter() - t_step)  # data loading included
                if progress.step % tc.log_every == 0 or progress.step == run.total_steps:
                    log_step(run, window, epoch_f, step.grad_norm, bar)
                bar.update(1)

                epoch_done = progress.batch_in_epoch >= len(batches)
                finished = progress.step >= run.total_steps
                due = (
                    (tc.eval_every is not None and progress.step % tc.eval_every == 0)
                    or (epoch_done and tc.eval_at_epoch_end)
                    or finished
                )
                if epoch_done:
                    progress.epoch += 1
                    progress.batch_in_epoch = 0
                if due:
                    stop = validate(run, epoch_f)
                stop = stop or finished
                periodic = tc.save_every is not None and progress.step % tc.save_every == 0
                if due or epoch_done or stop or periodic:
                    save(run, "last")
                if epoch_done:
                    break  # the next epoch has its own batch order
    finally:
        bar.close()
        run.log.close()
        # Persistent workers end with their loaders; without this they would live on (idle, holding
        # memory) for as long as anything refers to this run, e.g. while `medcap run` predicts.
        it = None
        run.loaders.clear()
    return finish(run)


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------


def setup(cfg: RunConfig) -> Run:
    """Devices, the checkpoint to resume from, data, model, optimizer, schedule and logs."""
    import torch
    from accelerate.utils import set_seed

    tc = cfg.train
    layout = RunLayout(tc.out_dir)
    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    last = _resume_point(accelerator, layout, tc.resume)

    # --- data ------------------------------------------------------------------------------
    train_rows = read_manifest(cfg.data.manifest(cfg.data.train_split), cfg.data.max_train_samples)
    valid_rows = read_manifest(cfg.data.manifest(cfg.data.valid_split), cfg.data.max_eval_samples)
    if not train_rows:
        raise TrainingError(f"{cfg.data.manifest(cfg.data.train_split)} has no rows: nothing to train on")
    if not valid_rows:
        raise TrainingError(f"{cfg.data.manifest(cfg.data.valid_split)} has no rows: nothing to validate on")
    hashes = manifest_hashes(cfg.data)
    if last is not None:
        check_resume(cfg, last, hashes)
    # Before the model: a selection metric whose model cannot be loaded stops the run here.
    selector = make_selector(
        tc,
        valid_rows,
        [r.caption for r in read_manifest(cfg.data.manifest(cfg.data.valid_split))],
        main,
        accelerator.device,
    )

    # --- schedule --------------------------------------------------------------------------
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = tc.batch_size * world
    batches_per_epoch = math.ceil(len(train_rows) / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.grad_accum)
    total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * steps_per_epoch
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(tc.warmup_ratio * total_steps)

    # --- model -----------------------------------------------------------------------------
    from medcap.model.build import build_model

    set_seed(tc.seed)  # same seed in every process: identical init (DDP also broadcasts rank 0's)
    with sharding.whole_model_build(accelerator):
        model, processor = build_model(
            cfg.model,
            verbose=main,
            adapters=_adapter_setup(cfg, layout, train_rows, hashes, total_steps, last),
        )
    family = model.medcap_family
    pad_multiple = tc.pad_to_multiple_of or (8 if accelerator.device.type == "cuda" else 1)
    collator = family.collator(processor, cfg.model, tc.max_caption_tokens, pad_multiple)
    # The model's input side: JPEGs decode in draft mode to no less than it (medcap.data.images).
    image_side = family.image_side(processor)
    # data.prompt_with: each image's modality or concepts in its prompt, from the ground truth.
    train_prompts, valid_prompts = row_prompts(cfg, train_rows), row_prompts(cfg, valid_rows)
    query_cache = None
    if tc.query_cache is not None:
        from medcap.train import query_cache

        train_ds = query_cache.CachedQueryDataset(tc.query_cache, train_rows, collator, train_prompts)
        valid_ds = query_cache.CachedQueryDataset(tc.query_cache, valid_rows, collator, valid_prompts)
        collate = train_ds.collate
    else:
        train_ds = CaptionDataset(train_rows, min_size=image_side, prompts=train_prompts)
        valid_ds = CaptionDataset(valid_rows, min_size=image_side, prompts=valid_prompts)
        collate = collator
    aux = None
    if tc.concept_loss_weight > 0:
        from medcap.concepts.auxiliary import AuxiliaryConcepts

        if accelerator.num_processes > 1:
            raise TrainingError(
                "train.concept_loss_weight: the auxiliary concept head trains in one process only"
            )
        aux = AuxiliaryConcepts(
            model, train_rows, tc.concept_loss_weight, tc.concept_min_freq, accelerator.device
        )
        if last is not None:
            aux.load(last.root)
        train_ds, valid_ds = aux.wrap(train_ds, train_rows), aux.wrap(valid_ds, valid_rows)
        collate = aux.collate(collate)
        if main:
            print(aux.audit.describe(f"auxiliary concept head ({len(aux.vocab)} CUIs)"), flush=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    train_len = [
        len(x) for x in tokenizer([r.caption for r in train_rows], add_special_tokens=False)["input_ids"]
    ]
    valid_len = [
        len(x) for x in tokenizer([r.caption for r in valid_rows], add_special_tokens=False)["input_ids"]
    ]

    my_eval_batches = eval_batches(valid_len, tc.eval_batch_size or tc.batch_size, rank, world)

    # --- optimizer -------------------------------------------------------------------------
    trainable = [p for p in model.parameters() if p.requires_grad]
    if aux is not None:
        trainable += aux.parameters()
    if not trainable:
        raise TrainingError(
            "the model has no trainable parameters: check model.peft / model.train_* settings"
        )
    optimizer = make_optimizer(trainable, tc, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.schedule, warmup, total_steps))
    save_base, base_print = _base_weights_kept(cfg, model, family)
    if sharding.is_sharded(accelerator):
        sharding.prepare_model(accelerator, model, tc.batch_size, tc.grad_accum, tc.max_grad_norm)
        if query_cache is not None:
            # The cache's check hashes the vision weights: take it before they are split in shards.
            query_cache.remember_vision_fingerprint(model)
        if (
            base_print is None
            and (cfg.model.random_init or cfg.model.name_or_path in family.tiny_names)
            and not save_base
        ):
            from medcap.model.checkpoint import base_fingerprint

            base_print = base_fingerprint(model)  # of the full weights, before they are split
    model, optimizer = accelerator.prepare(model, optimizer)
    if sharding.is_sharded(accelerator):
        query_cache = sharding.after_prepare(accelerator, model, query_cache)
        # FSDP swapped the parameters for sharded ones (the optimizer was pointed at them).
        trainable = [p for p in model.parameters() if p.requires_grad]

    progress = Progress()
    if last is not None:
        progress = _restore(accelerator, model, optimizer, scheduler, last)
        if progress.stopped_early and (
            tc.patience is None or progress.evals_without_improvement < tc.patience
        ):
            progress.stopped_early = False  # a raised (or removed) train.patience lets the run go on
    elif main:
        layout.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, layout.config)

    run = Run(
        cfg=cfg,
        layout=layout,
        accelerator=accelerator,
        model=model,
        processor=processor,
        family=family,
        optimizer=optimizer,
        scheduler=scheduler,
        trainable=trainable,
        train_rows=train_rows,
        valid_rows=valid_rows,
        train_ds=train_ds,
        valid_ds=valid_ds,
        collate=collate,
        train_len=train_len,
        eval_batches=my_eval_batches,
        hashes=hashes,
        image_side=image_side,
        query_cache=query_cache,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        progress=progress,
        log=RunLog(
            layout,
            main,
            tc.report_to,
            progress.step if last is not None else None,
            flat_hyperparameters(cfg),
            tc.tracker_project,
        ),
        resumed=last is not None,
        selector=selector,
        sharded=sharding.params_sharded(accelerator),
        save_base=save_base,
        base_print=base_print,
        aux=aux,
    )
    if last is not None:
        run.say(
            f"resumed from {last.root} at step {progress.step} (epoch {progress.epoch}, batch {progress.batch_in_epoch})"
            + (
                f"; training on to step {total_steps}"
                if total_steps > progress.step
                else "; nothing left to train"
            )
        )
    run.say(
        f"training {len(train_rows)} images ({batches_per_epoch} global batches of {global_batch}, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps), validating on {len(valid_rows)}; "
        # (ZeRO-3 leaves each parameter an empty partition; ds_numel is its whole size.)
        f"{sum(getattr(p, 'ds_numel', p.numel()) for p in run.trainable):,} trainable parameters"
        + f"; {world} process(es) ({sharding.strategy(accelerator)}) on {accelerator.device}, mixed "
        f"precision {tc.mixed_precision}"
    )
    return run


def _base_weights_kept(cfg: RunConfig, model: Any, family: Any) -> tuple[bool, str | None]:
    """Whether checkpoints keep the base weights (a small random-init or tiny base: no hub has them),
    as ``save_trainable`` decides; the fingerprint is taken later, only when sharding needs it."""
    from medcap.model.checkpoint import BASE_WEIGHTS_LIMIT

    mc = cfg.model
    if not (mc.random_init or mc.name_or_path in family.tiny_names):
        return False, None
    total = sum(p.numel() for p in model.parameters())
    return total <= BASE_WEIGHTS_LIMIT and mc.quantization == "none", None


def _adapter_setup(
    cfg: RunConfig,
    layout: RunLayout,
    train_rows: list[ManifestRow],
    hashes: dict[str, dict[str, Any]],
    total_steps: int,
    last: CheckpointLayout | None,
) -> Any:
    """What the adapter needs from the run: its step count (AdaLoRA), training batches and the cache
    beside the run (EVA, CorDA), or, when resuming, the checkpoint it is loaded from (no init then)."""
    from medcap.model.families import resolve_family
    from medcap.model.peft_methods import AdapterSetup

    tc = cfg.train
    return AdapterSetup(
        train_steps=total_steps,
        calibration=calibration_batches(
            train_rows,
            resolve_family(cfg.model),
            cfg.model,
            tc.max_caption_tokens,
            tc.batch_size,
            cfg.model.peft.init_batches,
            tc.seed,
            progress=tc.progress_bar,
        ),
        cache_dir=layout.peft_init,
        cache_key={
            "train_manifest": hashes[cfg.data.train_split]["sha256"],
            "batch_size": tc.batch_size,
            "seed": tc.seed,
            "max_caption_tokens": tc.max_caption_tokens,
        },
        checkpoint=last.root if last is not None else None,
        show_progress=tc.progress_bar,
    )


def _accelerator(cfg: RunConfig) -> Any:
    """accelerate's Accelerator for the run, with the CPU threads or CUDA settings it needs."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    tc = cfg.train
    if tc.cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # accelerate turns DeepSpeed off for cpu=True and would run a plain process without a word.
        raise TrainingError(
            "train.cpu is true, which turns off the DeepSpeed this run was launched with (accelerate "
            "would train a plain process): set --train.cpu false (without a GPU DeepSpeed runs on the "
            "CPU by itself) or launch without the DeepSpeed config"
        )
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != tc.mixed_precision:
        # accelerate keeps one process-wide state and refuses another mixed precision in the same
        # process ("AcceleratorState has already been initialized"): a second fit() (a notebook
        # comparing a bf16 and an fp32 config, the tests) starts from a fresh one. The process
        # group (PartialState) is kept.
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        cpu=tc.cpu,
        # find_unused_parameters costs a graph walk per step; frozen parameters are not "unused".
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    sharding.enable_fsdp_on_cpu(accelerator)
    if accelerator.device.type == "cpu":
        world = accelerator.num_processes
        torch.set_num_threads(tc.cpu_threads or max(1, (os.cpu_count() or 1) // world - cfg.data.num_workers))
    elif accelerator.device.type == "cuda":
        from medcap.model.cuda import set_cuda_allocator_defaults, set_cuda_attention_backends

        # cuDNN attention builds a plan per new batch shape (about 1 s each on H100): see
        # set_cuda_attention_backends; bucketed batches would pay it on most steps.
        set_cuda_attention_backends(cudnn=False)
        # Bucketed batches change size every step: without this the allocator's reserve grows well
        # past what is allocated (set_cuda_allocator_defaults).
        set_cuda_allocator_defaults()
    return accelerator


def _resume_point(accelerator: Any, layout: RunLayout, resume: bool) -> CheckpointLayout | None:
    """``checkpoints/last`` when the run folder holds one (after repairing a half-written swap)."""
    if accelerator.is_main_process:
        recover_checkpoint_dir(layout.checkpoints, "last")
        recover_checkpoint_dir(layout.checkpoints, "best")
    accelerator.wait_for_everyone()
    last = layout.last if layout.last.train_state.is_file() else None
    if last is not None and not resume:
        raise TrainingError(
            f"{layout.root} already holds a checkpoint ({last.root}). Continue it with --train.resume true "
            f"(or 'medcap train --resume {layout.root}'), or choose another train.out_dir"
        )
    return last


def check_resume(cfg: RunConfig, ckpt: CheckpointLayout, hashes: dict[str, dict[str, Any]]) -> None:
    """Refuse to resume from a checkpoint trained with other settings or other data, saying what differs."""
    saved = read_run_config(ckpt.root)
    diffs = [
        d
        for d in diff_configs(saved, cfg)
        if d.split(":", 1)[0] not in RESUME_MAY_DIFFER and not d.startswith(RESUME_MAY_DIFFER_SECTIONS)
    ]
    problems = [f"  config {d}" for d in diffs]
    saved_hashes = read_hashes(ckpt.data_hash)
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
            f"cannot resume from {ckpt.root}: it was trained with other settings or data (checkpoint -> now):\n"
            + "\n".join(problems)
            + "\nResume with the original config and data, or start a new run in another train.out_dir."
        )


def _restore(
    accelerator: Any, model: Any, optimizer: Any, scheduler: Any, last: CheckpointLayout
) -> Progress:
    """Load weights, optimizer, schedule, scaler, position and this process's RNG from ``last``."""
    import torch

    from medcap.model.checkpoint import load_trainable
    from medcap.model.peft_state import load_training_state

    state = torch.load(last.train_state, map_location="cpu", weights_only=True)
    kind = sharding.strategy(accelerator)
    # Checkpoints older than sharded training hold no strategy: they were single-process or DDP.
    written = state.get("strategy", "ddp" if state["world_size"] > 1 else "single")
    if written != kind and {written, kind} & {"fsdp", "deepspeed"}:
        raise TrainingError(
            f"cannot resume from {last.root}: it was written under {written}, this run is {kind} (the "
            "trainable state and optimizer are stored differently); resume with the accelerate config "
            "it was trained with"
        )
    world = accelerator.num_processes
    if state["world_size"] != world:
        raise TrainingError(
            f"cannot resume from {last.root}: it was written by {state['world_size']} processes, "
            f"this run has {world}; the data order and RNG streams depend on it"
        )
    net = accelerator.unwrap_model(model)
    if sharding.is_sharded(accelerator):
        # Each process loads its own shard of the trainable parameters and optimizer state.
        sharding.load_sharded(accelerator, model, optimizer, last.sharded)
    else:
        load_trainable(net, last.root)
        optimizer.load_state_dict(state["optimizer"])
    # The method's own state beside the weights (AdaLoRA's rank allocator).
    load_training_state(net, state.get("peft"))
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_state(to_plain_rng(state["rng"][accelerator.process_index]))
    return Progress(**state["progress"])


def _load(run: Run, indices: list[list[int]], dataset: Any) -> Iterator[dict[str, Any]]:
    """Batches of ``dataset`` at ``indices``, on the run's device.

    One DataLoader per dataset for the whole run, its batches replaced before each pass: with
    workers, the same processes serve every epoch and every validation instead of a fork and a
    warm-up each time (0.16 s a pass measured on 2 cores, ~66 passes in the demo). The decoding
    draws no random numbers, so worker seeds do not matter.
    """
    import torch
    from torch.utils.data import DataLoader

    dl = run.loaders.get(id(dataset))
    if dl is None:
        workers = run.cfg.data.num_workers
        dl = run.loaders[id(dataset)] = DataLoader(
            dataset,
            batch_sampler=PassBatches(),
            collate_fn=run.collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            # A private generator: starting a pass must not draw from the global torch RNG,
            # or a resumed run (which starts one mid-epoch) would see other dropout masks.
            generator=torch.Generator().manual_seed(run.cfg.train.seed * 1_000_003),
            pin_memory=run.device.type == "cuda",
        )
    dl.batch_sampler.batches = indices
    for batch in dl:
        yield {k: (v.to(run.device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# one step
# ----------------------------------------------------------------------------------------------


def train_step(run: Run, micro: list[dict[str, Any]]) -> StepResult:
    """One optimizer step over ``micro`` (``train.grad_accum`` micro-batches, fewer at an epoch's end).

    The gradient is that of (sum of all token losses) / (all label tokens of the step, over every
    micro-batch and process). A non-finite loss or gradient skips the step; the schedule advances
    anyway, so the learning rate stays aligned with the data.
    """
    import torch

    from medcap.model.peft_state import after_optimizer_step, orthogonal_penalty

    acc, tc = run.accelerator, run.cfg.train
    world = acc.num_processes
    local_tokens = sum(label_token_count(b["labels"], run.decoder_only) for b in micro)
    n_tokens = acc.reduce(local_tokens.to(run.device).clone(), "sum").clamp(min=1)
    n_images = sum(len(b["labels"]) for b in micro)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    # AdaLoRA's orthogonality penalty, once per step (identical on every process, so DDP's mean keeps it).
    penalty = orthogonal_penalty(acc.unwrap_model(run.model))
    aux_sum = 0.0
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last else acc.no_sync(run.model)
        with sync:
            s = batch_loss(run.model, batch, run.decoder_only, run.query_cache)
            # DDP averages gradients over processes: scale by world so the result is the
            # gradient of (sum of all token losses) / (all label tokens of the step).
            scale = sharding.loss_scale(acc, tc.grad_accum)
            total = s * (world * scale) / n_tokens
            if run.aux is not None:  # the auxiliary concept loss: mean over the step's images
                a = run.aux.loss_sum(batch)
                total = total + run.aux.weight * scale * a / n_images
                aux_sum += float(a.detach())
            if last and penalty is not None:
                total = total + penalty * scale
            acc.backward(total)
        loss_sum += s.detach().double()
    if run.aux is not None:
        run.aux.last_losses.append(aux_sum / n_images)
    step_loss = float(acc.reduce(loss_sum, "sum") / n_tokens)
    measured = acc.clip_grad_norm_(run.trainable, tc.max_grad_norm or float("inf"))
    if hasattr(measured, "full_tensor"):  # FSDP2: a DTensor
        measured = measured.full_tensor()
    grad_norm = float(measured) if measured is not None else float("nan")
    # DeepSpeed clips inside its own step (gradient_clipping) and may report no norm here.
    finite = math.isfinite(step_loss) and (
        measured is None or math.isfinite(grad_norm) or acc.scaler is not None
    )
    if finite or acc.scaler is not None:
        # With a scaler, it sees the inf/NaN gradients itself, skips and lowers its scale.
        run.optimizer.step()
    if finite:
        after_optimizer_step(acc.unwrap_model(run.model), run.progress.step)  # AdaLoRA's rank allocation
    run.optimizer.zero_grad(set_to_none=True)
    # The schedule follows the data even over a skipped step, so lr and position stay aligned
    # (torch warns when the very first optimizer step was the one skipped: expected here).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        run.scheduler.step()
    run.progress.step += 1
    return StepResult(step_loss, grad_norm, finite, len(micro), int(n_tokens))


def _count_nonfinite(run: Run, step: StepResult) -> None:
    """Count skipped steps; too many in a row stop the run with what to do."""
    progress = run.progress
    if step.finite:
        progress.nonfinite_in_row = 0
        return
    progress.nonfinite_total += 1
    progress.nonfinite_in_row += 1
    run.say(
        f"[step {progress.step}] non-finite loss {step.loss} / grad norm {step.grad_norm}: step skipped "
        f"({progress.nonfinite_in_row} in a row, {progress.nonfinite_total} in all)"
    )
    if progress.nonfinite_in_row >= run.cfg.train.max_nonfinite_in_row:
        raise NonFiniteLossError(
            f"{progress.nonfinite_in_row} non-finite losses in a row at step {progress.step}: "
            f"training diverged. The last good checkpoint is {run.layout.last.root} (if any). "
            "Lower train.lr, raise train.warmup_steps, keep train.max_grad_norm set, or use "
            "bf16 instead of fp16 mixed precision"
        )


@dataclass
class _Window:
    """Training figures since the last log line."""

    t: float = field(default_factory=time.perf_counter)
    samples: int = 0
    tokens: int = 0
    loss: float = 0.0
    n: int = 0

    def reset(self) -> None:
        self.t, self.samples, self.tokens, self.loss, self.n = time.perf_counter(), 0, 0, 0.0, 0

    def add(self, step: StepResult, global_batch: int) -> None:
        if step.finite:
            self.loss += step.loss
            self.n += 1
        self.samples += step.micro_batches * global_batch
        self.tokens += step.tokens


def log_step(run: Run, window: _Window, epoch_f: float, grad_norm: float, bar: Any) -> None:
    """Mean loss, learning rate and throughput since the last line: log.csv, TensorBoard, the bar."""
    dt = max(time.perf_counter() - window.t, 1e-9)
    mean_loss = window.loss / window.n if window.n else float("nan")
    lr_now = run.scheduler.get_last_lr()[0]
    run.log.row(
        step=run.progress.step,
        epoch=round(epoch_f, 4),
        split="train",
        loss=mean_loss,
        lr=lr_now,
        samples_per_s=round(window.samples / dt, 3),
        tokens_per_s=round(window.tokens / dt, 1),
        grad_norm=grad_norm,
        nonfinite_skipped=run.progress.nonfinite_total,
        elapsed_s=round(time.perf_counter() - run.t_start, 2),
    )
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}", sps=f"{window.samples / dt:.1f}")
    window.reset()


# ----------------------------------------------------------------------------------------------
# validate
# ----------------------------------------------------------------------------------------------


def validation_loss(run: Run) -> float:
    """Mean token loss over the whole validation split (exact over processes)."""
    import torch

    net = run.accelerator.unwrap_model(run.model)
    net.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)
    batches, real = run.eval_batches, len(run.eval_batches)
    if run.sharded:
        # Every forward gathers shards from all processes: all run as many, the extra ones unscored.
        from accelerate.utils import gather_object

        most = max(gather_object([real]))
        batches = batches + [batches[-1] if batches else [0]] * (most - real)
    with torch.no_grad(), run.accelerator.autocast():
        for i, batch in enumerate(_load(run, batches, run.valid_ds)):
            loss = batch_loss(net, batch, run.decoder_only, run.query_cache).double()
            if i < real:
                total[0] += loss
                total[1] += label_token_count(batch["labels"], run.decoder_only)
    total = run.accelerator.reduce(total, "sum")
    net.train()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def validation_figures(run: Run) -> tuple[float | None, list[dict[str, Any]]]:
    """The selection metric (None when selecting by loss) and the sample captions to log.

    By loss: the first ``train.num_sample_captions`` validation images are captioned. By a metric:
    the selection subset is captioned and scored (``medcap.train.select``); the samples are its
    first ``num_sample_captions`` captions with their scores (more rows are captioned if more
    samples are asked for than the subset holds).
    """
    tc, selector = run.cfg.train, run.selector
    subset = selector.rows if selector is not None else []
    rows = run.valid_rows[: max(len(subset), tc.num_sample_captions)]
    predictions = validation_captions(run, rows) if rows else []
    samples = [
        {"id": r.id, "reference": r.caption, "prediction": p}
        for r, p in zip(rows[: tc.num_sample_captions], predictions, strict=False)
    ]
    score = None
    if selector is not None and run.main:
        score, per_caption = selector.score(predictions[: len(subset)])
        for item, value in zip(samples, per_caption, strict=False):
            item.update(metric=selector.metric, score=value)
    if selector is not None:
        score = share_figure(run, score)
    return score, samples if run.main else []


def validate(run: Run, epoch_f: float) -> bool:
    """Validate, log, keep the best checkpoint; returns True when early stopping says stop.

    The best checkpoint and early stopping follow ``train.select_by``: the validation loss, or a
    caption metric of the selection subset (``validation_figures``)."""
    tc, progress = run.cfg.train, run.progress
    loss = validation_loss(run)
    score, samples = validation_figures(run)
    progress.last_eval_step = progress.step
    progress.last_valid_loss = loss
    progress.last_score = score
    by_loss = run.selector is None
    figure = loss if by_loss else score
    best_figure = progress.best_loss if by_loss else progress.best_score
    improved = improves(figure, best_figure, tc.min_delta, tc.select_by)
    if improved:
        progress.best_loss, progress.best_score, progress.best_step = loss, score, progress.step
        progress.evals_without_improvement = 0
    else:
        progress.evals_without_improvement += 1
    run.log.row(
        step=progress.step,
        epoch=round(epoch_f, 4),
        split="valid",
        loss=loss,
        lr=run.scheduler.get_last_lr()[0],
        elapsed_s=round(time.perf_counter() - run.t_start, 2),
        metric="" if by_loss else tc.select_by,
        score=score,
    )
    run.log.samples(progress.step, epoch_f, samples)
    best = _best_text(run)
    now = f"validation loss {loss:.4f}" + ("" if by_loss else f", {tc.select_by} {score:.4f}")
    run.say(f"[step {progress.step}] {now} (best {best})")
    for s in samples:
        scored = f"  [{s['metric']} {s['score']:.4f}]" if "score" in s else ""
        run.say(f"  {s['id']}{scored}\n    reference:  {s['reference']}\n    prediction: {s['prediction']}")
    if improved:
        save(run, "best")
    if run.on_validation is not None and run.on_validation(progress.step, figure):
        run.stopped_by_caller = True
        run.say(f"[step {progress.step}] stopped by the caller (e.g. pruned by medcap tune)")
        return True
    if tc.patience is not None and progress.evals_without_improvement >= tc.patience:
        progress.stopped_early = True
        run.say(f"early stopping: {tc.patience} validations without improvement (best {best})")
        return True
    return False


def _best_text(run: Run) -> str:
    """The best checkpoint's figure for messages: ``0.4321 @ step 40`` (loss or the metric)."""
    progress = run.progress
    figure = progress.best_loss if run.selector is None else progress.best_score
    if figure is None:
        return "n/a"
    name = "" if run.selector is None else f"{run.cfg.train.select_by} "
    return f"{name}{figure:.4f} @ step {progress.best_step}"


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------


def save(run: Run, which: str) -> None:
    """Write ``checkpoints/last`` (with the train state to resume from) or ``checkpoints/best``, atomically.

    Every process takes part in ``last``: each one's RNG state goes into it. Under FSDP or DeepSpeed
    every process also writes its shard of the trainable state and optimizer into ``last/sharded``,
    and the model files are gathered to the main process (``medcap.train.sharding``).
    """
    import torch
    from accelerate.utils import gather_object

    from medcap.model.peft_state import training_state

    acc, root = run.accelerator, run.layout.checkpoints
    sharded = sharding.is_sharded(acc)
    states = gather_object([rng_state()]) if which == "last" else None
    folder = begin_checkpoint_dir(root, which) if run.main else root / f".{which}.tmp"
    acc.wait_for_everyone()  # the folder exists before any process writes its shard
    state = None
    if sharded:
        if which == "last":
            sharding.save_sharded(acc, run.model, run.optimizer, CheckpointLayout(folder).sharded)
        state = sharding.gather_trainable(acc, run.model, with_frozen=run.save_base)
    if run.main:
        from medcap.model.checkpoint import save_trainable

        ckpt = CheckpointLayout(folder)
        save_trainable(acc.unwrap_model(run.model), folder, state=state, fingerprint=run.base_print)
        save_config(run.cfg, ckpt.config)
        ckpt.data_hash.write_text(format_hashes(run.hashes), encoding="utf-8")
        if which == "last":
            train_state = {
                "progress": dataclasses.asdict(run.progress),
                # Sharded runs keep the optimizer in last/sharded, each process its own part.
                "optimizer": None if sharded else run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "rng": states,
                "world_size": acc.num_processes,
                "strategy": sharding.strategy(acc),
                "peft": training_state(acc.unwrap_model(run.model)),
            }
            torch.save(train_state, ckpt.train_state)
        if run.aux is not None:
            run.aux.save(folder)
        ckpt.metrics.write_text(json.dumps(progress_metrics(run.progress), indent=1), encoding="utf-8")
        commit_checkpoint_dir(root, which)
    acc.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# finish
# ----------------------------------------------------------------------------------------------


def finish(run: Run) -> dict[str, Any]:
    """The run's summary (also written to ``RUN/result.json``)."""
    progress = run.progress
    timed = run.step_times[1:] or run.step_times
    result = progress_metrics(progress)
    result.update(
        select_by=run.cfg.train.select_by,
        stopped_by_caller=run.stopped_by_caller,
        total_steps=run.total_steps,
        steps_per_epoch=run.steps_per_epoch,
        trainable_parameters=sum(p.numel() for p in run.trainable),
        seconds_per_step=sum(timed) / len(timed) if timed else float("nan"),
        peak_memory_gb=peak_memory_gb(run.device),
        wall_s=time.perf_counter() - run.t_start,
        run_dir=str(run.layout.root),
    )
    if run.aux is not None and run.aux.last_losses:
        tail = run.aux.last_losses[-20:]
        result["concept_loss_last"] = sum(tail) / len(tail)
        result["concept_vocabulary"] = len(run.aux.vocab)
    if run.main:
        run.layout.result.write_text(json.dumps(result, indent=1), encoding="utf-8")
    ckpts = run.layout.checkpoints
    run.say(
        f"done: {progress.step} steps, last validation loss {progress.last_valid_loss:.4f}, best "
        f"{_best_text(run)}; checkpoints in {ckpts}"
        if progress.best_step is not None and progress.last_valid_loss is not None
        else f"done: {progress.step} steps; checkpoints in {ckpts}"
    )
    return result


def peak_memory_gb(device: Any) -> float:
    """Peak memory of this process: allocated on a GPU, resident (RSS) on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


__all__ = [
    "Run",
    "StepResult",
    "check_resume",
    "finish",
    "fit",
    "log_step",
    "save",
    "setup",
    "train_step",
    "validate",
]
