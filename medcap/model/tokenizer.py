"""The offline tokenizer: a byte-level BPE shipped with medcap (``model/assets/tokenizer``).

Tiny models and random-init builds of the full-size architectures use it, so nothing is downloaded:
any text encodes (byte level), and the special tokens have fixed ids: ``<pad>`` 0, ``<s>`` 1,
``</s>`` 2, ``<unk>`` 3, ``<image>`` 4. Regenerate it with ``python -m medcap.model.tokenizer``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "image": "<image>"}


def train_caption_tokenizer(lines: list[str], vocab_size: int = 2048):
    """Train a byte-level BPE (``tokenizers``) on ``lines``: any text encodes, none is unknown.

    Special tokens come first, in a fixed order: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3,
    ``<image>`` 4.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def write_shipped_tokenizer(vocab_size: int = 2048) -> Path:
    """Regenerate ``assets/tokenizer/tokenizer.json`` from ``corpus.txt`` next to it."""
    lines = (TOKENIZER_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()
    tok = train_caption_tokenizer(lines, vocab_size)
    out = TOKENIZER_DIR / "tokenizer.json"
    tok.save(str(out), pretty=False)
    return out


def offline_tokenizer(style: Literal["bos-first", "eos-last"]):
    """The shipped byte-level BPE tokenizer as a transformers fast tokenizer.

    ``bos-first``: ``<s>`` before the text, as OPT's tokenizer does. ``eos-last``: ``</s>`` after the
    text, as T5's does.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    path = TOKENIZER_DIR / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing (it ships with medcap); regenerate it with `python -m medcap.model.tokenizer`"
        )
    tok = Tokenizer.from_file(str(path))
    ids = {k: tok.token_to_id(v) for k, v in SPECIAL_TOKENS.items()}
    if style == "eos-last":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", ids["eos"])]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["bos"])]
        )
    # "<image>" is already a special token of the vocabulary (id 4); processors register it as their
    # image token (as an AddedToken, which they need) without creating a new id.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=512,
    )


def special_ids(tokenizer) -> dict[str, int]:
    """pad, bos (pad where the tokenizer has none), eos and image token ids."""
    return {
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id,
        "eos": tokenizer.eos_token_id,
        "image": tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
    }


def padded_vocab(tokenizer, multiple: int = 64) -> int:
    """The tokenizer's size rounded up to a multiple of 64 (the embedding size of tiny models)."""
    return int(math.ceil(len(tokenizer) / multiple) * multiple)


if __name__ == "__main__":
    print(write_shipped_tokenizer())
