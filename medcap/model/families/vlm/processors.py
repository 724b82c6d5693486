"""Processors of families that also take video (Qwen-VL, SmolVLM), on machines without torchvision.

transformers builds every video processor on torchvision, and a processor class that has a
``video_processor`` refuses to be built without one: on a torchvision-less install (the CPU boxes
medcap runs its tests on; installing torchvision would replace the CPU torch) neither
``Qwen2_5_VLProcessor(...)`` nor ``AutoProcessor.from_pretrained`` works, although captioning never
touches video. ``image_only_processor`` builds the family's own processor class without its video
part: a subclass that only drops ``video_processor`` from the constructor and keeps the class name,
so what it saves (``processor_config.json``) names the real class and loads with plain
transformers where torchvision is installed.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def _without_video(cls: type) -> type:
    if "video_processor" not in cls.get_attributes():
        return cls

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: N807
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(
        cls.__name__,
        (cls,),
        {
            "__init__": __init__,
            "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} without its video processor (none can be built without torchvision).",
        },
    )


def image_only_processor(
    cls: type, image_processor: Any, tokenizer: Any, chat_template: str | None, **kwargs: Any
) -> Any:
    """An instance of processor class ``cls`` from an image processor and a tokenizer, without the
    video processor it would otherwise require (see the module docstring)."""
    return _without_video(cls)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
    )


def _torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def load_pretrained_processor(cls: type, name_or_path: str) -> Any:
    """The processor of a hub id or local folder: ``AutoProcessor`` where it can be built; without
    torchvision, the same processor class from the folder's image processor, tokenizer, chat
    template and processor settings, minus the video part."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if _torchvision_available() or "video_processor" not in cls.get_attributes():
        return AutoProcessor.from_pretrained(name_or_path)
    log.info("no torchvision: loading %s without its video processor", name_or_path)
    image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    folder = Path(name_or_path)
    settings: dict[str, Any] = {}
    template = getattr(tokenizer, "chat_template", None)
    if folder.is_dir():
        config = folder / "processor_config.json"
        if config.is_file():
            settings = json.loads(config.read_text(encoding="utf-8"))
        for candidate in ("chat_template.jinja", "chat_template.json"):
            path = folder / candidate
            if path.is_file():
                text = path.read_text(encoding="utf-8")
                template = json.loads(text)["chat_template"] if candidate.endswith(".json") else text
                break
    else:
        from huggingface_hub import hf_hub_download

        for candidate in ("chat_template.jinja", "chat_template.json"):
            try:
                text = Path(hf_hub_download(name_or_path, candidate)).read_text(encoding="utf-8")
            except Exception:  # noqa: BLE001 - absent files raise several kinds
                continue
            template = json.loads(text)["chat_template"] if candidate.endswith(".json") else text
            break
    accepted = set(cls.__init__.__code__.co_varnames) - {
        "self",
        "image_processor",
        "tokenizer",
        "video_processor",
    }
    kwargs = {k: v for k, v in settings.items() if k in accepted and k != "chat_template"}
    return image_only_processor(cls, image_processor, tokenizer, template, **kwargs)


__all__ = ["image_only_processor", "load_pretrained_processor"]
