"""The model-family interface: what medcap needs from one kind of vision-language model.

Training, predict, caption, the service, export, the query cache and the planner talk only to this
protocol; outside a family's own package no code names its transformers classes. A family is one
object (``medcap/model/families/<family>/``), registered by name in ``medcap.model.families``.

The protocol, by what it answers:

* **identity**: ``name``, ``decoder_only``, ``tiny_names``, ``claims()`` (does this hub id or
  config.json belong to the family);
* **building**: ``architecture()`` (the transformers config of a tiny, shipped or local model,
  wired to the offline tokenizer), ``model_class()``, ``processor()`` / ``pretrained_processor()``,
  ``finish_build()``; what stays fp32 (``fp32_prefixes``) and unquantized (``quant_skip``);
* **parameters**: ``parts`` (vision / qformer / projection / language, by module-name prefix: what
  ``model.train_*`` flags train and how the planner groups weights), ``target_presets`` (LoRA
  scopes as regexes), ``feedforward_names`` ((IA)3), ``language_model()``, ``fingerprint_tensors()``;
* **data in, captions out**: ``collator()`` (labels -100 everywhere but caption tokens and EOS;
  image tokens never cut, captions are), ``generation_inputs()``, ``decode()`` (prompt stripped),
  ``stop_token_ids()``, ``image_side()``, ``check_images()``, ``pixel_dtype_device()``;
* **planning, export, query cache**: ``plan_spec()``, ``export_classes``, ``base_licenses``,
  ``query_cache`` (None where the family cannot train from cached image features).

docs/ARCHITECTURE.md has the checklist for adding a family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

    from medcap.config.model import ModelConfig


@runtime_checkable
class Collator(Protocol):
    """Turns ``[(PIL image, caption), ...]`` into a training batch (a dict of tensors with ``labels``)."""

    truncated: int
    """How many captions were cut by the length cap so far (they lose their EOS)."""

    def __call__(self, batch: list[tuple[Image.Image, str]]) -> dict[str, Any]: ...


@runtime_checkable
class ModelFamily(Protocol):
    """One kind of vision-language model, as medcap builds, trains, plans and serves it."""

    name: str
    """Registry name, what ``model.family`` takes (``blip2-opt``)."""
    decoder_only: bool
    """True when the language model is decoder-only: prompt and caption are one sequence and
    ``generate()`` returns the prompt too; False for encoder-decoder (T5)."""
    tiny_names: tuple[str, ...]
    """Names of built-in tiny random models (``tiny``) for tests and the demo."""
    target_presets: Mapping[str, str]
    """LoRA target presets: scope name -> regex over full module names (peft uses re.fullmatch)."""
    feedforward_names: tuple[str, ...]
    """Module-name endings that (IA)3 treats as feed-forward layers (it scales their input)."""
    parts: Mapping[str, tuple[str, ...]]
    """Parameter groups by module-name prefix: ``vision``, ``qformer``, ``projection`` (what the
    ``model.train_*`` flags train, what the planner reports); the rest is the language model."""
    fp32_prefixes: tuple[str, ...]
    """Parameter-name prefixes kept in fp32 whatever the precision (as transformers keeps them)."""
    fp32_description: str
    """What those parameters are, in words (the planner's weight breakdown says it)."""
    quant_skip: tuple[str, ...]
    """Module names bitsandbytes leaves unquantized."""
    export_classes: tuple[str, str]
    """The transformers model and processor class names a merged export loads with."""
    base_licenses: Mapping[str, str]
    """Licence of each known base model (hub id -> SPDX id), for model cards."""
    query_cache: Any
    """The family's frozen-vision query cache hooks (``medcap.train.query_cache``), or None."""

    def claims(self, name_or_path: str, config: Mapping[str, Any] | None) -> bool:
        """Whether this family builds ``name_or_path``; ``config`` is its config.json when readable."""
        ...

    def architecture(self, cfg: ModelConfig, tokenizer: Any) -> Any:
        """The transformers config of a tiny, shipped or local model, wired to ``tokenizer``'s
        special ids (random-init and meta builds use it; nothing is downloaded)."""
        ...

    def offline_tokenizer(self) -> Any:
        """The tokenizer random-init and tiny builds use (shipped with medcap)."""
        ...

    def model_class(self) -> type:
        """The transformers class of the whole model (``from_pretrained``, ``Model(config)``)."""
        ...

    def processor(self, tokenizer: Any, architecture: Any) -> Any:
        """A processor for an offline build (tiny, random-init) from its tokenizer and config."""
        ...

    def pretrained_processor(self, name_or_path: str, model: Any) -> Any:
        """The processor of a pretrained model (hub id or local folder)."""
        ...

    def finish_build(self, model: Any, processor: Any, cfg: ModelConfig, *, how: str) -> None:
        """Family-specific touches once the model exists (``how``: ``pretrained``, ``random`` or
        ``meta``): image size, stop tokens, the starting point of tiny models."""
        ...

    def language_model(self, model: Any) -> Any:
        """The language-model submodule (training forwards of it build no KV cache)."""
        ...

    def fingerprint_tensors(self, model: Any) -> Sequence[Any]:
        """A few base tensors whose hash identifies a rebuilt random-init base."""
        ...

    def collator(
        self, processor: Any, cfg: ModelConfig, max_caption_tokens: int, pad_to_multiple_of: int = 1
    ) -> Collator:
        """The training collator: at most ``max_caption_tokens`` caption tokens plus the EOS."""
        ...

    def generation_inputs(self, processor: Any, images: Sequence[Image.Image], prompt: str) -> dict[str, Any]:
        """``model.generate`` inputs for images and the prompt; ``input_ids.shape[1]`` is the prompt length."""
        ...

    def decode(self, processor: Any, output_ids: Any, prompt_len: int) -> list[str]:
        """Captions from ``generate()`` output: prompt removed, special tokens dropped, stripped."""
        ...

    def generated_ids(self, output_ids: Any, prompt_len: int) -> Any:
        """The generated part of ``generate()`` output (the prompt or the decoder start dropped)."""
        ...

    def stop_token_ids(self, model: Any, processor: Any) -> list[int]:
        """Tokens that end a caption: the tokenizer's EOS (what training appends) and the model's own."""
        ...

    def image_side(self, processor: Any) -> int | None:
        """The model's input side in pixels (JPEGs decode in draft mode to no less), or None."""
        ...

    def check_images(self, processor: Any, images: Sequence[Image.Image]) -> None:
        """Raise ``ValueError`` naming the limit for an image beyond what the family takes (Qwen-VL:
        aspect ratios over 200:1); the reader's pixel-count limit applies to every family."""
        ...

    def pixel_dtype_device(self, model: Any) -> tuple[Any, Any]:
        """Dtype and device the pixel values must have for ``model``."""
        ...

    def plan_spec(self, model: Any) -> Any:
        """What ``medcap plan`` needs: dimensions, activation and FLOP formulas (``medcap.plan``)."""
        ...


def processor_image_side(processor: Any) -> int | None:
    """The input side in pixels a processor resizes to (``size`` of its image processor), or None.

    Loaders pass it to ``medcap.data.images.read_image(min_size=...)`` so JPEGs decode in draft mode
    at no less than this size; training, the query cache, predict and the service all use it, so
    they see the same pixels.
    """
    size = getattr(getattr(processor, "image_processor", processor), "size", None)
    if isinstance(size, int):
        return size
    if size is None or not hasattr(size, "get"):
        return None
    # A plain dict (older processors, saved configs) or transformers 5's SizeDict dataclass, which
    # has .get but is no dict: missing that made every caller decode JPEGs at full size.
    values = [size.get(k) for k in ("height", "width", "shortest_edge")]
    values = [int(v) for v in values if v]
    return min(values) if values else None


def processor_resizer(processor: Any) -> Callable[[Image.Image], Image.Image] | None:
    """A function that resizes a PIL image the way the processor's image processor resizes it first
    (to a fixed height x width with its own resample filter), or None when it does not work that way.

    The caption service uses it to queue images at the model's input size instead of full size. It
    is checked here on a sample image: the processor's pixel values from the resized image must equal
    those from the original (its own resize is then a no-op), else None is returned, so using it can
    never change what the model sees.
    """
    import numpy as np
    from PIL import Image

    images = getattr(processor, "image_processor", None)
    size = getattr(images, "size", None)
    if images is None or size is None or not hasattr(size, "get") or not getattr(images, "do_resize", False):
        return None
    height, width = size.get("height"), size.get("width")
    if not height or not width:
        return None
    try:
        resample = Image.Resampling(int(getattr(images, "resample", Image.Resampling.BICUBIC)))
    except (TypeError, ValueError):
        return None

    def resize(image: Image.Image) -> Image.Image:
        if image.size == (width, height):
            return image
        return image.resize((width, height), resample=resample)

    rng = np.random.default_rng(0)
    sample = Image.fromarray((rng.random((height + 37, width + 91, 3)) * 255).astype(np.uint8))
    try:
        direct = images(images=[sample], return_tensors="np")["pixel_values"]
        early = images(images=[resize(sample)], return_tensors="np")["pixel_values"]
    except Exception:  # noqa: BLE001 - a processor that cannot be called this way: do not resize early
        return None
    return resize if np.array_equal(np.asarray(direct), np.asarray(early)) else None


__all__ = ["Collator", "ModelFamily", "processor_image_side", "processor_resizer"]
