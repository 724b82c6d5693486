"""Concept-guided captioning: a concept model puts each image's modality or concepts into its caption
prompt at predict time, as the ground truth did in training (``data.prompt_with``).

``ConceptGuide.prompts(images, base)`` is what ``Captioner.caption`` (predict, ``medcap caption``) and
the service's caption function call; the words are ``medcap.concepts.prompts.guided_prompt``'s, the
same function training used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcap.concepts.features import ConceptError
from medcap.concepts.model import ConceptPredictor, load_concept_predictor
from medcap.concepts.prompts import guided_prompt


@dataclass
class ConceptGuide:
    """A concept model and what of its answer goes into the prompt."""

    predictor: ConceptPredictor
    how: str
    """``modality`` or ``concepts`` (the caption run's ``data.prompt_with``)."""
    k: int = 5
    """concepts: how many (the most probable) the prompt names."""

    def prompts(self, images: Sequence[Any], base: str) -> list[str]:
        """Each image's prompt: ``base`` with the predicted modality or concept names before it."""
        found = self.predictor.predict(list(images))
        vocab = self.predictor.concepts.vocab
        if self.how == "modality":
            return [guided_prompt(base, modality=f.modality) for f in found]
        return [guided_prompt(base, concepts=[vocab.name(c) for c in f.cuis[: self.k]]) for f in found]

    def caption_fn(self, caption_fn: Callable[..., list[str]]) -> Callable[..., list[str]]:
        """``caption_fn(model, processor, images, gen, prompt)`` with each image's guided prompt."""

        def guided(model: Any, processor: Any, images: Sequence[Any], gen: Any, prompt: str) -> list[str]:
            return caption_fn(model, processor, images, gen, self.prompts(images, prompt))

        return guided


def load_guide(
    concepts: str | Path,
    how: str,
    k: int = 5,
    device: Any = None,
    share: tuple[Any, Any] | None = None,
) -> ConceptGuide:
    """The guide for a caption model trained with ``data.prompt_with`` = ``how``, from the concept
    model in ``concepts`` (a concept run or checkpoint); ``share``: the caption model and processor,
    used as the vision side when its vision weights are the concept model's."""
    if how not in ("modality", "concepts"):
        raise ConceptError(
            f"the caption model was trained with data.prompt_with {how!r}: a concept model has nothing to add "
            "to its prompt; caption without --concepts"
        )
    predictor = load_concept_predictor(concepts, device, share=share)
    if how == "modality" and not predictor.concepts.modality_columns:
        raise ConceptError(
            f"{predictor.concepts.checkpoint}: its vocabulary holds no modality CUI, so it cannot say an image's "
            "modality; train it on data with modality concepts (or a lower concepts.min_freq)"
        )
    return ConceptGuide(predictor, how, k)


def guide_for_run(
    concepts: str | Path | None, run_cfg: Any, share: tuple[Any, Any], device: Any = None
) -> Any:
    """The guide a caption checkpoint needs: None when it was trained without concept prompts and no
    concept model is given; a ConceptError when it was trained with them and none is given."""
    how = run_cfg.data.prompt_with if run_cfg is not None else "none"
    if concepts is None:
        if how != "none":
            raise ConceptError(
                f"this model was trained with data.prompt_with {how}: its prompts need a concept model; pass "
                "--concepts CRUN (a 'medcap concepts train' run)"
            )
        return None
    if run_cfg is None:
        raise ConceptError("--concepts needs a training checkpoint (its data.prompt_with says what to use)")
    return load_guide(concepts, how, run_cfg.data.prompt_concepts, device, share)


__all__ = ["ConceptGuide", "guide_for_run", "load_guide"]
