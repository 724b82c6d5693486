"""LLaVA-NeXT (LLaVA-1.6): a CLIP ViT-L/14 at 336 px, a two-layer projector and a Mistral-7B or
Vicuna-7B language model. transformers' ``LlavaNextForConditionalGeneration`` and
``LlavaNextProcessor``.

What the family knows:

* "anyres": an image is resized into the best-fitting grid of 336 px crops (up to 2 x 2, or 1 x 3)
  plus one 336 px view of the whole; each crop is 576 tokens with a newline token per row, so an
  image takes up to 2,928 tokens. ``model.max_pixels`` keeps only the grids of at most that many
  pixels (the model's config gets the same list, which it lays the crops out by);
* prompts follow the model cards: ``[INST] <image>\\n{prompt} [/INST]`` (Mistral) and the Vicuna
  system line with ``USER: <image>\\n{prompt} ASSISTANT:``; the answer follows after a space and
  ends with ``</s>``, which is learned and stops generation;
* module names: ``model.vision_tower`` (CLIP), ``model.multi_modal_projector`` (linear_1, linear_2),
  ``model.language_model.layers``. CLIP's ``fc1``/``fc2`` are not the LM's ``gate/up/down_proj``,
  but every preset is scoped by a regex anyway.
"""

from __future__ import annotations

from medcap.model.families.llava_next.architecture import LlavaNextKit
from medcap.model.families.vlm.family import VlmFamily, lm_presets

LLAVA_NEXT = VlmFamily(
    name="llava-next",
    description="LLaVA-NeXT / LLaVA-1.6 (Mistral or Vicuna), e.g. llava-hf/llava-v1.6-mistral-7b-hf",
    kit=LlavaNextKit(),
    tiny_names=("tiny-llava-next",),
    target_presets=lm_presets(
        r"model\.language_model\.layers\.\d+",
        r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
        r"model\.multi_modal_projector\.linear_(1|2)",
    ),
    parts={
        "vision": ("model.vision_tower.",),
        "projection": ("model.multi_modal_projector.", "model.image_newline"),
    },
    export_classes=("LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
    base_licenses={
        "llava-hf/llava-v1.6-mistral-7b-hf": "apache-2.0",
        "llava-hf/llava-v1.6-vicuna-7b-hf": "llama2",
    },
    quant_skip=("lm_head", "multi_modal_projector"),
)

__all__ = ["LLAVA_NEXT"]
