"""A search space for ``medcap tune``: a YAML file naming a base run config, fixed settings, the
objective, the pruner and the ranges of any dotted settings. No torch here: a space is read and
checked completely before the first trial starts.

    # medcap tune --space demo --study runs/tune-demo
    config: demo                    # the base run config (a shipped name or a YAML path)
    objective: bertscore            # train.select_by of every trial: loss (minimised) or a metric (maximised)
    trials: 12                      # trials the study runs in all (over every worker)
    seed: 0                         # TPE's seed
    overrides:                      # fixed for every trial
      train.max_steps: 120
    pruner: {kind: median, startup_trials: 2, warmup_steps: 20}
    params:
      train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      model.peft.r: {low: 4, high: 64, log: true}         # int setting: an int range
      model.peft.targets: {choices: [lm-qv, lm-attn, lm-all]}
      train.warmup_steps: {low: 0, high: 40, step: 10}

A range's kind follows the setting's type (int or float); ``choices`` make it categorical. Every
setting, value and bound is checked against ``RunConfig`` (an unknown setting gets the closest names),
and a range that holds no value is refused, naming the setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from medcap.config.loader import ConfigError, check_setting
from medcap.config.recipes import RECIPES_DIR

#: Shipped search spaces (package data next to the run configs), found by name.
SPACES_DIR = RECIPES_DIR / "spaces"


@dataclass(frozen=True)
class ParamRange:
    """The values one setting takes in the search."""

    name: str
    """The dotted setting (``train.lr``)."""
    kind: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    """Sample uniformly in log space (learning rates, ranks)."""
    step: float | None = None
    """Grid step of an int or float range (not with log)."""
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value for an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {', '.join(map(str, self.choices))}"
        scale = ", log scale" if self.log else (f", step {self.step:g}" if self.step else "")
        return f"{self.kind} {self.low:g} .. {self.high:g}{scale}"


@dataclass(frozen=True)
class PrunerSettings:
    """How weak trials are stopped from the validation figures they report while training."""

    kind: Literal["median", "halving", "none"] = "median"
    """median: stop a trial whose figure is worse than the median of earlier trials at the same step;
    halving: successive halving (keep the best 1/reduction_factor at each rung); none: never prune."""
    startup_trials: int = 2
    """median: trials that run to the end before any is pruned."""
    warmup_steps: int = 0
    """median: no pruning before this optimizer step; halving: the first rung (min_resource)."""
    reduction_factor: int = 3
    """halving: the fraction of trials promoted at each rung is 1 / this."""

    def make(self) -> Any:
        import optuna

        if self.kind == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_steps
            )
        if self.kind == "halving":
            return optuna.pruners.SuccessiveHalvingPruner(
                min_resource=max(1, self.warmup_steps) if self.warmup_steps else "auto",
                reduction_factor=self.reduction_factor,
            )
        return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class SearchSpace:
    """A whole search: what to train, what to vary, what to optimise."""

    source: Path
    """The YAML file it was read from."""
    config: str
    """The base run config: a shipped config's name or a YAML path (resolved against the space file)."""
    objective: str
    """train.select_by of every trial and what the study optimises: ``loss`` (minimised) or a caption
    metric of the trials' train.select_protocol (maximised)."""
    params: tuple[ParamRange, ...]
    trials: int = 20
    """Trials of the whole study (every worker together)."""
    seed: int = 0
    """Seed of the TPE sampler."""
    startup_trials: int = 5
    """TPE: random trials before it models the results."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Settings fixed for every trial (dotted)."""
    pruner: PrunerSettings = field(default_factory=PrunerSettings)

    @property
    def direction(self) -> str:
        return "minimize" if self.objective == "loss" else "maximize"

    def trial_overrides(self, values: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """The overrides of one trial's run config: the fixed ones, its sampled values, the objective
        as train.select_by, and its run folder."""
        return {**self.overrides, **values, "train.select_by": self.objective, "train.out_dir": str(out_dir)}

    def base_config_path(self) -> str | Path:
        path = Path(self.config)
        if not path.is_absolute() and (self.source.parent / path).is_file():
            return self.source.parent / path
        return self.config


def shipped_spaces() -> dict[str, Path]:
    """``{name: path}`` of every shipped search space."""
    return {p.stem: p for p in sorted(SPACES_DIR.glob("*.yaml"))}


def resolve_space(name_or_path: str | Path) -> Path:
    """A YAML path as given (when it exists), else the shipped space of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_spaces()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if name in shipped and len(path.parts) == 1:
        return shipped[name]
    raise ConfigError(
        f"search space {name_or_path!r} is neither a YAML file nor a shipped space; shipped spaces: "
        f"{', '.join(shipped)}"
    )


_TOP_KEYS = {"config", "objective", "params", "trials", "seed", "startup_trials", "overrides", "pruner"}
_PARAM_KEYS = {"low", "high", "log", "step", "choices"}


def _setting_type(dotted: str) -> Any:
    """The declared type of a dotted RunConfig setting (already known to exist)."""
    from medcap.config.help import dataclass_of
    from medcap.config.run import RunConfig

    node: Any = RunConfig
    tp: Any = None
    for part in dotted.split("."):
        tp = get_type_hints(node)[part]
        node = dataclass_of(tp)
    return tp


def _numeric_kind(tp: Any) -> str | None:
    """``int`` or ``float`` for a setting of that type (``X | None`` too), else None."""
    args = get_args(tp) if get_origin(tp) is not None else (tp,)
    if float in args:
        return "float"
    if int in args:
        return "int"
    return None


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Read and check a search space; every mistake is a ``ConfigError`` naming the file and setting."""
    from medcap.config.run import RunConfig

    path = resolve_space(name_or_path)
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping (config, objective, params, ...)")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; a space has {', '.join(sorted(_TOP_KEYS))}"
        )
    for key in ("config", "objective", "params"):
        if key not in data:
            raise ConfigError(f"{where}: {key} is missing")
    if not isinstance(data["params"], dict) or not data["params"]:
        raise ConfigError(f"{where}: params must map at least one dotted setting to its range")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides must map dotted settings to values")
    for key, value in overrides.items():
        check_setting(RunConfig, key, value, where=f"{where}: overrides ")
    params = tuple(_param(where, name, spec) for name, spec in data["params"].items())
    for p in params:
        if p.name in ("train.out_dir", "train.select_by"):
            raise ConfigError(f"{where}: params {p.name}: set by medcap tune for every trial, not searchable")
    pruner_data = data.get("pruner") or {}
    if not isinstance(pruner_data, dict):
        raise ConfigError(
            f"{where}: pruner must be a mapping (kind, startup_trials, warmup_steps, reduction_factor)"
        )
    bad = sorted(set(pruner_data) - {"kind", "startup_trials", "warmup_steps", "reduction_factor"})
    if bad:
        raise ConfigError(f"{where}: pruner: unknown key(s) {', '.join(bad)}")
    kind = pruner_data.get("kind", "median")
    if kind not in ("median", "halving", "none"):
        raise ConfigError(f"{where}: pruner.kind {kind!r} is not one of median, halving, none")
    pruner = PrunerSettings(**pruner_data)
    for name in ("trials", "startup_trials"):
        value = data.get(name, 1)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
    space = SearchSpace(
        source=path,
        config=str(data["config"]),
        objective=str(data["objective"]),
        params=params,
        trials=int(data.get("trials", 20)),
        seed=int(data.get("seed", 0)),
        startup_trials=int(data.get("startup_trials", 5)),
        overrides=dict(overrides),
        pruner=pruner,
    )
    check_space(space)
    return space


