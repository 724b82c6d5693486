"""What one transformer layer costs: the bytes autograd keeps for its backward pass and its FLOPs.
Building blocks for the families' plan specs (``medcap/model/families/*/plan.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from medcap.plan.memory import ActDtypes


def decoder_layer_saved_bytes(
    b: int,
    s: int,
    h: int,
    f: int,
    heads: int,
    e: ActDtypes,
    dropout: float,
    lora: list[tuple[str, int]],
    lora_r: int,
    lora_dropout: float,
) -> int:
    """Bytes one pre-LN decoder layer with a ReLU MLP (OPT) keeps for the backward pass (frozen base weights, gradients
    flowing through it), with scaled-dot-product attention (no s x s matrix is kept):

    * self_attn_layer_norm: its input (res x b*s*h) and mean/rstd (2 x 4 x b*s);
    * attention: q, k, v and the output (4 x attn x b*s*h) and the log-sum-exp (4 x b*heads*s);
    * dropout after attention and after fc2 (p = config.dropout): a mask each (mask_res x b*s*h);
    * final_layer_norm: its input and statistics;
    * fc1 -> ReLU: the ReLU output (lin x b*s*f), which is also fc2's input;
    * frozen base linears save nothing more (a frozen weight needs no input to get the input's grad);
    * per LoRA target with input width d: the adapter input (lora x b*s*d; with lora dropout also its
      mask, mask_lora x b*s*d) and lora_A's output (lora x b*s*r).
    """
    tokens = b * s
    total = 2 * (e.res * tokens * h + 8 * tokens)  # two layer norms: input + mean/rstd
    total += 4 * e.attn * tokens * h + 4 * b * heads * s
    if dropout > 0:
        total += 2 * e.mask_res * tokens * h
    total += e.lin * tokens * f
    for _, d in lora:
        total += e.lora * tokens * d + e.lora * tokens * lora_r
        if lora_dropout > 0:
            total += e.mask_lora * tokens * d
    return int(total)


def encoder_layer_saved_bytes(b: int, n: int, h: int, f: int, heads: int, e: int, trains: bool) -> int:
    """Bytes one pre-LN ViT / Q-Former layer keeps for backward.

    ``trains``: its own weights train, so every linear also keeps its input: layer norm inputs
    (2 x e*b*n*h), qkv input, q/k/v/out (4), projection input (= out), fc1 input, GELU input and fc2
    input (2 x e*b*n*f): 8 x e*b*n*h + 2 x e*b*n*f. Frozen but on the gradient path: layer-norm
    inputs, attention tensors and the GELU input: 6 x e*b*n*h + e*b*n*f.
    """
    tokens = b * n
    if trains:
        return int(8 * e * tokens * h + 2 * e * tokens * f + 4 * b * heads * n)
    return int(6 * e * tokens * h + e * tokens * f + 4 * b * heads * n)


@dataclass
class Flops:
    """FLOPs of one training sample, split by where they go: the vision tower, the connector (what
    joins it to the language model: BLIP-2's Q-Former and projection, a LLaVA projector) and the
    language model; ``recompute`` is gradient checkpointing's second forward."""

    vision_fwd: float
    connector_fwd: float
    lm_fwd: float
    lm_bwd: float
    connector_bwd: float
    vision_bwd: float
    recompute: float

    @property
    def model(self) -> float:
        """Forward + backward, no recomputation: what MFU counts."""
        return (
            self.vision_fwd
            + self.connector_fwd
            + self.lm_fwd
            + self.lm_bwd
            + self.connector_bwd
            + self.vision_bwd
        )

    @property
    def hardware(self) -> float:
        """What the GPU really executes (adds the checkpointing recomputation)."""
        return self.model + self.recompute


def encoder_fwd_flops(n: int, h: int, f: int, layers: int) -> float:
    """Forward FLOPs of ``layers`` encoder layers on ``n`` tokens (matmuls and attention products)."""
    return layers * (2 * n * (4 * h * h + 2 * h * f) + 4 * n * n * h)


__all__ = ["Flops", "decoder_layer_saved_bytes", "encoder_fwd_flops", "encoder_layer_saved_bytes"]
