"""A run's logs: ``log.csv``, ``samples.jsonl`` and TensorBoard, written by the main process."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

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
    """Appends to RUN/log.csv and RUN/samples.jsonl and writes TensorBoard scalars (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.csv_path = run_dir / "log.csv"
        self.samples_path = run_dir / "samples.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:
            _truncate_after(self.csv_path, resume_step, is_csv=True)
            _truncate_after(self.samples_path, resume_step, is_csv=False)
        new = not self.csv_path.is_file() or self.csv_path.stat().st_size == 0
        self._csv_file = self.csv_path.open("a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=LOG_COLUMNS)
        if new:
            self._csv.writeheader()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def row(self, **values: Any) -> None:
        if not self.enabled:
            return
        self._csv.writerow(
            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items() if k in LOG_COLUMNS}
        )
        self._csv_file.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "samples_per_s", "grad_norm"):
                v = values.get(key)
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(f"{values['split']}/{key}", v, values["step"])

    def samples(self, step: int, epoch: float, items: list[dict[str, str]]) -> None:
        if not self.enabled or not items:
            return
        with self.samples_path.open("a", encoding="utf-8") as f:
            for item in items:
                f.write(
                    json.dumps({"step": step, "epoch": round(epoch, 4), **item}, ensure_ascii=False) + "\n"
                )
        if self.tb is not None:
            text = "\n\n".join(
                f"**{i['id']}**  \nref: {i['reference']}  \npred: {i['prediction']}" for i in items
            )
            self.tb.add_text("samples", text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._csv_file.close()
        if self.tb is not None:
            self.tb.close()
