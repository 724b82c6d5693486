"""Qwen2.5-VL / Qwen3-VL without the hub: the tiny models, shipped configs wired to the offline
tokenizer, the offline processor, the chat template, the pixel bounds and the image limit."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from medcap.config.loader import ConfigError
from medcap.model.families.vlm.collate import PromptLayout
from medcap.model.families.vlm.family import ImageLimitError
from medcap.model.families.vlm.plan import VlmDims, vision_dims_of
from medcap.model.families.vlm.processors import image_only_processor
from medcap.model.families.vlm.tokenizer import family_tokenizer
from medcap.model.tokenizer import padded_vocab

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig

#: The processor refuses (smart_resize raises) images more elongated than this.
MAX_ASPECT_RATIO = 200

_NAMED = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}

# The published chat templates, reduced to what medcap sends (one user turn: an image, then the
# prompt text) and what it trains (one assistant answer ending in <|im_end|>). Qwen2.5-VL adds a
# default system turn; Qwen3-VL has none.
_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and default_system %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_template(version: str) -> str:
    return _TEMPLATE.replace("default_system", "true" if version == "2.5" else "false")


@dataclass(frozen=True)
class QwenKit:
    """Qwen2.5-VL (``version="2.5"``) or Qwen3-VL (``"3"``)."""

    version: Literal["2.5", "3"]

    @property
    def model_types(self) -> tuple[str, ...]:
        return ("qwen2_5_vl",) if self.version == "2.5" else ("qwen3_vl",)

    @property
    def shipped(self) -> dict[str, str]:
        if self.version == "2.5":
            return {
                "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2.5-vl-3b-instruct",
                "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b-instruct",
            }
        return {"Qwen/Qwen3-VL-4B-Instruct": "qwen3-vl-4b-instruct"}

    def matches_hub_id(self, name: str) -> bool:
        tag = r"qwen2\.5-vl" if self.version == "2.5" else r"qwen3-vl"
        return re.search(tag, name.lower()) is not None

    def claims_config(self, config: dict[str, Any]) -> bool:
        return True

    # --- classes and configs --------------------------------------------------------------

    def model_class(self) -> type:
        if self.version == "2.5":
            from transformers import Qwen2_5_VLForConditionalGeneration

            return Qwen2_5_VLForConditionalGeneration
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        if self.version == "2.5":
            from transformers import Qwen2_5_VLConfig

            return Qwen2_5_VLConfig.from_dict(data)
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig.from_dict(data)

    def offline_tokenizer(self) -> Any:
        return family_tokenizer(
            eos="<|im_end|>", bos=None, named=_NAMED, extra=("<|im_start|>", "<|endoftext|>")
        )

    def tiny_config(self, tokenizer: Any) -> Any:
        """A 2-layer, 64-wide language model and a 2-block, 64-wide ViT on 8 px patches (2 x 2 merged
        into one LM token: a 64 px image is 16 tokens); builds in milliseconds."""
        text = {
            "vocab_size": padded_vocab(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        }
        if self.version == "2.5":
            from transformers import Qwen2_5_VLConfig

            vision = {
                "depth": 2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_heads": 4,
                "out_hidden_size": 64,
                "patch_size": 8,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 32,
                "fullatt_block_indexes": [1],
            }
            config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
        else:
            from transformers import Qwen3VLConfig

            text["head_dim"] = 16
            text["rope_parameters"]["mrope_interleaved"] = True
            vision = {
                "depth": 2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_heads": 4,
                "out_hidden_size": 64,
                "patch_size": 8,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "num_position_embeddings": 144,
                "deepstack_visual_indexes": [0],
            }
            config = Qwen3VLConfig(text_config=text, vision_config=vision)
        # The std of every random weight (random_init.random_fill): 0.02 (for 1000+ wide layers)
        # leaves 64-wide layers too small for the image to move the LM at first (see blip2's tiny).
        config.initializer_range = 0.05
        config.get_text_config().initializer_range = 0.05
        config.vision_config.initializer_range = 0.05
        self.wire(config, tokenizer)
        return config

    def wire(self, config: Any, tokenizer: Any) -> None:
        config.image_token_id = tokenizer.image_token_id
        config.video_token_id = tokenizer.video_token_id
        config.vision_start_token_id = tokenizer.vision_start_token_id
        config.vision_end_token_id = tokenizer.vision_end_token_id
        text = config.get_text_config()
        text.eos_token_id = tokenizer.eos_token_id
        text.pad_token_id = tokenizer.pad_token_id
        if hasattr(text, "bos_token_id"):
            text.bos_token_id = None
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id

    # --- processor ------------------------------------------------------------------------

    def _processor_class(self) -> type:
        if self.version == "2.5":
            from transformers import Qwen2_5_VLProcessor

            return Qwen2_5_VLProcessor
        from transformers import Qwen3VLProcessor

        return Qwen3VLProcessor

    def offline_processor(self, tokenizer: Any, config: Any) -> Any:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        vision = config.vision_config
        patch, merge = vision.patch_size, vision.spatial_merge_size
        factor = patch * merge
        tiny = vision.hidden_size <= 128
        # The published preprocessor configs: Qwen2.5-VL 56 x 56 .. 12,845,056 pixels (16,384 tokens),
        # Qwen3-VL 65,536 .. 16,777,216 with mean = std = 0.5. The tiny models see 64-80 px images.
        if tiny:
            low, high = factor * factor, 80 * 80
        elif self.version == "2.5":
            low, high = 56 * 56, 12_845_056
        else:
            low, high = 65_536, 16_777_216
        norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]} if self.version == "3" else {}
        image_processor = Qwen2VLImageProcessorPil(
            **norm,
            patch_size=patch,
            merge_size=merge,
            temporal_patch_size=vision.temporal_patch_size,
            min_pixels=low,
            max_pixels=high,
        )
        return image_only_processor(
            self._processor_class(), image_processor, tokenizer, chat_template(self.version)
        )

    def pretrained_processor(self, name_or_path: str) -> Any:
        from medcap.model.families.vlm.processors import load_pretrained_processor

        return load_pretrained_processor(self._processor_class(), name_or_path)

    def apply_image_settings(self, processor: Any, config: Any, cfg: ModelConfig) -> None:
        from transformers.image_utils import SizeDict

        if cfg.image_size is not None:
            raise ConfigError(
                "model.image_size: Qwen-VL reads images at their own resolution; bound it with "
                "model.min_pixels / model.max_pixels instead"
            )
        ip = processor.image_processor
        low, high = ip.size.shortest_edge, ip.size.longest_edge
        low = cfg.min_pixels if cfg.min_pixels is not None else low
        high = cfg.max_pixels if cfg.max_pixels is not None else high
        unit = ip.patch_size * ip.merge_size
        if high < unit * unit:
            raise ConfigError(
                f"model.max_pixels {high}: less than one {unit} x {unit} px unit (one image token) of this model"
            )
        if low > high:
            raise ConfigError(f"model.min_pixels {low} is more than model.max_pixels {high}")
        ip.size = SizeDict(shortest_edge=low, longest_edge=high)

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
            add_special_tokens=False,
            end_ids=(tok.convert_tokens_to_ids("<|im_end|>"),),
            token_fields={"mm_token_type_ids": 0},
        )

    def check_images(self, processor: Any, images: Sequence[Any]) -> None:
        for im in images:
            w, h = im.size
            if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                raise ImageLimitError(
                    f"a {w} x {h} px image: Qwen-VL takes aspect ratios up to {MAX_ASPECT_RATIO}:1 "
                    "(its processor cannot resize a longer strip); crop or pad it"
                )

    def image_side(self, processor: Any) -> int | None:
        # Both sides of a draft-mode decode stay at or above this: even a square image at the pixel
        # cap keeps all the pixels the processor will use.
        return math.isqrt(processor.image_processor.size.longest_edge)

    def planning_image(self, processor: Any) -> tuple[int, int]:
        side = math.isqrt(processor.image_processor.size.longest_edge)
        return side, side

    # --- parameters -----------------------------------------------------------------------

    def language_model(self, model: Any) -> Any:
        from medcap.model.adapters import unwrap

        return unwrap(model).model.language_model

    def fingerprint_tensors(self, model: Any) -> list[Any]:
        inner = model.model
        return [inner.visual.patch_embed.proj.weight.flatten()[:64], inner.get_input_embeddings().weight[:8]]

    def finish_build(self, model: Any, processor: Any, cfg: ModelConfig, how: str) -> None:
        pass

    def plan_dims(self, config: Any) -> VlmDims:
        v, t = config.vision_config, config.get_text_config()
        merge = v.spatial_merge_size
        return VlmDims(
            vision=vision_dims_of(
                layers=v.depth,
                hidden=v.hidden_size,
                ffn=v.intermediate_size,
                heads=v.num_heads,
                patch_flops=2 * 3 * v.temporal_patch_size * v.patch_size**2 * v.hidden_size,
                gated=self.version == "2.5",
                rms_norm=self.version == "2.5",
            ),
            projector_in=v.hidden_size * merge * merge,
            projector_hidden=v.hidden_size * merge * merge,
            tokens_per_lm_token=merge * merge,
            text=t,
        )


__all__ = ["MAX_ASPECT_RATIO", "QwenKit", "chat_template"]
