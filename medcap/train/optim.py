"""The optimizer (AdamW, or bitsandbytes' 8-bit AdamW; no weight decay on biases and norms) and
the learning-rate schedule (linear warmup, then cosine, linear or constant)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from medcap.config.train import TrainConfig
from medcap.train.errors import TrainingError


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup, then the decay."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_optimizer(params: list[Any], cfg: TrainConfig, model: Any = None) -> Any:
    """AdamW (or 8-bit AdamW) over ``params``; with ``train.loraplus_ratio``, peft's LoRA+ optimizer
    over ``model``'s trainable parameters (B matrices at lr x ratio)."""
    if cfg.loraplus_ratio is not None:
        return _loraplus(model, cfg)
    # Decay matrices only: decaying biases and norm gains shrinks them for no regularisation benefit.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
            raise TrainingError(
                "train.optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes"
            ) from e
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas)
    import torch

    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _loraplus(model: Any, cfg: TrainConfig) -> Any:
    """peft's ``create_loraplus_optimizer``: groups A (lr), B and other 1-D adapter parameters
    (lr x ratio), embeddings; the schedule scales every group alike, so the ratio holds throughout.
    Its weight decay applies to A and B alike (peft's grouping); 1-D parameters get none."""
    from peft.optimizers import create_loraplus_optimizer

    if model is None:
        raise TrainingError("train.loraplus_ratio needs the model (peft groups its parameters by name)")
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer_cls: Any = bnb.optim.AdamW8bit
    else:
        import torch

        optimizer_cls = torch.optim.AdamW
    return create_loraplus_optimizer(
        model,
        optimizer_cls,
        lr=cfg.lr,
        loraplus_lr_ratio=cfg.loraplus_ratio,
        loraplus_weight_decay=cfg.weight_decay,
        betas=cfg.betas,
    )
