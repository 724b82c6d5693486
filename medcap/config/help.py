"""Help for typed settings: every setting of every section with its docstring and default, and the
closest settings to a mistyped flag.

The help of a field is the docstring written under it (``#:`` comments above it are read too), so
the settings document themselves in one place: ``medcap train --help`` prints them all and an
unknown ``--learning_rate`` is answered with ``--train.lr``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

#: Names other fine-tuning tools use (transformers' TrainingArguments, peft, LLaMA-Factory) for
#: settings medcap spells differently: the leaf of the medcap setting they mean.
ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "lr_scheduler_type": "schedule",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "output_dir": "out_dir",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
    "early_stopping_patience": "patience",
    "lora_r": "r",
    "lora_rank": "r",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target": "targets",
    "init_lora_weights": "init",
    "loraplus_lr_ratio": "loraplus_ratio",
    "target_modules": "targets",
    "model_name_or_path": "name_or_path",
    "model_name": "name_or_path",
    "model": "name_or_path",
    "bf16": "mixed_precision",
    "fp16": "mixed_precision",
    "max_length": "max_caption_tokens",
    "cutoff_len": "max_caption_tokens",
    "warmup": "warmup_steps",
    "beams": "num_beams",
    "dataloader_num_workers": "num_workers",
    "quantization_bit": "quantization",
    "load_in_4bit": "quantization",
    "load_in_8bit": "quantization",
}


@dataclass(frozen=True)
class Setting:
    """One leaf setting of a nested config: its dotted name, type, default and help."""

    name: str
    type: str
    default: Any
    doc: str


def field_docs(cls: type) -> dict[str, str]:
    """The help of each field of a dataclass: the docstring under it, else ``#:`` comments above it."""
    return dict(_field_docs(cls))


@functools.cache
def _field_docs(cls: type) -> tuple[tuple[str, str], ...]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app): settings still work, without help
        return ()
    lines = source.splitlines()
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for k, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        nxt = body[k + 1] if k + 1 < len(body) else None
        if (
            isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
            continue
        comments = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#:"):
            comments.insert(0, lines[i].strip()[2:].strip())
            i -= 1
        if comments:
            docs[node.target.id] = " ".join(" ".join(comments).split())
    return tuple(docs.items())


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def dataclass_of(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        for a in get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def settings(cls: type, prefix: str = "") -> list[Setting]:
    """Every leaf setting of ``cls`` (nested dataclasses walked), in declaration order."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    instance = cls()
    out: list[Setting] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name = f"{prefix}{f.name}"
        inner = dataclass_of(hints[f.name])
        if inner is not None:
            out += settings(inner, name + ".")
            continue
        out.append(Setting(name, type_name(hints[f.name]), getattr(instance, f.name), docs.get(f.name, "")))
    return out


def suggest(key: str, cls: type, n: int = 2) -> list[str]:
    """The dotted settings of ``cls`` closest to a mistyped ``key`` (``learning_rate`` -> ``train.lr``)."""
    names = [s.name for s in settings(cls)]
    key = key.replace("-", "_")
    leaf = key.rsplit(".", 1)[-1]
    by_leaf: dict[str, list[str]] = {}
    for name in names:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    found: list[str] = []
    alias = ALIASES.get(leaf.lower())
    if alias in by_leaf:
        found += by_leaf[alias]
    found += difflib.get_close_matches(key, names, n=n, cutoff=0.6)
    for close_leaf in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.75):
        found += by_leaf[close_leaf]
    unique = list(dict.fromkeys(found))
    return unique[: max(n, len(by_leaf.get(alias, [])))]


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return str(value)


def settings_help(cls: type, width: int = 100) -> str:
    """Every setting grouped by section, with its type, default and help, for ``--help``."""
    rows = settings(cls)
    lines: list[str] = []
    section = None
    for s in rows:
        top = s.name.split(".", 1)[0] if "." in s.name else ""
        if top != section:
            section = top
            lines.append(f"\n{top or 'settings'}:")
        head = f"  --{s.name} {s.type.upper() if ' ' not in s.type else s.type}"
        lines.append(head)
        text = (
            f"{s.doc} (default: {_default_text(s.default)})"
            if s.doc
            else f"(default: {_default_text(s.default)})"
        )
        lines += textwrap.wrap(text, width=width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines).lstrip("\n")


__all__ = [
    "ALIASES",
    "Setting",
    "dataclass_of",
    "field_docs",
    "settings",
    "settings_help",
    "suggest",
    "type_name",
]
