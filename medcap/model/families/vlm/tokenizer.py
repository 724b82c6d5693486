"""Offline tokenizers for the image-text-to-text families: the shipped byte-level BPE
(``medcap.model.tokenizer``) plus the family's own special tokens, as the real tokenizer names them.

Tiny and random-init models of these families are built without the hub, so their tokenizer must
carry what the family's transformers processor looks for: Qwen's ``<|image_pad|>`` and
``<|vision_start|>``, Gemma 3's ``boi_token`` / ``image_token`` attributes, Idefics3's
``<row_1_col_1>`` ... The base vocabulary is the shipped one (captions encode as they would for any
family); the family tokens are added after it as special tokens, so ``split_special_tokens`` keeps
a caption that happens to contain one of them plain text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from medcap.model.tokenizer import SPECIAL_TOKENS, TOKENIZER_DIR


def family_tokenizer(
    *,
    eos: str,
    bos: str | None = SPECIAL_TOKENS["bos"],
    pad: str = SPECIAL_TOKENS["pad"],
    add: Literal["none", "bos-first", "eos-last"] = "none",
    named: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
):
    """The shipped BPE with a family's special tokens, as a transformers fast tokenizer.

    ``eos`` / ``bos`` / ``pad``: the family's token strings for them (added when new). ``add``: what
    the tokenizer puts around a text by itself (``bos-first``: BOS before it, as Llama's and Gemma's
    tokenizers do; ``eos-last``: EOS after it, as T5's does; ``none``: nothing, as Qwen's). ``named``:
    special tokens the processors read as attributes (``image_token``, ``boi_token`` ...: the
    tokenizer gets ``image_token`` and ``image_token_id``). ``extra``: further special tokens.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    path = TOKENIZER_DIR / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing (it ships with medcap); regenerate it with `python -m medcap.model.tokenizer`"
        )
    tok = Tokenizer.from_file(str(path))
    # New special tokens first (so the post-processor below can name their ids).
    wanted = [t for t in (eos, bos, pad, *(named or {}).values(), *extra) if t is not None]
    tok.add_special_tokens([t for t in dict.fromkeys(wanted) if tok.token_to_id(t) is None])
    if add == "bos-first" and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    elif add == "eos-last":
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.token_to_id(eos))]
        )
    else:
        tok.post_processor = None
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=SPECIAL_TOKENS["unk"],
        extra_special_tokens=dict(named or {}),
        model_max_length=1 << 20,
    )


__all__ = ["family_tokenizer"]
