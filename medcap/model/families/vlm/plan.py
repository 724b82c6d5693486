"""What ``medcap plan`` needs to know about an image-text-to-text model (placeholder, completed below)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EncoderDims:
    """A vision encoder (ViT) stack."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    patch_flops: int
    """Multiply-adds x 2 of the patch embedding, per vision token."""
    gated: bool
    """SwiGLU-style MLP (gate, up, down) instead of fc1 / fc2."""


def vision_dims_of(**kw: Any) -> EncoderDims:
    return EncoderDims(**kw)


@dataclass(frozen=True)
class VlmDims:
    vision: EncoderDims
    projector_in: int
    projector_hidden: int
    tokens_per_lm_token: int
    text: Any


class VlmPlanSpec:
    @classmethod
    def of(cls, model: Any, family: Any) -> VlmPlanSpec:
        raise NotImplementedError
