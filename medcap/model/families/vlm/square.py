"""Kit members shared by the families whose processor resizes every image to one square (PaliGemma,
Gemma 3, InstructBLIP): no image limit, the processor's side as the decode side and the planned image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class SquareImages:
    default_side: int = 224
    """The side planned with when the processor names none."""

    def check_images(self, processor: Any, images: Sequence[Any]) -> None:
        pass  # any size: resized to the model's square

    def image_side(self, processor: Any) -> int | None:
        from medcap.model.family import processor_image_side

        return processor_image_side(processor)

    def planning_image(self, processor: Any) -> tuple[int, int]:
        side = self.image_side(processor) or self.default_side
        return side, side
