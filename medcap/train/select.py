"""Choosing checkpoints by the benchmark's metric (``train.select_by``).

The benchmark ranks runs by a caption metric (BERTScore for ImageCLEFmedical 2023/2024), while the
validation loss only says how likely the reference captions are. With ``train.select_by bertscore``
(or rouge1, cider, relevance, ...) every validation also:

1. captions the first ``train.select_subset`` validation images with the run's decoding settings,
   split over the processes (``validation_captions``; under FSDP or DeepSpeed ZeRO-3 every process
   runs the same generate calls in lockstep, since each forward gathers shards from all of them);
2. scores them on the main process with ``medcap.eval.evaluate.score_pairs``, the code of ``medcap
   evaluate`` (same preprocessing, per-pair BERTScore, idf from every validation caption where the
   protocol uses idf), so the logged figure equals what ``medcap evaluate --subset`` reports for
   those captions;
3. hands the mean to every process, where it picks ``checkpoints/best`` and drives early stopping.

The BERTScore model is loaded once per run (``make_selector``), before the first step, so a model
that cannot be loaded stops the run at the start with the setting named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from medcap.config.loader import ConfigError
from medcap.config.train import TrainConfig
from medcap.data.manifest import ManifestRow
from medcap.train.errors import TrainingError

#: Protocol columns that need a model training cannot be given, with the reason.
NOT_FOR_SELECTION = {
    "bleurt": "needs a BLEURT checkpoint (medcap evaluate --bleurt-model), which training does not load",
    "clipscore": "needs a CLIP model and the images (medcap evaluate --clip-model)",
    "refclipscore": "needs a CLIP model and the images (medcap evaluate --clip-model)",
    "similarity": "needs an image-text model (medcap evaluate --clip-model)",
}


def selection_choices(protocol: str) -> list[str]:
    """What ``train.select_by`` may be under ``protocol``: loss, then the protocol's usable columns."""
    from medcap.eval.evaluate import protocol_columns

    return ["loss", *(c for c in protocol_columns(protocol) if c not in NOT_FOR_SELECTION)]


def check_selection(tc: TrainConfig) -> None:
    """Refuse a ``train.select_by`` the protocol cannot compute during training, naming the choices."""
    if tc.select_by == "loss":
        return
    choices = selection_choices(tc.select_protocol)
    if tc.select_by in NOT_FOR_SELECTION:
        raise ConfigError(
            f"train.select_by {tc.select_by}: {NOT_FOR_SELECTION[tc.select_by]}; choose from {', '.join(choices)}"
        )
    if tc.select_by not in choices:
        raise ConfigError(
            f"train.select_by {tc.select_by!r} is not a metric of train.select_protocol "
            f"{tc.select_protocol}; choose from {', '.join(choices)}"
        )


def lower_is_better(select_by: str) -> bool:
    return select_by == "loss"


