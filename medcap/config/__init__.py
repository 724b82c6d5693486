"""Typed settings: nested dataclasses with a docstring per field, loaded from YAML with dotted
command-line overrides and checked when loaded. Imports no torch.

* ``loader``: the machinery (``load_config``, ``from_dict``, ``to_dict``, ``save_config``,
  ``diff_configs``, ``ConfigError``);
* ``data``, ``model``, ``train``, ``generate``: the sections of a run; ``run``: ``RunConfig`` and how
  it is read from YAML or from a run folder;
* ``recipes``: the shipped run configs (package data), found by name;
* ``help``: every setting with its help, and the closest setting to a mistyped flag.
"""

from __future__ import annotations

from medcap.config.data import DataConfig
from medcap.config.generate import GenerateConfig
from medcap.config.loader import (
    ConfigError,
    diff_configs,
    from_dict,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from medcap.config.model import ModelConfig, PeftSettings
from medcap.config.run import RunConfig, load_run_config, read_run_config
from medcap.config.train import TrainConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "GenerateConfig",
    "ModelConfig",
    "PeftSettings",
    "RunConfig",
    "TrainConfig",
    "diff_configs",
    "from_dict",
    "load_config",
    "load_run_config",
    "parse_overrides",
    "read_run_config",
    "save_config",
    "to_dict",
]
