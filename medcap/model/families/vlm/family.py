"""``VlmFamily``: the ModelFamily of an image-text-to-text model whose processor expands the image
placeholder itself (Qwen-VL, LLaVA-NeXT, PaliGemma, Idefics3 / SmolVLM, Gemma 3, InstructBLIP).

What differs between these families is small and lives in each family's ``Kit`` (its package under
``medcap/model/families/``): which transformers classes, the tiny and shipped configs, the offline
processor, the prompt layout (chat template, end-of-turn token), image limits and settings, the
planner's dimensions. Everything else - claiming a model, the collator, generation inputs,
decoding, stop tokens, pixel dtype - is done here once, by composition: a family is a
``VlmFamily`` holding its kit, not a subclass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from medcap.model.families.vlm.collate import PromptCaptionCollator, PromptLayout, encode_prompts

if TYPE_CHECKING:
    from PIL import Image

    from medcap.config.model import ModelConfig
    from medcap.model.families.vlm.plan import VlmDims


class ImageLimitError(ValueError):
    """An image is beyond what the model family accepts; the message names the limit."""


class Kit(Protocol):
    """What one image-text-to-text family knows about itself (see ``VlmFamily``)."""

    model_types: tuple[str, ...]
    """``model_type`` values of config.json files this kit builds."""
    shipped: Mapping[str, str]
    """Hub id -> folder under ``medcap/model/assets`` holding its config.json."""

    def matches_hub_id(self, name: str) -> bool:
        """Whether a hub id whose config is not here names one of this family's models."""
        ...

    def claims_config(self, config: Mapping[str, Any]) -> bool:
        """Whether a config.json of one of ``model_types`` is this kit's (InstructBLIP: which LM)."""
        ...

    def model_class(self) -> type: ...

    def config_from_dict(self, data: dict[str, Any]) -> Any: ...

    def offline_tokenizer(self) -> Any: ...

    def tiny_config(self, tokenizer: Any) -> Any:
        """The built-in tiny model's config, wired to ``tokenizer``."""
        ...

    def wire(self, config: Any, tokenizer: Any) -> None:
        """Point a shipped or local config's special-token ids at the offline tokenizer."""
        ...

    def offline_processor(self, tokenizer: Any, config: Any) -> Any: ...

    def pretrained_processor(self, name_or_path: str) -> Any: ...

    def apply_image_settings(self, processor: Any, config: Any, cfg: ModelConfig) -> None:
        """``model.min_pixels`` / ``max_pixels`` / ``image_size`` on the processor (ConfigError where
        the family takes none)."""
        ...

    def layout(self, processor: Any, prompt: str) -> PromptLayout: ...

    def check_images(self, processor: Any, images: Sequence[Image.Image]) -> None:
        """Raise ``ImageLimitError`` naming the limit for an image the family cannot take."""
        ...

    def image_side(self, processor: Any) -> int | None: ...

    def language_model(self, model: Any) -> Any: ...

    def fingerprint_tensors(self, model: Any) -> Sequence[Any]: ...

    def finish_build(self, model: Any, processor: Any, cfg: ModelConfig, how: str) -> None: ...

    def plan_dims(self, config: Any) -> VlmDims: ...

    def planning_image(self, processor: Any) -> tuple[int, int]:
        """(width, height) of the largest image the processor's settings let through unchanged:
        what the planner sizes the sequence for."""
        ...


def _hub_or_folder_config(kit: Kit, cfg: ModelConfig) -> Path:
    from medcap.config.loader import ConfigError
    from medcap.model.tokenizer import ASSETS_DIR

    local = Path(cfg.name_or_path).expanduser()
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise ConfigError(f"{local} holds no config.json: a local model folder needs one")
        return path
    short = kit.shipped.get(cfg.name_or_path)
    if short is None:
        raise ConfigError(
            f"model.name_or_path {cfg.name_or_path!r}: its config is not here (no hub); shipped configs "
            f"of this family are {', '.join(kit.shipped)}, or give a local folder with config.json"
        )
    return ASSETS_DIR / short / "config.json"


