"""PaliGemma / PaliGemma 2 without the hub: the tiny model, shipped configs wired to the offline
tokenizer, the offline processor and the prefix/suffix layout."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medcap.model.families.vlm.collate import PromptLayout
from medcap.model.families.vlm.plan import VlmDims, vision_dims_of
from medcap.model.families.vlm.square import SquareImages
from medcap.model.families.vlm.tiny import sincos_positions
from medcap.model.families.vlm.tokenizer import family_tokenizer
from medcap.model.tokenizer import padded_vocab

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig

#: The location and segmentation tokens PaliGemma's processor adds to its tokenizer; the offline
#: tokenizer has them from the start so that the tiny model's vocabulary covers them.
EXTRA_TOKENS = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]


@dataclass(frozen=True)
class PaliGemmaKit(SquareImages):
    """PaliGemma (Gemma language model) and PaliGemma 2 (Gemma 2)."""

    model_types: tuple[str, ...] = ("paligemma",)

    @property
    def shipped(self) -> dict[str, str]:
        return {
            "google/paligemma2-3b-pt-224": "paligemma2-3b-pt-224",
            "google/paligemma2-3b-pt-448": "paligemma2-3b-pt-448",
        }

    def matches_hub_id(self, name: str) -> bool:
        return re.search(r"paligemma", name.lower()) is not None

    def claims_config(self, config: dict[str, Any]) -> bool:
        return True

    def model_class(self) -> type:
        from transformers import PaliGemmaForConditionalGeneration

        return PaliGemmaForConditionalGeneration

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        from transformers import PaliGemmaConfig

        return PaliGemmaConfig.from_dict(data)

    def offline_tokenizer(self) -> Any:
        tok = family_tokenizer(eos="<eos>", bos="<bos>", named={"image_token": "<image>"})
        tok.add_tokens(EXTRA_TOKENS)
        return tok

    def tiny_config(self, tokenizer: Any) -> Any:
        """PaliGemma 2's structure: a 2-layer, 64-wide SigLIP on 64 px images of 16 px patches (16 image
        tokens) and a 2-layer, 64-wide Gemma 2."""
        from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig

        vocab = padded_vocab(tokenizer)
        vision = SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
            vision_use_head=False,
        )
        text = Gemma2Config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            max_position_embeddings=2048,
            sliding_window=512,
            initializer_range=0.05,
        )
        config = PaliGemmaConfig(
            vision_config=vision.to_dict(),
            text_config=text.to_dict(),
            projection_dim=64,
            hidden_size=64,
            vocab_size=vocab,
        )
        config.initializer_range = 0.05
        config.vision_config.initializer_range = 0.05
        self.wire(config, tokenizer)
        return config

    def wire(self, config: Any, tokenizer: Any) -> None:
        config.image_token_index = tokenizer.image_token_id
        text = config.text_config
        text.bos_token_id = tokenizer.bos_token_id
        text.eos_token_id = tokenizer.eos_token_id
        text.pad_token_id = tokenizer.pad_token_id
        config.pad_token_id = tokenizer.pad_token_id

    # --- processor ------------------------------------------------------------------------

    def offline_processor(self, tokenizer: Any, config: Any) -> Any:
        from transformers import PaliGemmaProcessor
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        side = config.vision_config.image_size
        image_processor = SiglipImageProcessorPil(
            size={"height": side, "width": side}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
        )
        image_processor.image_seq_length = config.text_config.num_image_tokens
        return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)

    def pretrained_processor(self, name_or_path: str) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name_or_path)

    def apply_image_settings(self, processor: Any, config: Any, cfg: ModelConfig) -> None:
        from medcap.model.families.vlm.family import refuse_image_settings

        side = config.vision_config.image_size
        refuse_image_settings(
            cfg,
            "PaliGemma",
            f"at a fixed {side} x {side} px (choose the -224 / -448 / -896 checkpoint instead)",
            ("min_pixels", "max_pixels", "image_size"),
        )

    def layout(self, processor: Any, prompt: str) -> PromptLayout:
        """PaliGemma's own format, no chat template: ``<image>*N <bos> prompt \\n`` (the processor
        adds <bos> and the newline), then the caption and ``<eos>``. The prefix attends both ways,
        the caption causally: ``token_type_ids`` is 0 over the prefix and 1 over the caption."""
        tok = processor.tokenizer
        return PromptLayout(
            text=processor.image_token + prompt,
            add_special_tokens=False,
            end_ids=(tok.eos_token_id,),
            token_fields={"token_type_ids": 1},
        )

    # --- parameters -----------------------------------------------------------------------

    def language_model(self, model: Any) -> Any:
        from medcap.model.adapters import unwrap

        return unwrap(model).model.language_model

    def fingerprint_tensors(self, model: Any) -> list[Any]:
        inner = model.model
        return [
            inner.multi_modal_projector.linear.weight.flatten()[:64],
            inner.get_input_embeddings().weight[:8],
        ]

    def finish_build(self, model: Any, processor: Any, cfg: ModelConfig, how: str) -> None:
        from medcap.model.adapters import unwrap

        if how == "random" and cfg.name_or_path == "tiny-paligemma":
            sincos_positions(unwrap(model).model.vision_tower.embeddings.position_embedding, False)

    def plan_dims(self, config: Any) -> VlmDims:
        v = config.vision_config
        return VlmDims(
            vision=vision_dims_of(
                layers=v.num_hidden_layers,
                hidden=v.hidden_size,
                ffn=v.intermediate_size,
                heads=v.num_attention_heads,
                patch_flops=2 * 3 * v.patch_size**2 * v.hidden_size,
                gated=False,
            ),
            projector_in=v.hidden_size,
            projector_hidden=0,
            tokens_per_lm_token=1,
            text=config.text_config,
        )


__all__ = ["EXTRA_TOKENS", "PaliGemmaKit"]
