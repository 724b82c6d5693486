"""What ``medcap serve`` serves: a checkpoint, or a base model (a merged export, a hub id, ``tiny``)
with an optional adapter, with the prompt and decoding defaults it was trained with."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from medcap.config.generate import GenerateConfig
from medcap.config.loader import to_dict

log = logging.getLogger("medcap.serve")


def _medcap_config_near(*folders: str | Path | None) -> tuple[dict[str, Any], Path | None]:
    """The run config an export carries (``medcap_config.yaml``, written by ``medcap export``).

    Read as plain data on purpose: an export may come from another medcap version, and serving it
    needs only its prompt and decoding settings (unknown settings are dropped with a warning).
    """
    import yaml

    for folder in folders:
        path = Path(folder) / "medcap_config.yaml" if folder is not None else None
        if path is not None and path.is_file():
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if isinstance(data, dict):
                return data, path
    return {}, None


def _generate_defaults(run_cfg: dict[str, Any], where: str) -> GenerateConfig:
    from medcap.config.loader import ConfigError, from_dict

    section = dict(run_cfg.get("generate") or {})
    known = {f.name for f in dataclasses.fields(GenerateConfig)}
    dropped = sorted(set(section) - known)
    if dropped:
        log.warning(
            "%s: generate settings this version does not know, ignored: %s", where, ", ".join(dropped)
        )
    try:
        return from_dict(GenerateConfig, {k: v for k, v in section.items() if k in known})
    except ConfigError as e:
        raise ValueError(f"{where}: generate: {e}") from None


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
    run_cfg, cfg_path = _medcap_config_near(adapter, model if model and Path(model).is_dir() else None)
    prompt = (run_cfg.get("model") or {}).get("prompt", "") or ""
    cap = load_captioner(model=model, adapter=adapter, device=device, prompt=prompt, verbose=True)
    gen = _generate_defaults(run_cfg, str(cfg_path)) if cfg_path else cap.gen
    return cap.model, cap.processor, gen, prompt, {**cap.info, "config": run_cfg or None}
