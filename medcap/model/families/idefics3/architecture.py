"""Idefics3 / SmolVLM without the hub: the tiny model, shipped configs wired to the offline tokenizer,
the offline processor, the chat template and the image-splitting bound."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medcap.config.loader import ConfigError
from medcap.model.families.vlm.collate import PromptLayout
from medcap.model.families.vlm.plan import VlmDims, vision_dims_of
from medcap.model.families.vlm.tiny import sincos_positions
from medcap.model.families.vlm.tokenizer import family_tokenizer
from medcap.model.tokenizer import padded_vocab

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig

#: Tokens the Idefics3 processor writes around and between image tiles.
IMAGE_MARKERS = (
    "<fake_token_around_image>",
    "<global-img>",
    *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)),
)

# transformers' SmolVLM default chat template (also SmolVLM-Instruct's), without the video branch:
# "<|im_start|>User:<image>{prompt}<end_of_utterance>\nAssistant:"; the answer follows after a space.
TEMPLATE = (
    "{{ '<|im_start|>' }}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{{ '<end_of_utterance>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

#: Tiny model: 48 px tiles of 8 px patches, 3 x 3 patches shuffled into one token (SmolVLM's
#: factor): 4 tokens a tile.
TINY_TILE = 48


@dataclass(frozen=True)
class Idefics3Kit:
    """Idefics3 and SmolVLM (v1: SmolVLM-256M / 500M / 2B-Instruct are Idefics3 checkpoints)."""

    model_types: tuple[str, ...] = ("idefics3",)

    @property
    def shipped(self) -> dict[str, str]:
        return {
            "HuggingFaceTB/SmolVLM-Instruct": "smolvlm-instruct",
        }

    def matches_hub_id(self, name: str) -> bool:
        name = name.lower()
        return "idefics3" in name or re.search(r"smolvlm-(\d+m-)?(instruct|base)", name) is not None

    def claims_config(self, config: dict[str, Any]) -> bool:
        return True

    def model_class(self) -> type:
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        from transformers import Idefics3Config

        return Idefics3Config.from_dict(data)

    def offline_tokenizer(self) -> Any:
        return family_tokenizer(
            eos="<end_of_utterance>",
            bos="<|im_start|>",
            named={"image_token": "<image>"},
            extra=(*IMAGE_MARKERS, "<|im_end|>"),
        )

    def tiny_config(self, tokenizer: Any) -> Any:
        from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig

        vision = Idefics3VisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_TILE,
            patch_size=8,
            initializer_range=0.05,
        )
        text = LlamaConfig(
            vocab_size=padded_vocab(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            initializer_range=0.05,
        )
        config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=3)
        config.initializer_range = 0.05
        self.wire(config, tokenizer)
        return config

    def wire(self, config: Any, tokenizer: Any) -> None:
        config.image_token_id = tokenizer.image_token_id
        text = config.text_config
        text.bos_token_id = tokenizer.bos_token_id
        text.eos_token_id = tokenizer.eos_token_id
        text.pad_token_id = tokenizer.pad_token_id
        config.pad_token_id = tokenizer.pad_token_id

    # --- processor ------------------------------------------------------------------------

    def offline_processor(self, tokenizer: Any, config: Any) -> Any:
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        v = config.vision_config
        tile = v.image_size
        # SmolVLM-Instruct resizes the longest edge to 4 x 384 (a 4 x 4 grid of tiles at most); the
        # tiny model to 2 tiles.
        image_processor = Idefics3ImageProcessorPil(
            size={"longest_edge": (2 if tile <= TINY_TILE else 4) * tile},
            max_image_size={"longest_edge": tile},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        seq_len = (tile // v.patch_size) ** 2 // config.scale_factor**2
        return Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=seq_len,
            chat_template=TEMPLATE,
        )

    def pretrained_processor(self, name_or_path: str) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name_or_path)

    def apply_image_settings(self, processor: Any, config: Any, cfg: ModelConfig) -> None:
        """``max_pixels``: the resized image's longest edge is at most sqrt(max_pixels), rounded down
        to whole tiles (at least one): fewer tiles, fewer image tokens."""
        from transformers.image_utils import SizeDict

        from medcap.model.families.vlm.family import refuse_image_settings

        refuse_image_settings(
            cfg,
            "Idefics3 / SmolVLM",
            "split into tiles (bound them with model.max_pixels)",
            ("min_pixels", "image_size"),
        )
        if cfg.max_pixels is None:
            return
        ip = processor.image_processor
        tile = ip.max_image_size["longest_edge"]
        tiles = math.isqrt(cfg.max_pixels) // tile
        if tiles < 1:
            raise ConfigError(
                f"model.max_pixels {cfg.max_pixels}: less than one {tile} x {tile} px tile of this model"
            )
        ip.size = SizeDict(longest_edge=tiles * tile)

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
            caption_prefix=" ",
            end_ids=(tok.convert_tokens_to_ids("<end_of_utterance>"),),
            nested_images=True,
        )

    def check_images(self, processor: Any, images: Sequence[Any]) -> None:
        pass  # any size: resized to the longest-edge bound and split into tiles

    def image_side(self, processor: Any) -> int | None:
        return int(processor.image_processor.size.longest_edge)

    def planning_image(self, processor: Any) -> tuple[int, int]:
        side = self.image_side(processor)
        return side, side

    # --- parameters -----------------------------------------------------------------------

    def language_model(self, model: Any) -> Any:
        from medcap.model.adapters import unwrap

        return unwrap(model).model.text_model

    def fingerprint_tensors(self, model: Any) -> list[Any]:
        inner = model.model
        return [
            inner.connector.modality_projection.proj.weight.flatten()[:64],
            inner.get_input_embeddings().weight[:8],
        ]

    def finish_build(self, model: Any, processor: Any, cfg: ModelConfig, how: str) -> None:
        from medcap.model.adapters import unwrap

        if how == "random" and cfg.name_or_path == "tiny-idefics3":
            sincos_positions(unwrap(model).model.vision_model.embeddings.position_embedding, False)

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
            projector_in=v.hidden_size * config.scale_factor**2,
            projector_hidden=0,
            tokens_per_lm_token=config.scale_factor**2,
            text=config.text_config,
        )


__all__ = ["IMAGE_MARKERS", "TEMPLATE", "Idefics3Kit"]
