"""``medcap plan --all-configs --gpu t4,v100-16,a100-80,h100``: every shipped config on several GPUs
in one table (fits at its micro-batch?, the largest micro-batch that fits, the epoch time on ROCOv2's
stored-RGB training split)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from medcap.plan.planner import ROCOV2_TRAIN, Plan, _duration, plan


@dataclass
class TableRow:
    """One config across the GPUs."""

    config: str
    model: str
    setup: str
    plans: dict[str, Plan | None]
    """GPU name -> its plan (None where the config cannot be planned there)."""


def _setup(p: Plan) -> str:
    quant = {"none": "", "4bit": " nf4", "8bit": " int8"}[p.quantization]
    return f"{p.precision}{quant}, b={p.batch_size}, {p.seq_len_max} tok"


def plan_table(configs: dict[str, Any], gpus: list[str]) -> list[TableRow]:
    """Plan every ``{name: RunConfig}`` on each of ``gpus``, for one epoch of ROCOv2's stored-RGB
    training split (the manifest the configs name is ignored: the table compares like for like)."""
    rows = []
    for name, cfg in configs.items():
        # An absent manifest: the planner counts ROCOv2 stored-RGB images and real caption lengths.
        data = dataclasses.replace(cfg.data, prepared="/nonexistent/medcap-plan-table")
        cfg = dataclasses.replace(cfg, data=data)
        plans: dict[str, Plan | None] = {}
        for gpu in gpus:
            plans[gpu] = plan(cfg, gpu, config_name=name)
        first = next(p for p in plans.values() if p is not None)
        rows.append(TableRow(name, cfg.model.name_or_path, _setup(first), plans))
    return rows


def _cell(p: Plan | None) -> str:
    if p is None:
        return "n/a"
    note = " (no bf16)" if any("no bf16" in w for w in p.warnings) else ""
    if not p.fits:
        return f"no, max b={p.max_batch_size}{note}" if p.max_batch_size else f"no{note}"
    return f"yes, max b={p.max_batch_size}, {_duration(p.epoch_seconds)}{note}"


def format_table(rows: list[TableRow], gpus: list[str]) -> str:
    """A Markdown table (readable as text too)."""
    head = ["config", "model", "precision, micro-batch, tokens", *gpus]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for row in rows:
        cells = [row.config, row.model, row.setup, *(_cell(row.plans[g]) for g in gpus)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\nEach cell: fits at the config's micro-batch?, the largest micro-batch that fits, and one epoch of "
        f"ROCOv2's stored-RGB training split ({ROCOV2_TRAIN['stored-rgb']:,} images) at the planner's "
        "default utilisation (40% of the peak dense rate; x0.6 with 4-bit weights, x0.25 with 8-bit). "
        "'no bf16': the card has no bf16 tensor cores (use fp16)."
    )
    return "\n".join(lines)


__all__ = ["TableRow", "format_table", "plan_table"]
