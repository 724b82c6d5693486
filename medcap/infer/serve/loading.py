"""What ``medcap serve`` serves: a checkpoint, or a base model (a merged export, a hub id, ``tiny``)
with an optional adapter, with the prompt and decoding defaults it was trained with."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medcap.config.generate import GenerateConfig
from medcap.config.loader import to_dict
from medcap.infer.generate import medcap_config_near

log = logging.getLogger("medcap.serve")


def load_for_serving(
    model: str | None = None,
    checkpoint: str | Path | None = None,
    adapter: str | Path | None = None,
    device: str | None = None,
    concepts: str | Path | None = None,
) -> tuple[Any, Any, GenerateConfig, str, dict[str, Any]]:
    """Load what ``medcap serve`` serves: ``(model, processor, gen_defaults, prompt, info)``.

    ``concepts``: the concept model of a checkpoint trained with ``data.prompt_with``; its
    ``ConceptGuide`` is ``info["guide"]`` (the caller takes it out before showing info).

    * ``checkpoint``: a training checkpoint or run folder (base + adapter + trained weights);
    * ``model``: a hub id, ``tiny``, or a folder (a merged export), with an optional PEFT
      ``adapter`` folder (an unmerged export) put on it. With only ``adapter``, the base is the one
      its adapter_config.json names; ``base`` (an export's own base folder) is found next to it.

    Loading is ``medcap.infer.generate.load_captioner``; for exports, the prompt and decoding defaults
    come from the ``medcap_config.yaml`` that ``medcap export`` writes.
    """

    from medcap.infer.generate import load_captioner

    if checkpoint is not None:
        cap = load_captioner(checkpoint=checkpoint, device=device, concepts=concepts, verbose=True)
        info = {**cap.info, "config": to_dict(cap.run_cfg), "guide": cap.guide}
        return cap.model, cap.processor, cap.gen, cap.prompt, info
    if concepts is not None:
        raise ValueError("--concepts needs --checkpoint: the checkpoint's data.prompt_with says what to use")
    # load_captioner takes the prompt and decoding defaults from the export's medcap_config.yaml.
    run_cfg, _ = medcap_config_near(adapter, model if model and Path(model).is_dir() else None)
    cap = load_captioner(model=model, adapter=adapter, device=device, verbose=True)
    return cap.model, cap.processor, cap.gen, cap.prompt, {**cap.info, "config": run_cfg or None}