@dataclass(frozen=True)
class VlmFamily:
    """One image-text-to-text family, as medcap builds, trains, plans and serves it."""

    name: str
    description: str
    kit: Kit
    tiny_names: tuple[str, ...]
    target_presets: Mapping[str, str]
    parts: Mapping[str, tuple[str, ...]]
    export_classes: tuple[str, str]
    base_licenses: Mapping[str, str]
    decoder_only: bool = True
    feedforward_names: tuple[str, ...] = ("down_proj", "fc2")
    fp32_prefixes: tuple[str, ...] = ()
    fp32_description: str = "nothing"
    #: The output head (tied to the embeddings in most of these models; int8 heads lose accuracy).
    quant_skip: tuple[str, ...] = ("lm_head",)
    #: None: the frozen-vision query cache (medcap.train.query_cache) is BLIP-2's; these families
    #: feed the language model hundreds of image tokens per image (or, for InstructBLIP, Q-Former
    #: outputs that depend on the prompt), which that cache does not hold.
    query_cache: Any = None

    # --- identity -------------------------------------------------------------------------

    def claims(self, name_or_path: str, config: Mapping[str, Any] | None) -> bool:
        if name_or_path in self.tiny_names:
            return True
        if config is not None:
            return config.get("model_type") in self.kit.model_types and self.kit.claims_config(config)
        return bool(name_or_path) and self.kit.matches_hub_id(name_or_path)

    def shipped_config(self, name_or_path: str) -> Path | None:
        from medcap.model.tokenizer import ASSETS_DIR

        short = self.kit.shipped.get(name_or_path)
        return ASSETS_DIR / short / "config.json" if short else None

    # --- building -------------------------------------------------------------------------

    def offline_tokenizer(self) -> Any:
        return self.kit.offline_tokenizer()

    def architecture(self, cfg: ModelConfig, tokenizer: Any) -> Any:
        """The tiny config, or a shipped / local config.json wired to the offline tokenizer.

        The offline tokenizer is smaller than the real one: the special ids point at it while the
        embedding keeps the real vocabulary size, so parameter counts and memory are the real ones.
        """
        import json

        from medcap.config.loader import ConfigError

        if cfg.name_or_path in self.tiny_names:
            config = self.kit.tiny_config(tokenizer)
        else:
            path = _hub_or_folder_config(self.kit, cfg)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{path} is not readable JSON ({e})") from None
            config = self.kit.config_from_dict(data)
            vocab = config.get_text_config().vocab_size
            if len(tokenizer) > vocab:
                raise ConfigError(f"{path}: vocab_size {vocab} is smaller than the offline tokenizer")
            self.kit.wire(config, tokenizer)
        return config

    def model_class(self) -> type:
        return self.kit.model_class()

    def processor(self, tokenizer: Any, config: Any) -> Any:
        return self.kit.offline_processor(tokenizer, config)

    def pretrained_processor(self, name_or_path: str, model: Any) -> Any:
        return self.kit.pretrained_processor(name_or_path)

    def finish_build(self, model: Any, processor: Any, cfg: ModelConfig, *, how: str) -> None:
        """Image settings on the processor (min/max pixels, image size), the kit's own touches, and
        generation stopping at the end tokens the collator appends."""
        from medcap.model.adapters import unwrap

        self.kit.apply_image_settings(processor, unwrap(model).config, cfg)
        self.kit.finish_build(model, processor, cfg, how)
        stops = self.stop_token_ids(model, processor)
        gen = getattr(unwrap(model), "generation_config", None)
        if gen is not None:
            gen.eos_token_id = stops[0] if len(stops) == 1 else stops
            if processor.tokenizer.pad_token_id is not None:
                gen.pad_token_id = processor.tokenizer.pad_token_id

    # --- parameters -----------------------------------------------------------------------

    def language_model(self, model: Any) -> Any:
        return self.kit.language_model(model)

    def fingerprint_tensors(self, model: Any) -> Sequence[Any]:
        return self.kit.fingerprint_tensors(model)

    # --- data in, captions out ------------------------------------------------------------

    def layout(self, processor: Any, prompt: str) -> PromptLayout:
        """How an example is laid out around the caption for ``prompt``."""
        return self.kit.layout(processor, prompt)

    def check_images(self, processor: Any, images: Sequence[Image.Image]) -> None:
        self.kit.check_images(processor, images)

    def collator(
        self, processor: Any, cfg: ModelConfig, max_caption_tokens: int, pad_to_multiple_of: int = 1
    ) -> PromptCaptionCollator:
        return PromptCaptionCollator(
            processor,
            self.layout(processor, cfg.prompt),
            max_caption_tokens,
            pad_to_multiple_of,
            decoder_only=self.decoder_only,
            check_images=lambda images: self.check_images(processor, images),
        )

    def generation_inputs(self, processor: Any, images: Sequence[Image.Image], prompt: str) -> dict[str, Any]:
        """The processor's encoding of the prompt with each image; left padding for decoder-only
        models (batched generation continues from the right end)."""
        images = [im if getattr(im, "mode", "RGB") == "RGB" else im.convert("RGB") for im in images]
        self.check_images(processor, images)
        layout = self.layout(processor, prompt)
        enc = encode_prompts(processor, layout, images, "left" if self.decoder_only else "right")
        return {k: v for k, v in enc.items() if k not in layout.drop}

    def generated_ids(self, output_ids: Any, prompt_len: int) -> Any:
        return output_ids[:, prompt_len:] if self.decoder_only else output_ids[:, 1:]

    def decode(self, processor: Any, output_ids: Any, prompt_len: int) -> list[str]:
        texts = processor.tokenizer.batch_decode(
            self.generated_ids(output_ids, prompt_len), skip_special_tokens=True
        )
        return [t.strip() for t in texts]

    def stop_token_ids(self, model: Any, processor: Any) -> list[int]:
        """The end tokens the collator appends (end of turn / EOS) and the tokenizer's EOS."""
        layout = self.layout(processor, "")
        ids: list[int] = []
        for i in (*layout.end_ids, processor.tokenizer.eos_token_id):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        return ids

    def image_side(self, processor: Any) -> int | None:
        return self.kit.image_side(processor)

    def pixel_dtype_device(self, model: Any) -> tuple[Any, Any]:
        """The dtype and device of the first floating-point parameter of the vision side."""
        from medcap.model.adapters import unwrap

        inner = unwrap(model)
        vision = self.parts.get("vision", ())
        for name, p in inner.named_parameters():
            if p.is_floating_point() and name.startswith(vision):
                return p.dtype, p.device
        p = next(inner.parameters())
        return p.dtype, p.device

    # --- planning -------------------------------------------------------------------------

    def plan_spec(self, model: Any) -> Any:
        from medcap.model.families.vlm.plan import VlmPlanSpec

        return VlmPlanSpec.of(model, self)


