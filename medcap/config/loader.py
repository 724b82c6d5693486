"""The machinery of typed configuration: nested dataclasses loaded from YAML, overridden from the
command line. The settings themselves live next to this file (``medcap.config.data``, ``.model``,
``.train``, ``.generate``, ``.run``); this module knows nothing about them:

* ``load_config(cls, path, overrides)`` reads a YAML file into ``cls`` and applies dotted
  overrides such as ``["--train.lr", "1e-4", "--model.peft.r=8"]``;
* values are converted to the field's declared type (``int``, ``float``, ``bool``, ``str``,
  ``Literal[...]``, ``X | None``, ``list[...]``, ``tuple[...]``, ``Path``, nested dataclasses);
* unknown keys and bad values raise ``ConfigError`` naming the file, the dotted key and what is
  allowed, so a typo in a YAML never silently falls back to a default;
* ``to_dict`` / ``save_config`` write the resolved config next to every checkpoint.

The docstring under each field is its help (``medcap.config.help``). Errors say where a value came
from: the YAML file, or the command line with the flag as it was typed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from medcap.config.help import dataclass_of, suggest, type_name

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says where and what to do."""


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the declared type ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        for a in allowed:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            # Command line: "a,b,c" or a YAML flow list "[a, b]".
            parsed = (
                yaml.safe_load(value)
                if value.strip().startswith("[")
                else [v.strip() for v in value.split(",") if v.strip()]
            )
            value = parsed
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(
                _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=False)


def _from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{dotted}: unknown setting{hint}; {cls.__name__} has: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build ``cls`` from a plain mapping, checking keys and converting types."""
    return _from_dict(cls, data or {})


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """``["--train.lr", "1e-4", "--model.peft.r=8"]`` -> ``{"train.lr": "1e-4", "model.peft.r": "8"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value = argv[i + 1]
            i += 2
        out[key.replace("-", "_")] = value
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | dict | None = None,
    migrate: Callable[[dict], dict] | None = None,
) -> T:
    """Read ``path`` (YAML) into ``cls`` and apply command-line ``overrides``.

    Overrides are dotted keys relative to ``cls`` (``train.lr``). An error in the file names the file
    and key; an error in an override names the command line and the flag (an unknown flag with the
    closest settings of any section), so a typo on the command line is never blamed on the YAML.
    ``migrate`` rewrites the file's mapping first (settings an earlier version wrote differently).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
        if migrate is not None:
            data = migrate(data)
        source = str(path)
        # The file alone first: its own mistakes are reported against it.
        try:
            _from_dict(cls, copy.deepcopy(data))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _check_override(cls, key, value)
        # Command-line strings are converted by the field type later; keep them as strings.
        _set_dotted(data, key, value)
    try:
        return _from_dict(cls, data)
    except ConfigError as e:
        where = f"{source} with the command-line overrides" if overrides else source
        raise ConfigError(f"{where}: {e}") from None


def _check_override(cls: type, key: str, value: Any) -> None:
    """Raise a ``ConfigError`` naming the command line when ``--key value`` cannot be a setting of ``cls``."""
    node: Any = cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = (
            {f.name: f for f in dataclasses.fields(node) if f.init} if dataclasses.is_dataclass(node) else {}
        )
        if part not in fields:
            close = suggest(key, cls)
            hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(
                f"command line --{key}: unknown setting{hint} (medcap train --help lists every setting)"
            )
        tp = _hints(node)[part]
        if i == len(parts) - 1:
            try:
                _coerce(value, tp, key)
            except ConfigError as e:
                raise ConfigError(f"command line --{key} {value}: {str(e).split(': ', 1)[-1]}") from None
            return
        node = dataclass_of(tp)
        if node is None:
            raise ConfigError(f"command line --{key}: {'.'.join(parts[: i + 1])} is a value, not a section")


def to_dict(cfg: Any) -> Any:
    """A plain, YAML-safe view of a config (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def diff_configs(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two configs (dataclasses or dicts)."""
    da, db = to_dict(a), to_dict(b)
    out: list[str] = []
    if isinstance(da, dict) and isinstance(db, dict):
        for key in sorted(set(da) | set(db)):
            name = f"{prefix}.{key}" if prefix else key
            if key not in da or key not in db:
                out.append(f"{name}: {da.get(key, '<absent>')!r} -> {db.get(key, '<absent>')!r}")
            else:
                out.extend(diff_configs(da[key], db[key], name))
    elif da != db:
        out.append(f"{prefix}: {da!r} -> {db!r}")
    return out


__all__ = [
    "ConfigError",
    "diff_configs",
    "from_dict",
    "load_config",
    "parse_overrides",
    "save_config",
    "to_dict",
]