def _param(where: str, name: str, spec: Any) -> ParamRange:
    from medcap.config.run import RunConfig

    here = f"{where}: params {name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{here}: give a range ({{low: .., high: ..}}) or {{choices: [..]}}, got {spec!r}")
    bad = sorted(set(spec) - _PARAM_KEYS)
    if bad:
        raise ConfigError(
            f"{here}: unknown key(s) {', '.join(bad)}; a range has low, high, log, step or choices"
        )
    if "choices" not in spec and ("low" not in spec or "high" not in spec):
        raise ConfigError(f"{here}: a range needs low and high (or choices)")
    if "choices" in spec and (not isinstance(spec["choices"], list) or not spec["choices"]):
        raise ConfigError(f"{here}: the range is empty: choices must list at least one value")
    # The setting must exist (the closest names are suggested); its values are checked below.
    probe = spec["choices"][0] if spec.get("choices") else spec.get("low")
    check_setting(RunConfig, name, probe, where=f"{where}: params ")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) - {"choices"}:
            raise ConfigError(f"{here}: choices cannot be combined with low, high, log or step")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{here}: the range is empty: choices must list at least one value")
        for c in choices:
            if c is not None and not isinstance(c, bool | int | float | str):
                raise ConfigError(f"{here}: choice {c!r} must be a single value (a number, text, true/false)")
            check_setting(RunConfig, name, c, where=f"{where}: params ")
        return ParamRange(name, "categorical", choices=tuple(choices))
    kind = _numeric_kind(_setting_type(name))
    if kind is None:
        raise ConfigError(f"{here}: {name} is not a number setting; list its values as choices")
    low, high = spec["low"], spec["high"]
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, int | float) or not math.isfinite(bound):
            raise ConfigError(f"{here}: low and high must be numbers, got {bound!r}")
        check_setting(RunConfig, name, bound, where=f"{where}: params ")
    if low > high:
        raise ConfigError(f"{here}: the range is empty: low {low} is above high {high}")
    log, step = bool(spec.get("log", False)), spec.get("step")
    if log and low <= 0:
        raise ConfigError(f"{here}: a log range needs low > 0, got {low}")
    if log and step is not None:
        raise ConfigError(f"{here}: step and log cannot be combined")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int | float) or step <= 0):
        raise ConfigError(f"{here}: step must be a positive number, got {step!r}")
    if kind == "int" and (int(low) != low or int(high) != high or (step is not None and int(step) != step)):
        raise ConfigError(f"{here}: {name} is an integer setting: low, high and step must be integers")
    return ParamRange(name, kind, float(low), float(high), log, float(step) if step is not None else None)


