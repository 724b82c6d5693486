"""A training run's whole configuration (``RunConfig``): what ``medcap train`` reads from YAML and
writes to ``RUN/config.yaml`` and next to every checkpoint, and how it is read back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medcap.config.data import DataConfig
from medcap.config.generate import GenerateConfig
from medcap.config.loader import ConfigError, load_config
from medcap.config.model import ModelConfig
from medcap.config.recipes import resolve_config
from medcap.config.train import TrainConfig


@dataclass
class RunConfig:
    """Everything one training run needs; written to RUN/config.yaml and next to every checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    """Where the prepared manifests are."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which model, precision and PEFT method."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, evaluation, logging and checkpoints."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Decoding settings for the sample captions (and later for medcap predict)."""


#: Settings earlier medcap versions wrote into config.yaml that have a new spelling now, and how an
#: old value becomes the new one; so checkpoints and run folders of those versions still load.
LEGACY_SETTINGS = {
    # train.tensorboard: bool (up to 0.1.0) -> train.report_to: list of places.
    "train.tensorboard": lambda old, data: {
        "train.report_to": ["tensorboard", "csv"] if old in (True, "true", None) else ["csv"]
    },
}


def _migrate(data: dict) -> dict:
    """Rewrite settings of earlier versions (``LEGACY_SETTINGS``) in a YAML mapping, in place."""
    for dotted, convert in LEGACY_SETTINGS.items():
        section, key = dotted.split(".", 1)
        if isinstance(data.get(section), dict) and key in data[section]:
            old = data[section].pop(key)
            for new_dotted, value in convert(old, data).items():
                new_section, new_key = new_dotted.split(".", 1)
                data[new_section].setdefault(new_key, value)
    return data


def load_run_config(path: str | Path | None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Read a run config from YAML and apply dotted command-line overrides.

    ``path`` is a YAML file or the name of a shipped recipe (``medcap configs`` lists them:
    ``demo``, ``blip2-opt-6.7b-lora-v100`` ...), so a wheel install runs them without a clone.
    Settings of earlier medcap versions are read in their new spelling (``LEGACY_SETTINGS``).
    """
    return load_config(
        RunConfig, resolve_config(path) if path is not None else None, overrides, migrate=_migrate
    )


def read_run_config(folder: str | Path) -> RunConfig:
    """The typed ``RunConfig`` saved in a run or checkpoint folder (its ``config.yaml``)."""
    from medcap.layout import config_file

    path = config_file(folder)
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a medcap run or checkpoint: no {path.name} there")
    try:
        return load_config(RunConfig, path, migrate=_migrate)
    except ConfigError as e:
        raise ConfigError(f"{e} (written by another medcap version? edit the file or retrain)") from None


__all__ = ["RunConfig", "load_run_config", "read_run_config"]