def refuse_image_settings(cfg: ModelConfig, family: str, how: str, names: Sequence[str]) -> None:
    """A ConfigError for each of ``names`` (``min_pixels``, ``max_pixels``, ``image_size``) that is set
    but does not apply to ``family``, which reads images ``how``."""
    from medcap.config.loader import ConfigError

    for name in names:
        if getattr(cfg, name) is not None:
            raise ConfigError(f"model.{name}: does not apply to {family}, which reads images {how}; unset it")


def lm_presets(lm: str, vision: str | None, projector: str | None) -> dict[str, str]:
    """The LoRA target presets of a family, each an explicit scope (a regex over full module names;
    peft matches it with re.fullmatch): ``lm`` is the language model's layer prefix, e.g.
    ``model\\.language_model\\.layers\\.\\d+``; ``vision`` the vision tower's linears; ``projector``
    the projector's linears."""
    presets = {
        "lm-qv": lm + r"\.self_attn\.(q_proj|v_proj)",
        "lm-attn": lm + r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
        "lm-all": lm + r"\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
    }
    if vision is not None:
        presets["vision"] = vision
    if projector is not None:
        presets["projector"] = projector
    for pattern in presets.values():
        re.compile(pattern)
    return presets


__all__ = ["ImageLimitError", "Kit", "VlmFamily", "lm_presets", "refuse_image_settings"]
