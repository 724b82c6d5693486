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
    "metric",  # validation rows: the selection metric (train.select_by) when it is not the loss
    "score",  # its value on the captioned validation subset
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


def _upgrade_header(path: Path) -> None:
    """Rewrite a log.csv of an earlier version (fewer columns) under today's header, so resumed runs
    append rows that line up."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames == LOG_COLUMNS:
            return
        rows = list(reader)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


class RunLog:
    """A run's logs, written by the main process: RUN/log.csv and RUN/samples.jsonl (``csv``) and the
    trackers of ``train.report_to`` (accelerate's own tracker classes: TensorBoard in RUN/tensorboard,
    W&B, MLflow ...), each getting the hyperparameters, the metric curves and the sample captions.

    A resumed run drops what was logged after its checkpoint (a killed run logged steps the checkpoint
    never saw) and continues the same tracker run (TensorBoard's purge step, W&B's and MLflow's run ids).
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
            _upgrade_header(self.csv_path)
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
        if values.get("metric") and isinstance(v := values.get("score"), int | float) and math.isfinite(v):
            numbers[f"{values['split']}/{values['metric']}"] = float(v)
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
        scored = all("score" in i for i in items)
        columns = ["id", "reference", "prediction"] + (["score"] if scored else [])
        rows = [[i[c] for c in columns] for i in items]
        text = "\n\n".join(
            f"**{i['id']}**  \nref: {i['reference']}  \npred: {i['prediction']}"
            + (f"  \n{i.get('metric', 'score')}: {i['score']:.4f}" if scored else "")
            for i in items
        )
        for tracker in self.trackers:
            if tracker.name == "mlflow":
                # MLflow's metrics are numbers only: the captions go in as a text artifact per validation.
                import mlflow

                mlflow.log_text(text, f"samples/step-{step:07d}.md")
            elif hasattr(tracker, "log_table"):
                tracker.log_table("samples", columns=columns, data=rows, step=step)
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
        ids = _tracker_ids(layout)
        if "wandb" not in ids or resume_step is None:
            ids["wandb"] = uuid.uuid4().hex[:12]
            layout.tracker_ids.write_text(json.dumps(ids, indent=1), encoding="utf-8")
        tracker = cls(project, name=run_name, id=ids["wandb"], resume="allow", dir=str(layout.root))
    elif name == "mlflow":
        _mlflow_store(layout)
        ids = _tracker_ids(layout)
        run_id = ids.get("mlflow") if resume_step is not None else None
        tracker = cls(experiment_name=project, run_name=run_name, run_id=run_id)
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
    if name == "mlflow":
        # MLflow makes its own run id: keep it, so that a resumed run continues the same MLflow run.
        ids = _tracker_ids(layout)
        ids["mlflow"] = tracker.active_run.info.run_id
        layout.tracker_ids.write_text(json.dumps(ids, indent=1), encoding="utf-8")
    if resume_step is None:
        tracker.store_init_configuration(hparams)
    return tracker


def _tracker_ids(layout: RunLayout) -> dict[str, str]:
    """RUN/trackers.json: the run ids the online trackers gave this run."""
    if not layout.tracker_ids.is_file():
        return {}
    return json.loads(layout.tracker_ids.read_text(encoding="utf-8"))


# The store medcap chose last (MLflow's set_tracking_uri also writes MLFLOW_TRACKING_URI, so this tells
# medcap's own choice apart from one the user made).
_MEDCAP_MLFLOW_URI: str | None = None


def _mlflow_store(layout: RunLayout) -> None:
    """Where MLflow logs: the user's MLFLOW_TRACKING_URI (a server, a database, Databricks) when set;
    otherwise one SQLite store beside the run folders (``runs/mlflow.db`` for ``runs/NAME``), so that
    all runs of a project land in one store (``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``)
    and not in a ``mlflow.db`` wherever the command happened to start, MLflow's own default."""
    global _MEDCAP_MLFLOW_URI
    import os

    try:
        import mlflow
    except ImportError as e:
        raise TrainingError(
            "train.report_to mlflow needs the mlflow package: pip install mlflow-skinny (a client for a "
            "tracking server or a local SQLite store) or mlflow (with the UI), or remove it from "
            "train.report_to"
        ) from e
    user = os.environ.get("MLFLOW_TRACKING_URI")
    if user and user != _MEDCAP_MLFLOW_URI:
        # Set it again: a URI set earlier in this process would otherwise win over the variable.
        mlflow.set_tracking_uri(user)
        return
    _MEDCAP_MLFLOW_URI = f"sqlite:///{(layout.root.resolve().parent / 'mlflow.db').as_posix()}"
    mlflow.set_tracking_uri(_MEDCAP_MLFLOW_URI)
