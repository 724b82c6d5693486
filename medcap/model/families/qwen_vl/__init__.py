"""Qwen2.5-VL and Qwen3-VL (Alibaba): a ViT that reads an image at its own resolution (14 px patches
for 2.5, 16 px for 3; 2 x 2 patches merged into one language-model token) and a Qwen language model
with 3-D rotary positions. transformers' ``Qwen2_5_VLForConditionalGeneration`` /
``Qwen3VLForConditionalGeneration`` and their processors.

What the family knows:

* dynamic resolution: an image is resized to a multiple of 28 (32) px keeping its aspect ratio with
  its pixel count inside ``[min_pixels, max_pixels]``; one LM token per 28 x 28 (32 x 32) pixels.
  ``model.min_pixels`` / ``model.max_pixels`` set the bounds (the usual out-of-memory cause is an
  uncapped high-resolution image: 12.8M pixels are 16,384 tokens). Aspect ratios over 200:1 are
  refused (the processor cannot resize them);
* the chat template puts ``<|vision_start|><|image_pad|><|vision_end|>`` in the user turn; the
  processor expands ``<|image_pad|>`` to the image's tokens and returns ``mm_token_type_ids`` (1 at
  image tokens), which the model needs for its 3-D positions: the collator extends it with 0 over
  the caption. The answer ends with ``<|im_end|>``, which is learned and stops generation;
* module names: ``model.visual.blocks`` (vision), ``model.visual.merger`` (projector),
  ``model.language_model.layers`` (LM), so every LoRA preset is an explicit scope.
"""

from __future__ import annotations

from medcap.model.families.qwen_vl.architecture import QwenKit
from medcap.model.families.vlm.family import VlmFamily, lm_presets

_LM = r"model\.language_model\.layers\.\d+"
_VISION = (
    r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj|linear_fc1|linear_fc2))"
)
_PARTS = {
    "vision": ("model.visual.patch_embed.", "model.visual.blocks.", "model.visual.pos_embed."),
    "projection": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
}

QWEN25_VL = VlmFamily(
    name="qwen2.5-vl",
    description="Qwen2.5-VL, e.g. Qwen/Qwen2.5-VL-7B-Instruct",
    kit=QwenKit(version="2.5"),
    tiny_names=("tiny-qwen2.5-vl",),
    target_presets=lm_presets(_LM, _VISION, r"model\.visual\.merger\.mlp\.(0|2)"),
    parts=_PARTS,
    export_classes=("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    base_licenses={
        "Qwen/Qwen2.5-VL-3B-Instruct": "other",  # the Qwen Research licence
        "Qwen/Qwen2.5-VL-7B-Instruct": "apache-2.0",
    },
    quant_skip=("lm_head", "merger"),
)

QWEN3_VL = VlmFamily(
    name="qwen3-vl",
    description="Qwen3-VL, e.g. Qwen/Qwen3-VL-4B-Instruct",
    kit=QwenKit(version="3"),
    tiny_names=("tiny-qwen3-vl",),
    target_presets=lm_presets(
        _LM, _VISION, r"model\.visual\.(merger|deepstack_merger_list\.\d+)\.linear_fc(1|2)"
    ),
    parts=_PARTS,
    export_classes=("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    base_licenses={"Qwen/Qwen3-VL-4B-Instruct": "apache-2.0", "Qwen/Qwen3-VL-8B-Instruct": "apache-2.0"},
    quant_skip=("lm_head", "merger", "deepstack_merger_list"),
)

__all__ = ["QWEN25_VL", "QWEN3_VL"]
