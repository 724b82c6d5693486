"""BLIP-2 (Salesforce): a ViT, a Q-Former whose query tokens read the image, and a language model
(OPT, decoder-only, or Flan-T5, encoder-decoder) that reads the projected queries as its first
tokens. transformers' ``Blip2ForConditionalGeneration`` and ``Blip2Processor``.

Two family objects share this code: ``BLIP2_OPT`` (``blip2-opt``) and ``BLIP2_T5`` (``blip2-t5``).
What the family knows (FACTS 3 and 4):

* the processor inserts ``num_query_tokens`` ``<image>`` tokens before BOS; the model scatters the
  Q-Former outputs into them. Tokenizing captions with the bare tokenizer silently drops the image;
* OPT labels are as long as input_ids, -100 at pad, image and prompt positions; an EOS ends each
  caption; generation needs left padding and returns the prompt, which is sliced off;
* the Q-Former and query tokens stay fp32 (as transformers keeps them), and bitsandbytes leaves them,
  the projection and the output head unquantized;
* OPT's ``fc1``/``fc2`` names exist in the vision tower too, so every LoRA preset is scoped by a
  regex over the full module name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medcap.model.families.blip2 import architecture

if TYPE_CHECKING:
    from PIL import Image

    from medcap.config.model import ModelConfig

# LoRA target presets: a regex over full module names (peft matches it with re.fullmatch), so the
# scope is explicit: "language_model" alone never reaches the vision tower's fc1/fc2 or the Q-Former.
_LM = r"language_model\..*\."
_QF = r"qformer\..*\."
_QFORMER_PRESETS = {
    "qformer-qv": _QF + r"attention\.(query|value)",
    "qformer-attn": _QF + r"attention\.(query|key|value)",
}


@dataclass(frozen=True)
class Blip2Family:
    """BLIP-2 with one kind of language model; the two instances below are the family objects."""

    name: str
    text: Literal["opt", "t5"]
    decoder_only: bool
    tiny_names: tuple[str, ...]
    target_presets: Mapping[str, str]
    feedforward_names: tuple[str, ...]
    description: str
    parts: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "vision": ("vision_model.",),
            "qformer": ("qformer.", "query_tokens"),
            "projection": ("language_projection.",),
        }
    )
    fp32_prefixes: tuple[str, ...] = ("qformer.", "query_tokens")
    fp32_description: str = "Q-Former, query tokens"
    #: The fp32 Q-Former (as transformers keeps it), the small projection, and the output head (tied to
    #: the input embedding in OPT; int8 heads lose accuracy).
    quant_skip: tuple[str, ...] = ("qformer", "query_tokens", "language_projection", "lm_head")
    export_classes: tuple[str, str] = ("Blip2ForConditionalGeneration", "Blip2Processor")
    base_licenses: Mapping[str, str] = field(
        default_factory=lambda: dict.fromkeys(architecture.SHIPPED_CONFIGS, "mit")
    )

    # --- identity -------------------------------------------------------------------------

    def claims(self, name_or_path: str, config: Mapping[str, Any] | None) -> bool:
        if name_or_path in self.tiny_names:
            return True
        if config is not None:
            if config.get("model_type") not in ("blip-2", None):
                return False
            text = config.get("text_config") or {"model_type": "opt"}
            return text.get("model_type") == self.text
        # A hub id whose config is not here: every Salesforce release says its language model in its name.
        name = name_or_path.lower()
        return "blip2" in name.replace("-", "") and (("t5" in name) == (self.text == "t5"))

    def shipped_config(self, name_or_path: str) -> Path | None:
        return architecture.shipped_config(name_or_path)

    # --- building -------------------------------------------------------------------------

    def offline_tokenizer(self) -> Any:
        from medcap.model.tokenizer import offline_tokenizer

        return offline_tokenizer("bos-first" if self.text == "opt" else "eos-last")

    def architecture(self, cfg: ModelConfig, tokenizer: Any) -> Any:
        return architecture.offline_architecture(
            cfg, self.text, cfg.name_or_path in self.tiny_names, tokenizer
        )

    def model_class(self) -> type:
        from transformers import Blip2ForConditionalGeneration

        return Blip2ForConditionalGeneration

    def processor(self, tokenizer: Any, config: Any) -> Any:
        return architecture.make_processor(
            tokenizer, config.vision_config.image_size, config.num_query_tokens
        )

    def pretrained_processor(self, name_or_path: str, model: Any) -> Any:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(name_or_path)
        if getattr(processor, "num_query_tokens", None) is None:
            processor.num_query_tokens = model.config.num_query_tokens
        return processor

    def finish_build(self, model: Any, processor: Any, cfg: ModelConfig, *, how: str) -> None:
        """Tiny models start with sine-cosine vision positions; a pretrained model is re-gridded to
        ``model.image_size``; generation stops at the tokenizer's EOS and the model's."""
        if how == "random" and cfg.name_or_path in self.tiny_names:
            architecture.sincos_vision_positions(model)
        if how == "pretrained" and cfg.image_size and cfg.image_size != model.config.vision_config.image_size:
            architecture.resize_vision_positions(model, cfg.image_size)
            processor.image_processor.size = {"height": cfg.image_size, "width": cfg.image_size}
        self._align_stop_tokens(model, processor)

    def _align_stop_tokens(self, model: Any, processor: Any) -> None:
        """Make ``generate()`` stop at the tokenizer's EOS (what the collator appends) and the model's.

        The Salesforce OPT models stop at "\\n" (50118, LAVIS's caption end) while their tokenizer's
        EOS is ``</s>``; a fine-tuned model learns ``</s>``. BLIP-2's ``generate`` runs the language
        model's own ``generate``, so both generation configs get the list.
        """
        stops = self.stop_token_ids(model, processor)
        for owner in (model, getattr(model, "language_model", None)):
            gen = getattr(owner, "generation_config", None)
            if gen is None:
                continue
            current = gen.eos_token_id
            ids = list(current) if isinstance(current, list) else ([] if current is None else [current])
            ids += [i for i in stops if i not in ids]
            gen.eos_token_id = ids[0] if len(ids) == 1 else ids
            if gen.pad_token_id is None:
                gen.pad_token_id = processor.tokenizer.pad_token_id

    # --- parameters -----------------------------------------------------------------------

    def language_model(self, model: Any) -> Any:
        return getattr(model, "language_model", None)

    def fingerprint_tensors(self, model: Any) -> Sequence[Any]:
        return [model.query_tokens, model.get_input_embeddings().weight[:8]]

    # --- data in, captions out ------------------------------------------------------------

    def collator(
        self, processor: Any, cfg: ModelConfig, max_caption_tokens: int, pad_to_multiple_of: int = 1
    ):
        from medcap.model.collate import CaptionCollator

        return CaptionCollator.for_caption_tokens(
            processor, cfg, max_caption_tokens, pad_to_multiple_of, decoder_only=self.decoder_only
        )

    def generation_inputs(self, processor: Any, images: Sequence[Image.Image], prompt: str) -> dict[str, Any]:
        """Images and the prompt only (``<image>*N <s> prompt`` for OPT); left padding for
        decoder-only models (batched generation continues from the right end)."""
        tok = processor.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left" if self.decoder_only else "right"
        try:
            enc = processor(
                images=list(images), text=[prompt] * len(images), return_tensors="pt", padding=True
            )
        finally:
            tok.padding_side = old_side
        return dict(enc)

    def generated_ids(self, output_ids: Any, prompt_len: int) -> Any:
        # Decoder-only output repeats the prompt; encoder-decoder output starts with the decoder start
        # token (T5: the pad token).
        return output_ids[:, prompt_len:] if self.decoder_only else output_ids[:, 1:]

    def decode(self, processor: Any, output_ids: Any, prompt_len: int) -> list[str]:
        if self.decoder_only:
            output_ids = output_ids[:, prompt_len:]
        texts = processor.tokenizer.batch_decode(output_ids, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def stop_token_ids(self, model: Any, processor: Any) -> list[int]:
        from medcap.model.adapters import unwrap

        ids: list[int] = []
        eos = getattr(unwrap(model).config.text_config, "eos_token_id", None)
        for i in [processor.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        return ids

    def image_side(self, processor: Any) -> int | None:
        from medcap.model.family import processor_image_side

        return processor_image_side(processor)

    def check_images(self, processor: Any, images: Sequence[Image.Image]) -> None:
        """Any size: the processor resizes to the model's square (the reader bounds the pixel count)."""

    def pixel_dtype_device(self, model: Any) -> tuple[Any, Any]:
        from medcap.model.adapters import unwrap

        inner = unwrap(model)
        vision = getattr(inner, "vision_model", inner)
        for p in vision.parameters():
            if p.is_floating_point():
                return p.dtype, p.device
        p = next(inner.parameters())
        return p.dtype, p.device

    # --- planning and the query cache -----------------------------------------------------

    def plan_spec(self, model: Any) -> Any:
        from medcap.model.families.blip2.plan import Blip2PlanSpec

        return Blip2PlanSpec.of(model, self)

    @property
    def query_cache(self) -> Any:
        from medcap.model.families.blip2 import query_cache

        return query_cache


BLIP2_OPT = Blip2Family(
    name="blip2-opt",
    text="opt",
    decoder_only=True,
    tiny_names=("tiny",),
    target_presets={
        "lm-qv": _LM + r"(q_proj|v_proj)",
        "lm-attn": _LM + r"(q_proj|k_proj|v_proj|out_proj)",
        "lm-all": _LM + r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
        **_QFORMER_PRESETS,
    },
    feedforward_names=("fc1", "fc2"),
    description="BLIP-2 with OPT, e.g. Salesforce/blip2-opt-6.7b",
)

BLIP2_T5 = Blip2Family(
    name="blip2-t5",
    text="t5",
    decoder_only=False,
    tiny_names=("tiny-t5",),
    target_presets={
        "lm-qv": _LM + r"(q|v)",
        "lm-attn": _LM + r"(q|k|v|o)",
        "lm-all": _LM + r"(q|k|v|o|wi|wi_0|wi_1|wo)",
        **_QFORMER_PRESETS,
    },
    feedforward_names=("wi", "wi_0", "wi_1", "wo"),
    description="BLIP-2 with Flan-T5, e.g. Salesforce/blip2-flan-t5-xl",
)

__all__ = ["BLIP2_OPT", "BLIP2_T5", "Blip2Family"]
