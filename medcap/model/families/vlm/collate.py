"""The one training collator of the image-text-to-text families (Qwen-VL, LLaVA-NeXT, PaliGemma,
Idefics3 / SmolVLM, Gemma 3, InstructBLIP).

These families' processors expand an image placeholder in the text into the image's tokens
themselves (how many depends on the image for the dynamic-resolution ones), so the prompt part of
every example comes from the PROCESSOR, never from the bare tokenizer, and is never cut: the most
reported fine-tuning failure with these models ("image features and image tokens do not match")
comes from a length cut inside the image tokens. Only the caption is cut, and counted.

A decoder-only example is ``[processor(image, prompt text)] [caption prefix + caption] [end tokens]``
with right padding; labels are -100 everywhere but the caption tokens and the end tokens (the
end-of-turn token and/or EOS that generation stops at). Per-token outputs of the processor (Qwen's
``mm_token_type_ids`` for its 3-D positions, PaliGemma's and Gemma 3's ``token_type_ids`` for their
prefix attention) are extended over the caption with the family's value. Encoder-decoder models
(InstructBLIP with Flan-T5) get the processor's prompt encoding as the encoder input and the caption
+ EOS as labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PromptLayout:
    """How one family lays out an example around the caption, for one processor and prompt."""

    text: str
    """The text the processor gets for each image: the image placeholder and the prompt, through the
    family's chat template where it has one (ending where the answer starts)."""
    add_special_tokens: bool
    """Whether the tokenizer adds its own BOS/EOS to ``text`` (False where the template writes them)."""
    caption_prefix: str = ""
    """Text before the caption inside the answer (a space after ``ASSISTANT:``)."""
    end_ids: tuple[int, ...] = ()
    """Token ids after a caption that ends (end of turn, EOS): learned, and where generation stops."""
    token_fields: Mapping[str, int] = field(default_factory=dict)
    """Per-token processor outputs and their value at caption and end tokens (0 at padding)."""
    nested_images: bool = False
    """The processor takes one list of images per text (``[[im], [im]]``) instead of a flat list."""
    drop: tuple[str, ...] = ("labels",)
    """Processor outputs that are not model inputs here (PaliGemma's processor makes its own labels)."""

    def images_arg(self, images: Sequence[Any]) -> list[Any]:
        return [[im] for im in images] if self.nested_images else list(images)


def encode_prompts(processor: Any, layout: PromptLayout, images: Sequence[Any], padding_side: str) -> Any:
    """The processor's encoding of ``layout.text`` with each image, padded on ``padding_side``."""
    tokenizer = processor.tokenizer
    old = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = processor(
            images=layout.images_arg(images),
            text=[layout.text] * len(images),
            return_tensors="pt",
            padding=True,
            add_special_tokens=layout.add_special_tokens,
        )
    finally:
        tokenizer.padding_side = old
    return enc


class PromptCaptionCollator:
    """``[(PIL image, caption), ...]`` -> a training batch (a dict of tensors with ``labels``).

    ``max_caption_tokens`` caps the caption (the prompt and image tokens are never cut); a caption cut
    by it loses its end tokens (it did not end there) and is counted in ``truncated``.
    ``pad_to_multiple_of`` rounds the padded width up (fewer distinct shapes on a GPU); the extra
    positions are masked. ``check_images`` refuses images beyond the family's limits before the
    processor sees them.
    """

    def __init__(
        self,
        processor: Any,
        layout: PromptLayout,
        max_caption_tokens: int,
        pad_to_multiple_of: int = 1,
        *,
        decoder_only: bool = True,
        check_images: Callable[[Sequence[Any]], None] | None = None,
    ):
        if max_caption_tokens < 1:
            raise ValueError(f"max_caption_tokens must be at least 1, got {max_caption_tokens}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set processor.tokenizer.pad_token")
        self.layout = layout
        self.max_caption_tokens = max_caption_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        self.decoder_only = decoder_only
        self.check_images = check_images
        self.truncated = 0

    def caption_ids(self, caption: str) -> list[int]:
        """The caption's tokens, cut to the cap; the end tokens follow when it was not cut."""
        if not isinstance(caption, str):
            raise TypeError(f"a caption must be a string, got {type(caption).__name__}")
        # split_special_tokens: a caption containing "<image>" or "<|im_end|>" is text, not an image
        # slot (the image scatter would break) or an early end.
        ids = self.tokenizer(
            self.layout.caption_prefix + caption, add_special_tokens=False, split_special_tokens=True
        )["input_ids"]
        if len(ids) > self.max_caption_tokens:
            self.truncated += 1
            return ids[: self.max_caption_tokens]
        return ids + list(self.layout.end_ids)

    def _width(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return -(-longest // m) * m

    def __call__(self, batch: list[tuple[Any, str]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("the collator got an empty batch")
        images = [im if getattr(im, "mode", "RGB") == "RGB" else im.convert("RGB") for im, _ in batch]
        if self.check_images is not None:
            self.check_images(images)
        captions = [self.caption_ids(cap) for _, cap in batch]
        enc = encode_prompts(self.processor, self.layout, images, "right")
        out = {k: v for k, v in enc.items() if k not in self.layout.drop}
        if self.decoder_only:
            out.update(self._decoder_only(enc, captions))
        else:
            out.update(self._encoder_decoder(captions))
        return out

    def _decoder_only(self, enc: Any, captions: list[list[int]]) -> dict[str, torch.Tensor]:
        import torch  # here, not at module level: settings load without torch

        pad = self.tokenizer.pad_token_id
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        n = len(captions)
        width = self._width(max(p + len(c) for p, c in zip(lengths, captions, strict=True)))
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        fields = {
            name: torch.zeros((n, width), dtype=enc[name].dtype)
            for name in self.layout.token_fields
            if name in enc
        }
        for i, (p, cap) in enumerate(zip(lengths, captions, strict=True)):
            # Right-padded prompts: the first p positions are the prompt (image tokens included).
            input_ids[i, :p] = enc["input_ids"][i, :p]
            input_ids[i, p : p + len(cap)] = torch.tensor(cap, dtype=torch.long)
            labels[i, p : p + len(cap)] = input_ids[i, p : p + len(cap)]
            attention[i, : p + len(cap)] = 1
            for name, tensor in fields.items():
                tensor[i, :p] = enc[name][i, :p]
                tensor[i, p : p + len(cap)] = self.layout.token_fields[name]
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, **fields}

    def _encoder_decoder(self, captions: list[list[int]]) -> dict[str, torch.Tensor]:
        import torch  # here, not at module level: settings load without torch

        # The labels are the caption and its EOS; the model shifts them right itself to make the
        # decoder inputs (-100 becomes the decoder start token).
        n, width = len(captions), self._width(max(len(c) for c in captions))
        labels = torch.full((n, width), -100, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, cap in enumerate(captions):
            labels[i, : len(cap)] = torch.tensor(cap, dtype=torch.long)
            mask[i, : len(cap)] = 1
        return {"labels": labels, "decoder_attention_mask": mask}


__all__ = ["PromptCaptionCollator", "PromptLayout", "encode_prompts"]
