"""InstructBLIP (Salesforce): BLIP-2's ViT-g and Q-Former, where the Q-Former also reads the
instruction, and a Vicuna (Llama) or Flan-T5 language model (OPT works the same way).
transformers' ``InstructBlipForConditionalGeneration`` and ``InstructBlipProcessor``.

What the family knows:

* the processor puts ``num_query_tokens`` ``<image>`` tokens before the tokenized instruction
  (``<s> prompt`` for Vicuna) and tokenizes the instruction a second time for the Q-Former
  (``qformer_input_ids``): the instruction is ``model.prompt``, or "A short image caption:" when it
  is empty (the Q-Former's text cannot be empty). The caption follows (Vicuna) or is the decoder's
  target (Flan-T5) and ends with ``</s>``;
* the query tokens stay fp32 (transformers keeps them: ``_keep_in_fp32_modules``); bitsandbytes
  leaves the Q-Former, the projection and the output head unquantized;
* no query cache: the Q-Former's outputs depend on the instruction as well as the image, so
  BLIP-2's frozen-vision cache (one set of query outputs per image) does not carry over.
"""

from __future__ import annotations

from medcap.model.families.instructblip.architecture import InstructBlipKit
from medcap.model.families.vlm.family import VlmFamily

_LM = r"language_model\.model\.(decoder\.)?layers\.\d+"
_VISION = r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(qkv|projection)|mlp\.(fc1|fc2))"
_QF = r"qformer\..*\."
_COMMON = {
    "vision": _VISION,
    "projector": r"language_projection",
    "qformer-qv": _QF + r"attention\.(query|value)",
    "qformer-attn": _QF + r"attention\.(query|key|value)",
}
_PARTS = {
    "vision": ("vision_model.",),
    "qformer": ("qformer.", "query_tokens"),
    "projection": ("language_projection",),
}
_LICENSES = {"Salesforce/instructblip-vicuna-7b": "other", "Salesforce/instructblip-flan-t5-xl": "mit"}

INSTRUCTBLIP = VlmFamily(
    name="instructblip",
    description="InstructBLIP with Vicuna (or OPT), e.g. Salesforce/instructblip-vicuna-7b",
    kit=InstructBlipKit(text="decoder"),
    tiny_names=("tiny-instructblip",),
    target_presets={
        "lm-qv": _LM + r"\.self_attn\.(q_proj|v_proj)",
        "lm-attn": _LM + r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj|out_proj)",
        "lm-all": _LM
        + r"\.(self_attn\.(q_proj|k_proj|v_proj|o_proj|out_proj)|mlp\.(gate_proj|up_proj|down_proj)|fc1|fc2)",
        **_COMMON,
    },
    parts=_PARTS,
    export_classes=("InstructBlipForConditionalGeneration", "InstructBlipProcessor"),
    base_licenses=_LICENSES,
    feedforward_names=("down_proj", "fc2"),
    fp32_prefixes=("query_tokens",),
    fp32_description="query tokens",
    quant_skip=("qformer", "query_tokens", "language_projection", "lm_head"),
)

_T5 = r"language_model\.(encoder|decoder)\.block\.\d+\.layer\.\d+\."
INSTRUCTBLIP_T5 = VlmFamily(
    name="instructblip-t5",
    description="InstructBLIP with Flan-T5, e.g. Salesforce/instructblip-flan-t5-xl",
    kit=InstructBlipKit(text="t5"),
    tiny_names=("tiny-instructblip-t5",),
    decoder_only=False,
    target_presets={
        "lm-qv": _T5 + r"(SelfAttention|EncDecAttention)\.(q|v)",
        "lm-attn": _T5 + r"(SelfAttention|EncDecAttention)\.(q|k|v|o)",
        "lm-all": _T5 + r"((SelfAttention|EncDecAttention)\.(q|k|v|o)|DenseReluDense\.(wi|wi_0|wi_1|wo))",
        **_COMMON,
    },
    parts=_PARTS,
    export_classes=("InstructBlipForConditionalGeneration", "InstructBlipProcessor"),
    base_licenses=_LICENSES,
    feedforward_names=("wi", "wi_0", "wi_1", "wo"),
    fp32_prefixes=("query_tokens",),
    fp32_description="query tokens",
    quant_skip=("qformer", "query_tokens", "language_projection", "lm_head"),
)

__all__ = ["INSTRUCTBLIP", "INSTRUCTBLIP_T5"]
