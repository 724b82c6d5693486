"""PaliGemma 2 (Google): a SigLIP-So400m ViT at a fixed 224 / 448 / 896 px, one linear projection and
a Gemma 2 language model (PaliGemma 1: Gemma). transformers' ``PaliGemmaForConditionalGeneration``
and ``PaliGemmaProcessor``.

What the family knows:

* no chat template: the processor builds ``<image>*N <bos> prompt \\n`` (256 image tokens at 224 px,
  1,024 at 448) and the caption follows, ending with ``<eos>``. The pretrained checkpoints were
  trained on task prefixes: set ``model.prompt`` to ``caption en`` for them;
* prefix-LM attention: image and prompt attend both ways, the caption causally, as the model reads
  ``token_type_ids`` (0 prefix, 1 suffix); the collator extends it with 1 over the caption, and
  generation marks new tokens 1 itself;
* module names: ``model.vision_tower``, ``model.multi_modal_projector.linear``,
  ``model.language_model.layers``.
"""

from __future__ import annotations

from medcap.model.families.paligemma.architecture import PaliGemmaKit
from medcap.model.families.vlm.family import VlmFamily, lm_presets

PALIGEMMA = VlmFamily(
    name="paligemma",
    description="PaliGemma 2 / PaliGemma, e.g. google/paligemma2-3b-pt-224",
    kit=PaliGemmaKit(),
    tiny_names=("tiny-paligemma",),
    target_presets=lm_presets(
        r"model\.language_model\.layers\.\d+",
        r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
        r"model\.multi_modal_projector\.linear",
    ),
    parts={"vision": ("model.vision_tower.",), "projection": ("model.multi_modal_projector.",)},
    export_classes=("PaliGemmaForConditionalGeneration", "PaliGemmaProcessor"),
    base_licenses={"google/paligemma2-3b-pt-224": "gemma", "google/paligemma2-3b-pt-448": "gemma"},
    quant_skip=("lm_head", "multi_modal_projector"),
)

__all__ = ["PALIGEMMA"]