def check_space(space: SearchSpace) -> None:
    """Refuse a space whose trials could not run: the base config with the fixed settings and each
    bound or choice alone must load, and the objective must be a metric the trials can select by."""
    from medcap.config.run import load_run_config
    from medcap.train.select import selection_choices

    where = str(space.source)
    base_overrides = {**space.overrides, "train.select_by": "loss"}
    try:
        base = load_run_config(space.base_config_path(), base_overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}: config {space.config} with the overrides: {e}") from None
    choices = selection_choices(base.train.select_protocol)
    if space.objective not in choices:
        raise ConfigError(
            f"{where}: objective {space.objective!r} is not a figure trials can select by under protocol "
            f"{base.train.select_protocol}; choose from {', '.join(choices)}"
        )
    for p in space.params:
        values = list(p.choices) if p.kind == "categorical" else [p.low, p.high]
        for v in values:
            v = int(v) if p.kind == "int" else v
            try:
                load_run_config(space.base_config_path(), {**base_overrides, p.name: v})
            except ConfigError as e:
                raise ConfigError(
                    f"{where}: params {p.name} = {v!r} gives no valid run config: {e}"
                ) from None


__all__ = [
    "SPACES_DIR",
    "ParamRange",
    "PrunerSettings",
    "SearchSpace",
    "check_space",
    "load_space",
    "resolve_space",
    "shipped_spaces",
]
