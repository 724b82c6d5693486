"""Captioning: batched generation with a base model and an optional adapter."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerateConfig:
    """Decoding settings (greedy by default; beam or nucleus when asked)."""

    num_beams: int = 1
    do_sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    min_new_tokens: int = 0
    max_new_tokens: int = 40
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 8
