"""The concept vocabulary: which CUIs a model predicts, built from the training split, saved with it.

``build_vocab(rows, min_freq)`` counts, per CUI, the training images that have it, and keeps those
seen in at least ``min_freq`` images, most frequent first (so an index is also a rank, which the
prompts use). Training data is never refused for a bad CUI: ``CuiAudit`` counts what was left out
and why (malformed: not ``C`` + 7 digits after stripping and upper-casing; duplicated within a row;
out of the vocabulary), with examples, and the totals reconcile (``cuis_in = kept + malformed +
duplicated + out_of_vocab``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcap.eval.concepts import CUI_PATTERN

VOCAB_VERSION = 1

#: Examples kept per kind of bad CUI.
AUDIT_EXAMPLES = 5


@dataclass
class CuiAudit:
    """What happened to the CUIs of one split on the way into the model's targets."""

    images: int = 0
    cuis_in: int = 0
    """CUI entries read (after splitting on ';' and dropping empty ones)."""
    kept: int = 0
    malformed: int = 0
    duplicated: int = 0
    out_of_vocab: int = 0
    images_without_concepts: int = 0
    """Images with no CUI in the vocabulary (their target is all zeros)."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Up to ``AUDIT_EXAMPLES`` of each kind, as ``ID: value``."""

    def _example(self, kind: str, image_id: str, value: str) -> None:
        seen = self.examples.setdefault(kind, [])
        if len(seen) < AUDIT_EXAMPLES:
            seen.append(f"{image_id}: {value!r}")

    def reconciles(self) -> bool:
        return self.cuis_in == self.kept + self.malformed + self.duplicated + self.out_of_vocab

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "cuis_in": self.cuis_in,
            "kept": self.kept,
            "malformed": self.malformed,
            "duplicated": self.duplicated,
            "out_of_vocab": self.out_of_vocab,
            "images_without_concepts": self.images_without_concepts,
            "examples": self.examples,
        }

    def describe(self, split: str) -> str:
        """One line for the log: what went in and what was left out."""
        parts = [f"{split}: {self.cuis_in} CUIs in {self.images} images, {self.kept} used"]
        for kind in ("malformed", "duplicated", "out_of_vocab"):
            n = getattr(self, kind)
            if n:
                ex = f" (e.g. {self.examples[kind][0]})" if self.examples.get(kind) else ""
                parts.append(f"{n} {kind.replace('_', ' ')}{ex}")
        if self.images_without_concepts:
            parts.append(f"{self.images_without_concepts} images with no CUI of the vocabulary")
        return "; ".join(parts)


def clean_cuis(cuis: Iterable[str]) -> tuple[list[str], list[str], int]:
    """``(valid CUIs in order, malformed entries, duplicates)`` of one image's CUI list: entries
    stripped and upper-cased; empty entries dropped; a CUI repeated in the row counted once."""
    valid: list[str] = []
    malformed: list[str] = []
    seen: set[str] = set()
    dups = 0
    for raw in cuis:
        c = raw.strip().upper()
        if not c:
            continue
        if not CUI_PATTERN.fullmatch(c):
            malformed.append(raw)
        elif c in seen:
            dups += 1
        else:
            seen.add(c)
            valid.append(c)
    return valid, malformed, dups


@dataclass
class ConceptVocab:
    """The CUIs a concept model predicts (most frequent first), with their training counts and names."""

    cuis: list[str]
    counts: list[int]
    """Training images that have each CUI."""
    train_images: int
    min_freq: int
    names: dict[str, str] = field(default_factory=dict)
    """CUI -> canonical name, for the CUIs of the vocabulary that the name table has."""

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.cuis)}

    def __len__(self) -> int:
        return len(self.cuis)

    def name(self, cui: str) -> str:
        """The concept's name where known, else the CUI itself."""
        return self.names.get(cui, cui)

    def targets(self, rows: Sequence[Any]) -> tuple[np.ndarray, CuiAudit]:
        """Multi-hot targets ``[images, len(vocab)]`` (uint8) of manifest rows, and their audit."""
        audit = CuiAudit(images=len(rows))
        y = np.zeros((len(rows), len(self.cuis)), dtype=np.uint8)
        for i, row in enumerate(rows):
            entries = [c for c in row.cuis if c.strip()]
            audit.cuis_in += len(entries)
            valid, malformed, dups = clean_cuis(entries)
            audit.malformed += len(malformed)
            for m in malformed:
                audit._example("malformed", row.id, m)
            audit.duplicated += dups
            if dups:
                audit._example("duplicated", row.id, ";".join(entries))
            hits = 0
            for c in valid:
                k = self.index.get(c)
                if k is None:
                    audit.out_of_vocab += 1
                    audit._example("out_of_vocab", row.id, c)
                else:
                    y[i, k] = 1
                    hits += 1
            audit.kept += hits
            audit.images_without_concepts += hits == 0
        return y, audit

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VOCAB_VERSION,
            "min_freq": self.min_freq,
            "train_images": self.train_images,
            "cuis": self.cuis,
            "counts": self.counts,
            "names": self.names,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=0), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ConceptVocab:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a concept vocabulary ({e})") from None
        if data.get("version") != VOCAB_VERSION or len(data.get("cuis", [])) != len(data.get("counts", [])):
            raise ValueError(f"{path}: vocabulary format {data.get('version')} is not {VOCAB_VERSION}")
        return cls(
            data["cuis"], data["counts"], data["train_images"], data["min_freq"], data.get("names", {})
        )


def build_vocab(
    rows: Sequence[Any], min_freq: int, names: dict[str, str] | None = None
) -> tuple[ConceptVocab, CuiAudit]:
    """The vocabulary of the training rows (CUIs in at least ``min_freq`` images, most frequent
    first, ties by CUI) and the audit of building it (out_of_vocab: entries of CUIs too rare)."""
    counts: Counter[str] = Counter()
    for row in rows:
        valid, _, _ = clean_cuis(row.cuis)
        counts.update(valid)
    kept = sorted((c for c, n in counts.items() if n >= min_freq), key=lambda c: (-counts[c], c))
    names = names or {}
    vocab = ConceptVocab(
        kept, [counts[c] for c in kept], len(rows), min_freq, {c: names[c] for c in kept if c in names}
    )
    _, audit = vocab.targets(rows)
    return vocab, audit


def read_name_table(path: str | Path) -> dict[str, str]:
    """``{CUI: canonical name}`` of a ``CUI,Canonical name`` table (ROCOv2's cui_mapping.csv)."""
    from medcap.data.tables import read_csv_dicts

    header, rows = read_csv_dicts(Path(path))
    if len(header) < 2:
        raise ValueError(f"{path}: expected a header 'CUI,Canonical name', found {header}")
    cui_col, name_col = header[0], header[1]
    return {r[cui_col].strip().upper(): " ".join(r[name_col].split()) for _, r in rows if r[cui_col].strip()}


def find_name_table(prepared: str | Path) -> Path | None:
    """The ``cui_mapping.csv`` of the dataset a prepared folder was made from (``prepare.json`` names
    its root), or None."""
    summary = Path(prepared) / "prepare.json"
    if not summary.is_file():
        return None
    try:
        root = json.loads(summary.read_text(encoding="utf-8")).get("root")
    except ValueError:
        return None
    cand = Path(root) / "cui_mapping.csv" if root else None
    return cand if cand is not None and cand.is_file() else None


__all__ = [
    "ConceptVocab",
    "CuiAudit",
    "build_vocab",
    "clean_cuis",
    "find_name_table",
    "read_name_table",
]
