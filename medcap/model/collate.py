"""The training collator of families whose processor inserts the image tokens itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig


class CaptionCollator:
    """Turn a list of ``(PIL image, caption)`` into a training batch.

    Returns ``pixel_values``, ``input_ids``, ``attention_mask`` and ``labels`` (and, for encoder-decoder
    families, ``decoder_attention_mask``):

    * decoder-only (OPT): the processor builds ``<image>*N <s> prompt`` (the image tokens come from the
      PROCESSOR, never from the bare tokenizer), the caption tokens and an EOS follow, right padding;
      labels are the same length as ``input_ids``, -100 at padding, image tokens and prompt;
    * encoder-decoder (T5): ``<image>*N prompt </s>`` goes to the encoder, the caption + EOS are the
      labels, -100 at padding.

    ``max_length`` caps the whole decoder-only sequence (image tokens included, as the processor counts)
    or the T5 labels. A caption cut by it loses its EOS (it did not end there); ``truncated`` counts them.
    ``pad_to_multiple_of`` rounds the padded width up (8 on GPUs: fewer distinct shapes for the kernels
    and their per-shape set-up, tensor-core aligned); the extra pads are masked and change no loss.

    An item may carry its own prompt, ``(image, caption, prompt)`` (``data.prompt_with``): the prompts
    are then encoded together, right-padded, and each caption follows its own prompt; the caption cap
    stays what it is for ``model.prompt`` (a longer prompt never cuts a caption shorter).
    """

    def __init__(
        self,
        processor,
        model_cfg: ModelConfig,
        max_length: int = 128,
        pad_to_multiple_of: int = 1,
        *,
        decoder_only: bool,
    ):
        if pad_to_multiple_of < 1:
            raise ValueError(f"CaptionCollator: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.processor = processor
        self.cfg = model_cfg
        self.decoder_only = decoder_only
        self.max_length = max_length
        self.tokenizer = processor.tokenizer
        self.num_query_tokens = processor.num_query_tokens
        image_token = getattr(processor.image_token, "content", processor.image_token)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set processor.tokenizer.pad_token")
        self.eos_id = self.tokenizer.eos_token_id
        self.truncated = 0
        # The prompt tokens are fixed: measure them once.
        self.prompt_ids = self._prompt_encoding([Image.new("RGB", (8, 8))])["input_ids"][0].tolist()
        if self.decoder_only and len(self.prompt_ids) + 2 > max_length:
            raise ValueError(
                f"max_length {max_length} leaves no room for a caption after {len(self.prompt_ids)} "
                "image and prompt tokens; raise max_length"
            )

    @classmethod
    def for_caption_tokens(
        cls,
        processor,
        model_cfg: ModelConfig,
        max_caption_tokens: int,
        pad_to_multiple_of: int,
        *,
        decoder_only: bool,
    ) -> CaptionCollator:
        """A collator whose length cap keeps ``max_caption_tokens`` caption tokens plus the EOS.

        ``max_length`` counts the whole decoder-only sequence (image tokens and prompt included), so the
        fixed prefix is measured first; image tokens are never cut, only captions.
        """
        if not decoder_only:
            return cls(processor, model_cfg, max_caption_tokens + 1, pad_to_multiple_of, decoder_only=False)
        probe = cls(processor, model_cfg, max_length=1 << 20, decoder_only=True)
        return cls(
            processor,
            model_cfg,
            max_length=len(probe.prompt_ids) + max_caption_tokens + 1,
            pad_to_multiple_of=pad_to_multiple_of,
            decoder_only=True,
        )

    def _padded_width(self, width: int) -> int:
        m = self.pad_to_multiple_of
        return -(-width // m) * m

    def _prompt_encoding(self, images: list[Image.Image], prompts: list[str] | None = None):
        if prompts is None:
            return self.processor(images=images, text=[self.cfg.prompt] * len(images), return_tensors="pt")
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "right"
        try:
            return self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = old_side

    def _caption_ids(self, caption: str) -> list[int]:
        if not isinstance(caption, str):
            raise TypeError(f"CaptionCollator: a caption must be a string, got {type(caption).__name__}")
        # split_special_tokens: a caption that happens to contain "<image>" or "</s>" is text, not
        # an image slot (which would break the image scatter) or an early end.
        return self.tokenizer(caption, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def __call__(self, batch: list[tuple[Image.Image, str]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("CaptionCollator got an empty batch")
        images = [item[0] for item in batch]
        captions = [item[1] for item in batch]
        own = [item[2] if len(item) > 2 else self.cfg.prompt for item in batch]
        prompts = None if all(p == self.cfg.prompt for p in own) else own
        enc = self._prompt_encoding(images, prompts)
        pad = self.tokenizer.pad_token_id
        if self.decoder_only:
            prompt = enc["input_ids"]
            if prompts is None and prompt.shape[1] != len(self.prompt_ids):
                raise RuntimeError("the processor produced prompts of different lengths for one prompt text")
            lengths = enc["attention_mask"].sum(dim=1).tolist() if prompts else [prompt.shape[1]] * len(batch)
            room = self.max_length - len(self.prompt_ids)
            rows, label_rows = [], []
            for i, cap in enumerate(captions):
                ids = self._caption_ids(cap)
                if len(ids) + 1 > room:
                    ids = ids[:room]
                    self.truncated += 1
                else:
                    ids = ids + [self.eos_id]
                rows.append(prompt[i, : lengths[i]].tolist() + ids)
                # Image tokens and prompt are inputs, not targets: mask them.
                label_rows.append([-100] * lengths[i] + ids)
            width = self._padded_width(max(len(r) for r in rows))
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
                input_ids[i, : len(r)] = torch.tensor(r)
                labels[i, : len(lab)] = torch.tensor(lab)
                attention[i, : len(r)] = 1
            return {
                "pixel_values": enc["pixel_values"],
                "input_ids": input_ids,
                "attention_mask": attention,
                "labels": labels,
            }
        # Encoder-decoder: the labels are the caption and its EOS; T5 shifts them right itself to
        # make the decoder inputs (-100 becomes the pad / decoder start token).
        label_rows = []
        for cap in captions:
            ids = self._caption_ids(cap)
            if len(ids) + 1 > self.max_length:
                ids = ids[: self.max_length]
                self.truncated += 1
            else:
                ids = ids + [self.eos_id]
            label_rows.append(ids)
        width = self._padded_width(max(len(r) for r in label_rows))
        labels = torch.full((len(label_rows), width), -100, dtype=torch.long)
        dec_mask = torch.zeros((len(label_rows), width), dtype=torch.long)
        for i, r in enumerate(label_rows):
            labels[i, : len(r)] = torch.tensor(r)
            dec_mask[i, : len(r)] = 1
        return {
            "pixel_values": enc["pixel_values"],
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
            "decoder_attention_mask": dec_mask,
        }
