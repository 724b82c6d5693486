"""LLaVA-NeXT without the hub: the tiny model, shipped configs wired to the offline tokenizer, the
offline processor and the two chat formats (Mistral's ``[INST]``, Vicuna's ``USER: / ASSISTANT:``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medcap.config.loader import ConfigError
from medcap.model.families.vlm.collate import PromptLayout
from medcap.model.families.vlm.plan import VlmDims, vision_dims_of
from medcap.model.families.vlm.tiny import sincos_positions
from medcap.model.families.vlm.tokenizer import family_tokenizer
from medcap.model.tokenizer import SPECIAL_TOKENS, padded_vocab

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig

# The prompt formats of the model cards (llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\nWhat is
# shown in this image? [/INST]"; llava-hf/llava-v1.6-vicuna-7b-hf: the Vicuna system line, then
# "USER: <image>\n... ASSISTANT:"), as chat templates for the offline processor. Answers follow after
# a space and end with </s>.
MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% else %}{% for c in message['content'] if c['type'] == 'text' %}{{ ' ' + c['text'] }}{% endfor %}"
    "{{ '</s>' }}{% endif %}{% endfor %}"
)
VICUNA_TEMPLATE = (
    "{{ 'A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human\\'s questions.' }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ ' USER: ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "{% else %}{% for c in message['content'] if c['type'] == 'text' %}{{ ' ' + c['text'] }}{% endfor %}"
    "{{ '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)

#: Tiny model: 48 px crops of 16 px patches (9 tokens a crop), anyres grids up to 2 x 2.
TINY_CROP = 48


@dataclass(frozen=True)
class LlavaNextKit:
    """LLaVA-NeXT (LLaVA-1.6) with a Mistral or Vicuna (Llama) language model."""

    model_types: tuple[str, ...] = ("llava_next",)

    @property
    def shipped(self) -> dict[str, str]:
        return {
            "llava-hf/llava-v1.6-mistral-7b-hf": "llava-v1.6-mistral-7b",
            "llava-hf/llava-v1.6-vicuna-7b-hf": "llava-v1.6-vicuna-7b",
        }

    def matches_hub_id(self, name: str) -> bool:
        return re.search(r"llava-v1\.6|llava-next|llava-1\.6", name.lower()) is not None

    def claims_config(self, config: dict[str, Any]) -> bool:
        return True

    def model_class(self) -> type:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        from transformers import LlavaNextConfig

        return LlavaNextConfig.from_dict(data)

    def offline_tokenizer(self) -> Any:
        # Llama's and Mistral's tokenizers put <s> before a text themselves; <image> is id 4.
        return family_tokenizer(eos=SPECIAL_TOKENS["eos"], add="bos-first", named={"image_token": "<image>"})

    def tiny_config(self, tokenizer: Any) -> Any:
        from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

        vision = CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_CROP,
            patch_size=16,
            projection_dim=64,
            initializer_range=0.05,
        )
        text = MistralConfig(
            vocab_size=padded_vocab(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=2048,
            initializer_range=0.05,
            sliding_window=None,
        )
        c = TINY_CROP
        config = LlavaNextConfig(
            vision_config=vision.to_dict(),
            text_config=text.to_dict(),
            image_grid_pinpoints=[[c, 2 * c], [2 * c, c], [2 * c, 2 * c]],
            image_seq_length=(c // 16) ** 2,
            # A one-layer-deep tiny tower: its last layer's output, not the one before (-2).
            vision_feature_layer=-1,
        )
        config.initializer_range = 0.05
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
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        crop = config.vision_config.image_size
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": crop},
            crop_size={"height": crop, "width": crop},
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        )
        template = VICUNA_TEMPLATE if config.text_config.model_type == "llama" else MISTRAL_TEMPLATE
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            chat_template=template,
            num_additional_image_tokens=1,  # CLIP's class token
        )

    def pretrained_processor(self, name_or_path: str) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name_or_path)

    def apply_image_settings(self, processor: Any, config: Any, cfg: ModelConfig) -> None:
        """``max_pixels`` keeps only the anyres grids of at most that many pixels (fewer crops, fewer
        image tokens); the model's config gets the same list, which it lays the crops out by."""
        from medcap.model.families.vlm.family import refuse_image_settings

        refuse_image_settings(
            cfg, "LLaVA-NeXT", "as a base crop plus an anyres grid of crops", ("min_pixels", "image_size")
        )
        if cfg.max_pixels is None:
            return
        ip = processor.image_processor
        crop = ip.crop_size.height if hasattr(ip.crop_size, "height") else ip.crop_size["height"]
        kept = [list(p) for p in config.image_grid_pinpoints if p[0] * p[1] <= cfg.max_pixels]
        if not kept:
            raise ConfigError(
                f"model.max_pixels {cfg.max_pixels}: every anyres grid of this model is larger "
                f"(the smallest has {min(p[0] * p[1] for p in config.image_grid_pinpoints)} pixels; "
                f"one crop is {crop} x {crop})"
            )
        ip.image_grid_pinpoints = kept
        config.image_grid_pinpoints = kept

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
            caption_prefix=" ",
            end_ids=(tok.eos_token_id,),
        )

    def check_images(self, processor: Any, images: Sequence[Any]) -> None:
        pass  # any size: the image is resized into the best-fitting grid

    def image_side(self, processor: Any) -> int | None:
        # The largest grid's short side: an image decoded with both sides at least this covers every
        # grid at full resolution.
        return max(min(p) for p in processor.image_processor.image_grid_pinpoints)

    def planning_image(self, processor: Any) -> tuple[int, int]:
        # The grid with the most pixels gives the most image tokens.
        h, w = max(processor.image_processor.image_grid_pinpoints, key=lambda p: p[0] * p[1])
        return w, h

    # --- parameters -----------------------------------------------------------------------

    def language_model(self, model: Any) -> Any:
        from medcap.model.adapters import unwrap

        return unwrap(model).model.language_model

    def fingerprint_tensors(self, model: Any) -> list[Any]:
        inner = model.model
        return [inner.image_newline[:64], inner.get_input_embeddings().weight[:8]]

    def finish_build(self, model: Any, processor: Any, cfg: ModelConfig, how: str) -> None:
        from medcap.model.adapters import unwrap

        if how == "random" and cfg.name_or_path == "tiny-llava-next":
            sincos_positions(unwrap(model).model.vision_tower.embeddings.position_embedding, has_cls=True)

    def plan_dims(self, config: Any) -> VlmDims:
        v = config.vision_config
        # vision_feature_layer -2: the last layer runs but its output is not used; counted anyway.
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
            projector_hidden=config.text_config.hidden_size,
            tokens_per_lm_token=1,
            text=config.text_config,
        )


__all__ = ["MISTRAL_TEMPLATE", "VICUNA_TEMPLATE", "LlavaNextKit"]
