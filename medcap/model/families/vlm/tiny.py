"""Starting points of the tiny models that learn from scratch in tests and the demo."""

from __future__ import annotations

from typing import Any


def sincos_table(grid: int, dim: int) -> Any:
    """Fixed 2-D sine-cosine codes for a ``grid`` x ``grid`` patch layout (row-major), as MAE uses:
    half the channels encode the patch column and half the row, at geometric frequencies."""
    import torch

    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coord in (cols.flatten(), rows.flatten()):
        angle = coord[:, None] * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    table = torch.cat(parts, dim=1)
    if table.shape[1] < dim:
        table = torch.cat([table, torch.zeros(table.shape[0], dim - table.shape[1])], dim=1)
    return table


def sincos_positions(embedding: Any, has_cls: bool) -> bool:
    """Start a ViT's learned position embeddings (an ``nn.Embedding`` or a parameter of shape
    ``(positions, dim)``, optionally a class position first) as sine-cosine codes.

    A tiny model trained from scratch for a few hundred steps with random positions learns what is
    in an image but barely where (BLIP-2's tiny model: lesion side at chance after 300 steps); a
    fixed 2-D code tells each patch its place from the start. The values stay trainable; only their
    starting point changes. Returns False (nothing changed) where the positions are no square grid.
    """
    import torch

    weight = getattr(embedding, "weight", embedding)
    rows, dim = weight.shape[-2], weight.shape[-1]
    patches = rows - (1 if has_cls else 0)
    grid = int(round(patches**0.5))
    if grid * grid != patches or dim % 4:
        return False
    table = sincos_table(grid, dim)
    if has_cls:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    with torch.no_grad():
        weight.copy_(table.reshape(weight.shape).to(weight.dtype))
    return True


__all__ = ["sincos_positions", "sincos_table"]
