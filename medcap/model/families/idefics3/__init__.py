"""Idefics3 and SmolVLM (Hugging Face; SmolVLM-Instruct 2B and the 256M / 500M models are Idefics3
checkpoints): a SigLIP ViT on 384 px tiles, a pixel shuffle that folds 3 x 3 patches into one token
(81 tokens a tile), one linear projection and a SmolLM2 / Llama language model. transformers'
``Idefics3ForConditionalGeneration`` and ``Idefics3Processor``.

What the family knows:

* image splitting: an image is resized so its longest edge is the processor's bound (4 x 384 px for
  SmolVLM-Instruct), cut into 384 px tiles (up to 4 x 4) plus one global view, each tile's tokens
  between ``<fake_token_around_image>`` markers with ``<row_i_col_j>`` tags. ``model.max_pixels``
  lowers the longest-edge bound to whole tiles: fewer tiles, fewer image tokens;
* the chat template ``<|im_start|>User:<image>{prompt}<end_of_utterance>\\nAssistant:``; the answer
  follows after a space and ends with ``<end_of_utterance>``, which is learned and stops generation;
* module names: ``model.vision_model``, ``model.connector.modality_projection.proj``,
  ``model.text_model.layers``.
"""

from __future__ import annotations

from medcap.model.families.idefics3.architecture import Idefics3Kit
from medcap.model.families.vlm.family import VlmFamily, lm_presets

IDEFICS3 = VlmFamily(
    name="idefics3",
    description="Idefics3 and SmolVLM, e.g. HuggingFaceTB/SmolVLM-Instruct",
    kit=Idefics3Kit(),
    tiny_names=("tiny-idefics3",),
    target_presets=lm_presets(
        r"model\.text_model\.layers\.\d+",
        r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
        r"model\.connector\.modality_projection\.proj",
    ),
    parts={"vision": ("model.vision_model.",), "projection": ("model.connector.",)},
    export_classes=("Idefics3ForConditionalGeneration", "Idefics3Processor"),
    base_licenses={
        "HuggingFaceTB/SmolVLM-Instruct": "apache-2.0",
    },
    quant_skip=("lm_head", "connector"),
)

__all__ = ["IDEFICS3"]
