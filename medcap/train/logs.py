"""A run's logs: ``log.csv`` and ``samples.jsonl``, and the trackers of ``train.report_to``."""

from __future__ import annotations

import csv
import json
import math
import uuid
from pathlib import Path
from typing import Any

from medcap.config.loader import to_dict
from medcap.layout import RunLayout
from medcap.train.errors import TrainingError

LOG_COLUMNS = [
    "step",
    "epoch",
    "split",
    "loss",
    "lr",
    "samples_per_s",
    "tokens_per_s",
    "grad_norm",
    "nonfinite_skipped",
    "elapsed_s",
]


def _truncate_after(path: Path, step: int, is_csv: bool) -> None:
    """Drop log lines written after ``step`` (a killed run logged steps its checkpoint never saw)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if is_csv:
        head, body = lines[:1], lines[1:]
        keep = [ln for ln in body if ln.strip() and int(ln.split(",", 1)[0]) <= step]
        text = "".join(head + keep)
    else:
        keep = []
        for ln in lines:
            try:
                if json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (ValueError, KeyError):
                pass  # a torn last line from the kill
        text = "".join(keep)
    path.write_text(text, encoding="utf-8")


class RunLog:
    """A run's logs, written by the main process: RUN/log.csv and RUN/samples.jsonl (``csv``) and the
    trackers of ``train.report_to`` (accelerate's own tracker classes: TensorBoard in RUN/tensorboard,
    W&B, MLflow ...), each getting the hyperparameters, the metric curves and the sample captions.

    A resumed run drops what was logged after its checkpoint (a killed run logged steps the checkpoint
    never saw) and continues the same tracker run (TensorBoard's purge step, W&B's run id).
    """

    def __init__(
        self,
        layout: RunLayout,
        enabled: bool,
        report_to: list[str],
        resume_step: int | None,
        hparams: dict[str, Any] | None = None,
        project: str = "medcap",
    ):
        self.enabled = enabled
        self.csv_path = layout.log
        self.samples_path = layout.samples
        self.write_csv = enabled and "csv" in report_to
        self.trackers: list[Any] = []
        if not enabled:
            return
        if self.write_csv:
            if resume_step is not None:
                _truncate_after(self.csv_path, resume_step, is_csv=True)
                _truncate_after(self.samples_path, resume_step, is_csv=False)
            new = not self.csv_path.is_file() or self.csv_path.stat().st_size == 0
            self._csv_file = self.csv_path.open("a", newline="", encoding="utf-8")
            self._csv = csv.DictWriter(self._csv_file, fieldnames=LOG_COLUMNS)
            if new:
                self._csv.writeheader()
        for name in report_to:
            if name != "csv":
                self.trackers.append(_start_tracker(name, layout, project, resume_step, hparams or {}))

    def row(self, **values: Any) -> None:
        """One line of log.csv (a logged step or a validation) and its numbers at every tracker."""
        if not self.enabled:
            return
        if self.write_csv:
            self._csv.writerow(
                {
                    k: (f"{v:.6g}" if isinstance(v, float) else v)
                    for k, v in values.items()
                    if k in LOG_COLUMNS
                }
            )
            self._csv_file.flush()
        numbers = {
            f"{values['split']}/{key}": float(v)
            for key in ("loss", "lr", "samples_per_s", "grad_norm")
            if isinstance(v := values.get(key), int | float) and math.isfinite(v)
        }
        for tracker in self.trackers:
            tracker.log(numbers, step=values["step"])

    def samples(self, step: int, epoch: float, items: list[dict[str, str]]) -> None:
        """Sample captions: samples.jsonl, a table (W&B) or a text panel (TensorBoard and the others)."""
        if not self.enabled or not items:
            return
        if self.write_csv:
            with self.samples_path.open("a", encoding="utf-8") as f:
                for item in items:
                    f.write(
                        json.dumps({"step": step, "epoch": round(epoch, 4), **item}, ensure_ascii=False)
                        + "\n"
                    )
        rows = [[i["id"], i["reference"], i["prediction"]] for i in items]
        text = "\n\n".join(
            f"**{i['id']}**  \nref: {i['reference']}  \npred: {i['prediction']}" for i in items
        )
        for tracker in self.trackers:
            if hasattr(tracker, "log_table"):
                tracker.log_table("samples", columns=["id", "reference", "prediction"], data=rows, step=step)
            else:
                tracker.log({"samples": text}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.write_csv:
            self._csv_file.close()
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def flat_hyperparameters(cfg: Any) -> dict[str, Any]:
    """A run config as ``{"train.lr": 1e-4, ...}`` with values every tracker takes (str, int, float, bool)."""
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        else:  # None, lists: as text, so TensorBoard's hparams accept them
            out[prefix] = json.dumps(value)

    walk(to_dict(cfg), "")
    return out


def _start_tracker(
    name: str, layout: RunLayout, project: str, resume_step: int | None, hparams: dict[str, Any]
) -> Any:
    """Start one of accelerate's trackers for this run folder and give it the hyperparameters."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    run_name = layout.root.resolve().name
    if name == "tensorboard":
        tracker = cls("", str(layout.tensorboard), purge_step=resume_step)
    elif name == "wandb":
        ids = (
            json.loads(layout.tracker_ids.read_text(encoding="utf-8")) if layout.tracker_ids.is_file() else {}
        )
        if "wandb" not in ids or resume_step is None:
            ids["wandb"] = uuid.uuid4().hex[:12]
            layout.tracker_ids.write_text(json.dumps(ids, indent=1), encoding="utf-8")
        tracker = cls(project, name=run_name, id=ids["wandb"], resume="allow", dir=str(layout.root))
    elif name == "mlflow":
        tracker = cls(experiment_name=project, run_name=run_name)
    elif cls.requires_logging_directory:
        tracker = cls(project, str(layout.root))
    else:
        tracker = cls(project)
    try:
        tracker.start()
    except ImportError as e:
        raise TrainingError(
            f"train.report_to {name} needs the {e.name or name} package: pip install {e.name or name} "
            "(or remove it from train.report_to)"
        ) from e
    if resume_step is None:
        tracker.store_init_configuration(hparams)
    return tracker
