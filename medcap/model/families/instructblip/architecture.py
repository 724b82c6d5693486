"""InstructBLIP without the hub: the tiny models, shipped configs wired to the offline tokenizers, the
offline processor (with its Q-Former tokenizer) and the prompt layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from medcap.model.families.blip2.architecture import sincos_vision_positions
from medcap.model.families.vlm.collate import PromptLayout
from medcap.model.families.vlm.plan import VlmDims, vision_dims_of
from medcap.model.families.vlm.square import SquareImages
from medcap.model.families.vlm.tokenizer import family_tokenizer
from medcap.model.tokenizer import SPECIAL_TOKENS, padded_vocab

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig

#: The instruction the Q-Former reads when ``model.prompt`` is empty: the Q-Former's text input
#: cannot be empty, and the InstructBLIP paper's captioning instructions read like this one.
DEFAULT_INSTRUCTION = "A short image caption:"


@dataclass(frozen=True)
class InstructBlipKit(SquareImages):
    """InstructBLIP with a decoder-only (Vicuna / Llama, OPT) or encoder-decoder (Flan-T5) language model."""

    text: Literal["decoder", "t5"]
    model_types: tuple[str, ...] = ("instructblip",)

    @property
    def shipped(self) -> dict[str, str]:
        if self.text == "t5":
            return {"Salesforce/instructblip-flan-t5-xl": "instructblip-flan-t5-xl"}
        return {"Salesforce/instructblip-vicuna-7b": "instructblip-vicuna-7b"}

    def matches_hub_id(self, name: str) -> bool:
        name = name.lower()
        return "instructblip" in name and (("t5" in name) == (self.text == "t5"))

    def claims_config(self, config: dict[str, Any]) -> bool:
        text = (config.get("text_config") or {}).get("model_type", "opt")
        return (text == "t5") == (self.text == "t5")

    def model_class(self) -> type:
        from transformers import InstructBlipForConditionalGeneration

        return InstructBlipForConditionalGeneration

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        from transformers import InstructBlipConfig

        return InstructBlipConfig.from_dict(data)

    def offline_tokenizer(self) -> Any:
        # Llama's tokenizer puts <s> first, T5's </s> last. <image> is the shipped BPE's id 4; it is
        # not named as the tokenizer's image_token, because InstructBlipProcessor then takes that
        # string for the AddedToken it otherwise makes itself (and fails on .content).
        return family_tokenizer(
            eos=SPECIAL_TOKENS["eos"], add="eos-last" if self.text == "t5" else "bos-first"
        )

    def qformer_tokenizer(self) -> Any:
        """The Q-Former's tokenizer (BERT's WordPiece in the released models; the shipped BPE here)."""
        return family_tokenizer(eos=SPECIAL_TOKENS["eos"])

    def tiny_config(self, tokenizer: Any) -> Any:
        """BLIP-2's tiny model (128-wide ViT on 64 px images of 16 px patches, 2-layer Q-Former with 8
        queries) with a 2-layer, 64-wide Llama or T5."""
        from transformers import (
            InstructBlipConfig,
            InstructBlipQFormerConfig,
            InstructBlipVisionConfig,
            LlamaConfig,
            T5Config,
        )

        vocab = padded_vocab(tokenizer)
        vision = InstructBlipVisionConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
        )
        qformer = InstructBlipQFormerConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            cross_attention_frequency=1,
            encoder_hidden_size=128,
            max_position_embeddings=512,
            vocab_size=vocab,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        if self.text == "t5":
            text = T5Config(
                vocab_size=vocab,
                d_model=64,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,
                dropout_rate=0.0,
            )
        else:
            text = LlamaConfig(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=2048,
            )
        config = InstructBlipConfig(
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            text_config=text.to_dict(),
            num_query_tokens=8,
            initializer_range=0.05,
        )
        self.wire(config, tokenizer)
        return config

    def wire(self, config: Any, tokenizer: Any) -> None:
        config.image_token_index = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"])
        text = config.text_config
        text.pad_token_id = tokenizer.pad_token_id
        text.eos_token_id = tokenizer.eos_token_id
        if self.text == "t5":
            text.decoder_start_token_id = tokenizer.pad_token_id
        else:
            text.bos_token_id = tokenizer.bos_token_id

    # --- processor ------------------------------------------------------------------------

    def offline_processor(self, tokenizer: Any, config: Any) -> Any:
        from transformers import InstructBlipProcessor
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        side = config.vision_config.image_size
        image_processor = BlipImageProcessorPil(size={"height": side, "width": side})
        return InstructBlipProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            qformer_tokenizer=self.qformer_tokenizer(),
            num_query_tokens=config.num_query_tokens,
        )

    def pretrained_processor(self, name_or_path: str) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name_or_path)

    def apply_image_settings(self, processor: Any, config: Any, cfg: ModelConfig) -> None:
        from medcap.model.families.vlm.family import refuse_image_settings

        side = config.vision_config.image_size
        refuse_image_settings(
            cfg, "InstructBLIP", f"at a fixed {side} x {side} px", ("min_pixels", "max_pixels", "image_size")
        )

    def layout(self, processor: Any, prompt: str) -> PromptLayout:
        """No chat template: ``<image>*32`` (added by the processor) ``<s> instruction``, then the
        caption and ``</s>`` (decoder-only); for Flan-T5 the encoder reads ``<image>*32 instruction
        </s>`` and the decoder learns the caption. The Q-Former reads the instruction too."""
        tok = processor.tokenizer
        return PromptLayout(
            text=prompt or DEFAULT_INSTRUCTION,
            add_special_tokens=True,
            caption_prefix=" " if self.text != "t5" else "",
            end_ids=(tok.eos_token_id,),
        )

    # --- parameters -----------------------------------------------------------------------

    def language_model(self, model: Any) -> Any:
        from medcap.model.adapters import unwrap

        return unwrap(model).language_model

    def fingerprint_tensors(self, model: Any) -> list[Any]:
        return [model.query_tokens.flatten()[:64], model.get_input_embeddings().weight[:8]]

    def finish_build(self, model: Any, processor: Any, cfg: ModelConfig, how: str) -> None:
        if how == "random" and cfg.name_or_path.startswith("tiny-"):
            sincos_vision_positions(model)

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
            projector_in=config.qformer_config.hidden_size,
            projector_hidden=0,
            tokens_per_lm_token=0,
            text=config.text_config,
        )


__all__ = ["DEFAULT_INSTRUCTION", "InstructBlipKit"]
