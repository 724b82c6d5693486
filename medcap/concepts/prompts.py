"""An image's modality or concepts as words in its caption prompt (``data.prompt_with``).

The words go before the run's ``model.prompt``: ``"CT image. "`` (modality) or ``"Concepts: computed
tomography, liver, mass. "`` (concepts, by name where a name table has them). Training takes them from
the ground truth (``truth_prompts``); captioning from a concept model (``medcap.concepts.guide``), so
both sides write them with the same function (``guided_prompt``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medcap.concepts.vocab import clean_cuis

#: Manifest modality -> the word the prompt uses (as captions write it).
MODALITY_WORDS: dict[str, str] = {
    "ct": "CT",
    "xray": "X-ray",
    "mri": "MRI",
    "ultrasound": "ultrasound",
    "angiography": "angiography",
    "pet": "PET",
}


def guided_prompt(base: str, modality: str | None = None, concepts: Sequence[str] = ()) -> str:
    """``base`` with the modality (a manifest modality: ct, xray ...) or concept names before it; an
    unknown modality and no concepts leave ``base`` as it is."""
    parts = []
    if modality in MODALITY_WORDS:
        parts.append(f"{MODALITY_WORDS[modality]} image.")
    if concepts:
        parts.append("Concepts: " + ", ".join(concepts) + ".")
    if base:
        parts.append(base)
    return " ".join(parts)


def concept_words(cuis: Sequence[str], names: Mapping[str, str], k: int) -> list[str]:
    """The first ``k`` valid CUIs, each by its name where ``names`` has it."""
    valid, _, _ = clean_cuis(cuis)
    return [names.get(c, c) for c in valid[:k]]


def truth_prompts(
    rows: Sequence[Any], how: str, base: str, names: Mapping[str, str] | None = None, k: int = 5
) -> list[str] | None:
    """Per-row prompts from the ground truth (manifest ``modality`` and ``cuis``); None for ``none``."""
    if how == "none":
        return None
    if how == "modality":
        return [guided_prompt(base, modality=r.modality) for r in rows]
    names = names or {}
    return [guided_prompt(base, concepts=concept_words(r.cuis, names, k)) for r in rows]


def names_for(data_cfg: Any) -> dict[str, str]:
    """The name table of a data section (``data.concept_names``, else the prepared dataset's
    cui_mapping.csv), or an empty one."""
    from medcap.concepts.vocab import find_name_table, read_name_table

    path: Path | None = data_cfg.concept_names or find_name_table(data_cfg.prepared)
    return read_name_table(path) if path is not None else {}


__all__ = ["MODALITY_WORDS", "concept_words", "guided_prompt", "names_for", "truth_prompts"]


def row_prompts(cfg: Any, rows: Sequence[Any]) -> list[str] | None:
    """Per-row prompts of ``data.prompt_with`` from the ground truth (``cfg``: a RunConfig; ``rows``:
    manifest rows), or None (every row: ``model.prompt``). Training and its validation captions use it."""
    if cfg.data.prompt_with == "none":
        return None
    names = names_for(cfg.data) if cfg.data.prompt_with == "concepts" else {}
    return truth_prompts(rows, cfg.data.prompt_with, cfg.model.prompt, names, cfg.data.prompt_concepts)
