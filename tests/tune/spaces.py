"""Search spaces for the tune tests: a base run config written by medcap's own loader (the tiny
model on tiny prepared data), and a space file around it."""

from __future__ import annotations

from pathlib import Path

import yaml

from medcap.config.loader import save_config
from medcap.config.run import load_run_config
from tests.fixtures import tiny_overrides


def write_space(folder: Path, prepared: Path, *, max_steps: int = 8, **space: object) -> Path:
    """``folder/base.yaml`` (a tiny LoRA run validating every 2 steps) and ``folder/space.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = load_run_config(
        None,
        tiny_overrides(
            prepared, folder / "unused", max_steps=max_steps, eval_every=2, eval_at_epoch_end="false"
        ),
    )
    save_config(base, folder / "base.yaml")
    data = {
        "config": "base.yaml",
        "objective": "loss",
        "trials": 4,
        "seed": 0,
        "startup_trials": 2,
        "pruner": {"kind": "none"},
        "params": {
            "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
            "model.peft.r": {"low": 2, "high": 16, "log": True},
            "model.peft.targets": {"choices": ["lm-qv", "lm-attn"]},
        },
    }
    data.update(space)
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
