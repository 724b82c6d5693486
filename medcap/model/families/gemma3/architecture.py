"""Gemma 3 / MedGemma without the hub: the tiny model, shipped configs wired to the offline tokenizer,
the offline processor and the chat template."""

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

_NAMED = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}

# The published Gemma 3 template reduced to one user turn (image, then text) and one answer: the
# turn markers, "model" for the assistant, <start_of_image> where the image goes (the processor
# expands it to "\n\n<start_of_image>" + 256 soft tokens + "<end_of_image>\n\n").
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Gemma3Kit(SquareImages):
    """Gemma 3 (4B and up: a SigLIP image encoder) and MedGemma, its medical fine-tune."""

    default_side = 896

    model_types: tuple[str, ...] = ("gemma3",)

    @property
    def shipped(self) -> dict[str, str]:
        return {
            "google/medgemma-4b-it": "medgemma-4b-it",
            "google/medgemma-4b-pt": "medgemma-4b-it",  # the same architecture
            "google/gemma-3-4b-it": "medgemma-4b-it",
            "google/gemma-3-4b-pt": "medgemma-4b-it",
        }

    def matches_hub_id(self, name: str) -> bool:
        return re.search(r"medgemma|gemma-3-(4|12|27)b", name.lower()) is not None

    def claims_config(self, config: dict[str, Any]) -> bool:
        return True

    def model_class(self) -> type:
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        from transformers import Gemma3Config

        return Gemma3Config.from_dict(data)

    def offline_tokenizer(self) -> Any:
        return family_tokenizer(
            eos="<eos>",
            bos="<bos>",
            add="bos-first",
            named=_NAMED,
            extra=("<start_of_turn>", "<end_of_turn>"),
        )

    def tiny_config(self, tokenizer: Any) -> Any:
        """A 2-layer, 64-wide SigLIP on 64 px images of 8 px patches, pooled 2 x 2 into 16 image
        tokens, and a 2-layer, 64-wide Gemma 3."""
        from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

        vision = SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            vision_use_head=False,
        )
        text = Gemma3TextConfig(
            vocab_size=padded_vocab(tokenizer),
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
        config = Gemma3Config(
            text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=16
        )
        config.initializer_range = 0.05
        config.vision_config.initializer_range = 0.05
        self.wire(config, tokenizer)
        return config

    def wire(self, config: Any, tokenizer: Any) -> None:
        config.image_token_index = tokenizer.image_token_id
        config.boi_token_index = tokenizer.boi_token_id
        config.eoi_token_index = tokenizer.eoi_token_id
        text = config.text_config
        text.bos_token_id = tokenizer.bos_token_id
        text.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
        text.pad_token_id = tokenizer.pad_token_id
        config.pad_token_id = tokenizer.pad_token_id

    # --- processor ------------------------------------------------------------------------

    def offline_processor(self, tokenizer: Any, config: Any) -> Any:
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        side = config.vision_config.image_size
        image_processor = Gemma3ImageProcessorPil(
            size={"height": side, "width": side},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=2,  # bilinear, as the published preprocessor config
        )
        return Gemma3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=TEMPLATE,
            image_seq_length=config.mm_tokens_per_image,
        )

    def pretrained_processor(self, name_or_path: str) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name_or_path)

    def apply_image_settings(self, processor: Any, config: Any, cfg: ModelConfig) -> None:
        from medcap.model.families.vlm.family import refuse_image_settings

        side = config.vision_config.image_size
        refuse_image_settings(
            cfg, "Gemma 3", f"at a fixed {side} x {side} px", ("min_pixels", "max_pixels", "image_size")
        )

    def layout(self, processor: Any, prompt: str) -> PromptLayout:
        content: list[dict[str, str]] = [{"type": "image"}]
        if prompt:
            content.append({"type": "text", "text": prompt})
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        tok = processor.tokenizer
        return PromptLayout(
            text=text,
            add_special_tokens=not (tok.bos_token and text.startswith(tok.bos_token)),
            end_ids=(tok.convert_tokens_to_ids("<end_of_turn>"),),
            token_fields={"token_type_ids": 0},
            nested_images=True,
        )

    # --- parameters -----------------------------------------------------------------------

    def language_model(self, model: Any) -> Any:
        from medcap.model.adapters import unwrap

        return unwrap(model).model.language_model

    def fingerprint_tensors(self, model: Any) -> list[Any]:
        inner = model.model
        return [
            inner.multi_modal_projector.mm_input_projection_weight.flatten()[:64],
            inner.get_input_embeddings().weight[:8],
        ]

    def finish_build(self, model: Any, processor: Any, cfg: ModelConfig, how: str) -> None:
        from medcap.model.adapters import unwrap

        if how == "random" and cfg.name_or_path == "tiny-gemma3":
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
            tokens_per_lm_token=((v.image_size // v.patch_size) ** 2) // config.mm_tokens_per_image,
            text=config.text_config,
        )


__all__ = ["TEMPLATE", "Gemma3Kit"]
