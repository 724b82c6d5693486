"""Gemma 3 (Google) and MedGemma, its medical fine-tune (MedGemma-4B is a Gemma 3 4B checkpoint):
a SigLIP-So400m ViT at a fixed 896 px whose 4,096 patch outputs are pooled to 256 soft tokens, and
a Gemma 3 language model. transformers' ``Gemma3ForConditionalGeneration`` and ``Gemma3Processor``.

What the family knows:

* the chat template: ``<bos><start_of_turn>user\\n<start_of_image>{prompt}<end_of_turn>\\n
  <start_of_turn>model\\n``; the processor expands ``<start_of_image>`` into the 256 image tokens
  between ``<start_of_image>`` and ``<end_of_image>`` and returns ``token_type_ids`` (1 at image
  tokens: they attend to each other both ways); the collator extends them with 0. The answer ends
  with ``<end_of_turn>``, which is learned and stops generation;
* the projector is a weight matrix and an RMSNorm, no ``nn.Linear``: LoRA cannot reach it, so there
  is no ``projector`` preset; ``model.train_language_projection`` trains it whole;
* module names: ``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model.layers``.
"""

from __future__ import annotations

from medcap.model.families.gemma3.architecture import Gemma3Kit
from medcap.model.families.vlm.family import VlmFamily, lm_presets

GEMMA3 = VlmFamily(
    name="gemma3",
    description="Gemma 3 and MedGemma, e.g. google/medgemma-4b-it",
    kit=Gemma3Kit(),
    tiny_names=("tiny-gemma3",),
    target_presets=lm_presets(
        r"model\.language_model\.layers\.\d+",
        r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
        None,
    ),
    parts={"vision": ("model.vision_tower.",), "projection": ("model.multi_modal_projector.",)},
    export_classes=("Gemma3ForConditionalGeneration", "Gemma3Processor"),
    base_licenses={
        "google/medgemma-4b-it": "other",  # Health AI Developer Foundations terms
        "google/medgemma-4b-pt": "other",
        "google/gemma-3-4b-it": "gemma",
        "google/gemma-3-4b-pt": "gemma",
    },
    quant_skip=("lm_head", "multi_modal_projector"),
)

__all__ = ["GEMMA3"]