def improves(value: float | None, best: float | None, min_delta: float, select_by: str) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` in the direction of ``select_by``."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    if lower_is_better(select_by):
        return value < best - min_delta
    return value > best + min_delta


@dataclass
class Selector:
    """What scoring needs at every validation, prepared once per run."""

    metric: str
    protocol: str
    rows: list[ManifestRow]
    """The captioned subset: the first ``train.select_subset`` validation rows."""
    idf_references: list[str]
    """Every validation caption (BERTScore idf, where the protocol uses idf, as ``medcap evaluate``)."""
    bertscore_model: str | None
    bertscore_layers: int | None
    bertscore: Any = None
    """The loaded ``BertScoreExact`` (main process only), reused at every validation."""

    def score(self, predictions: list[str]) -> tuple[float, list[float]]:
        """``(mean, per-caption scores)`` of ``predictions`` for ``self.rows``."""
        import numpy as np

        from medcap.eval.evaluate import score_pairs

        scored = score_pairs(
            predictions,
            [r.caption for r in self.rows],
            self.protocol,
            only=(self.metric,),
            idf_references=self.idf_references,
            bertscore_model=self.bertscore_model,
            bertscore_layers=self.bertscore_layers,
            bertscore=self.bertscore,
            show_progress=False,
        )
        if self.metric not in scored.per_caption:
            why = scored.unavailable.get(self.metric) or "; ".join(scored.unavailable.values())
            raise TrainingError(f"train.select_by {self.metric} could not be computed: {why}")
        values = [float(v) for v in scored.per_caption[self.metric]]
        return float(np.mean(values)), values


def _needs_bertscore(metric: str) -> bool:
    return metric in ("bertscore", "relevance")


def make_selector(
    tc: TrainConfig,
    valid_rows: list[ManifestRow],
    all_valid_captions: list[str],
    main: bool,
    device: Any = None,
) -> Selector | None:
    """The run's ``Selector`` (None when selecting by loss); loads the BERTScore model on the main
    process, so a model that cannot be loaded stops the run before its first step."""
    check_selection(tc)
    if tc.select_by == "loss":
        return None
    from medcap.eval.bertscore import resolve_bertscore_model

    try:
        model, layers = resolve_bertscore_model(tc.select_bertscore_model, tc.select_bertscore_layers)
    except FileNotFoundError as e:
        raise TrainingError(f"train.select_bertscore_model: {e}") from None
    rows = valid_rows[: tc.select_subset] if tc.select_subset else list(valid_rows)
    selector = Selector(tc.select_by, tc.select_protocol, rows, all_valid_captions, model, layers)
    if main and _needs_bertscore(tc.select_by):
        from medcap.eval.bertscore import BertScoreExact
        from medcap.eval.metrics import MetricsConfig

        name = model or MetricsConfig().bertscore_model
        try:
            selector.bertscore = BertScoreExact(
                name, layers, device=str(device) if device is not None else None
            )
        except Exception as e:  # a missing model (offline hub) must stop the run before it trains
            raise TrainingError(
                f"train.select_by {tc.select_by} needs the BERTScore model {name!r}, which cannot be loaded "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Set "
                "train.select_bertscore_model to a local folder, or to 'minilm' (the packaged "
                "all-MiniLM-L6-v2) offline"
            ) from None
    return selector


def validation_captions(run: Any, rows: list[ManifestRow]) -> list[str]:
    """Captions of ``rows`` with the run's decoding settings, split over the processes; every
    process gets all of them, in ``rows`` order.

    Each process captions a contiguous share. Under a sharded strategy (FSDP, DeepSpeed ZeRO-3)
    every forward gathers parameters from all processes, so every process runs the same number of
    generate calls (shares padded to equal length) with ``synced_gpus`` (each keeps stepping until
    all are done).
    """
    import torch
    from accelerate.utils import gather_object

    from medcap.concepts.prompts import row_prompts
    from medcap.data.images import read_image
    from medcap.infer.generate import caption_images
    from medcap.train import sharding

    acc = run.accelerator
    world, rank = acc.num_processes, acc.process_index
    share = math.ceil(len(rows) / world) if rows else 0
    mine = rows[rank * share : (rank + 1) * share]
    real = len(mine)
    if run.sharded and share:
        mine = mine + [rows[-1]] * (share - real)  # lockstep: the same number of calls everywhere
    captions: list[str] = []
    if mine:
        net = acc.unwrap_model(run.model)
        images = [read_image(r.image, min_size=run.image_side) for r in mine]
        # data.prompt_with: each image's modality or concepts in its prompt, as in training.
        prompt = row_prompts(run.cfg, mine) or run.cfg.model.prompt
        with torch.no_grad(), acc.autocast(), sharding.own_parameters_gathered(acc, net):
            captions = caption_images(
                net, run.processor, images, run.cfg.generate, prompt, synced=run.sharded
            )
        net.train()
    captions = captions[:real]
    if world == 1:
        return captions
    return [c for part in gather_object([captions]) for c in part]


def share_figure(run: Any, value: float | None) -> float | None:
    """The main process's figure on every process (they must agree on best and stop)."""
    if run.accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


__all__ = [
    "NOT_FOR_SELECTION",
    "Selector",
    "check_selection",
    "improves",
    "lower_is_better",
    "make_selector",
    "selection_choices",
    "share_figure",
    "validation_captions",
]
