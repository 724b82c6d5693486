"""ImageCLEFmedical concept-detection submissions: write them right, and check any such file as the
2025 evaluator reads it (``medcap check-submission --task concepts``).

The format::

    ID,CUIs
    ImageCLEFmedical_Caption_2025_test_0,C0040405;C0817096
    ImageCLEFmedical_Caption_2025_test_1

one row per test image, CUIs joined by ``;``, a row with only the ID for an image without concepts.

Errors are what the evaluator refuses (``medcap.eval.concepts`` lists its rules), each naming the row
(physical line, the header is row 1): a blank line (the evaluator stops on it), more than two fields,
an ID that is not in the references or is given twice, more than 100 concepts, the same concept twice
in a row, an ID that contains ``ID`` anywhere but the header row (skipped by the evaluator as a
header), a byte-order mark in front of an ID, bytes that are not UTF-8, and any reference ID missing.
Warnings are what it accepts but scores as wrong: a CUI that is not ``C`` + 7 digits, an empty
concept (``ID,`` or ``C1;;C2``: the evaluator reads it as a concept named ""); ``strict`` makes them
errors.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medcap.data.tables import CsvError
from medcap.eval.concepts import (
    CUI_PATTERN,
    MAX_CONCEPTS,
    concept_rows,
    is_header,
    read_concept_references,
    split_concepts,
)
from medcap.eval.evaluate import EvaluationError
from medcap.eval.submission import _ZIP_STARTS, MAX_MESSAGES_PER_KIND, MAX_SUBMISSION_BYTES, _csv_from_zip

HEADER = ("ID", "CUIs")


@dataclass
class ConceptSubmissionCheck:
    """What ``inspect_concept_submission`` found: errors make the file invalid, warnings do not."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rows: int = 0
    """Data rows read (rows the evaluator does not take for a header)."""
    predictions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """``{ID: concepts}`` as the evaluator reads them (complete only when there are no errors)."""

    @property
    def ok(self) -> bool:
        return not self.errors


class _Messages:
    """Caps messages per kind so one systematic mistake does not print 10,000 lines."""

    def __init__(self, out: list[str]) -> None:
        self.out = out
        self.counts: dict[str, int] = {}

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= MAX_MESSAGES_PER_KIND:
            self.out.append(message)

    def close(self) -> None:
        for kind, n in self.counts.items():
            if n > MAX_MESSAGES_PER_KIND:
                self.out.append(
                    f"... and {n - MAX_MESSAGES_PER_KIND} more rows with the same problem ({kind})"
                )


def _reference_ids(references: str | Path | Sequence[str]) -> list[str]:
    if isinstance(references, str | Path):
        return list(read_concept_references(references))
    return [str(r) for r in references]


def inspect_concept_submission(
    path: str | Path,
    references: str | Path | Sequence[str] | None = None,
    *,
    strict: bool = False,
) -> ConceptSubmissionCheck:
    """Check a concept-detection submission (CSV, or a zip holding ``submission.csv``) as the 2025
    evaluator reads it. ``references`` (a concepts CSV, a prepared manifest, or the IDs) enables
    the unknown-ID and missing-ID checks. ``strict`` turns malformed and empty CUIs into errors."""
    path = Path(path)
    result = ConceptSubmissionCheck()
    if not path.is_file():
        result.errors.append(f"{path}: file not found")
        return result
    if path.stat().st_size > MAX_SUBMISSION_BYTES:
        result.errors.append(
            f"{path}: the file is {path.stat().st_size:,} bytes; a submission is at most {MAX_SUBMISSION_BYTES:,}"
        )
        return result
    raw = path.read_bytes()
    if raw.startswith(_ZIP_STARTS):
        raw_or_error = _csv_from_zip(path)
        if isinstance(raw_or_error, str):
            result.errors.append(raw_or_error)
            return result
        raw = raw_or_error
    refs: set[str] | None = None
    ref_list: list[str] = []
    if references is not None:
        try:
            ref_list = _reference_ids(references)
        except (EvaluationError, CsvError) as e:
            result.errors.append(f"references: {e}")
            return result
        refs = set(ref_list)
    _check(raw, refs, ref_list, strict, result)
    return result


def _check(
    raw: bytes, refs: set[str] | None, ref_list: list[str], strict: bool, result: ConceptSubmissionCheck
) -> None:
    errors, warnings = _Messages(result.errors), _Messages(result.warnings)
    if not raw.strip():
        result.errors.append("row 1: the file is empty; expected one row per image ('ID,CUI1;CUI2')")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        result.errors.append(
            f"row {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); the evaluator cannot read the "
            "file: save it as UTF-8"
        )
        return
    try:
        records = concept_rows(text, "submission")
    except CsvError as e:
        result.errors.append(f"row {e.line}: {e.reason}")
        return
    data_rows = 0
    for line, fields in records:
        if not fields:
            errors.add(
                "blank", f"row {line}: blank line; the evaluator stops there (it reads row[0]): remove it"
            )
            continue
        if is_header(fields):
            if data_rows or line > 1:
                warnings.add(
                    "header-like",
                    f"row {line}: {fields[0]!r} contains 'ID', so the evaluator skips the row as a header "
                    "(an image named so gets no prediction)",
                )
            continue
        data_rows += 1
        result.rows += 1
        image_id = fields[0]
        if not 1 <= len(fields) <= 2:
            errors.add(
                "columns",
                f"row {line}: {len(fields)} fields; a row is '<image ID>,<CUI>;<CUI>;...' (CUIs joined by "
                "';', not ',')",
            )
            continue
        if image_id.startswith("\ufeff"):
            errors.add(
                "bom",
                f"row {line}: a byte-order mark (BOM) precedes the ID, so the evaluator reads it as "
                f"{image_id!r}: save the file as UTF-8 without BOM",
            )
            continue
        if refs is not None and image_id not in refs:
            hint = (
                f" (with surrounding spaces: the evaluator does not strip IDs; {image_id.strip()!r} is one)"
                if image_id.strip() in refs
                else ""
            )
            errors.add("unknown", f"row {line}: ID {image_id!r} is not in the references{hint}")
            continue
        if image_id in result.predictions:
            errors.add("duplicate", f"row {line}: ID {image_id} is given more than once")
            continue
        concepts = split_concepts(fields)
        if len(concepts) > MAX_CONCEPTS:
            errors.add(
                "too-many",
                f"row {line}: {len(concepts)} concepts for {image_id}; the evaluator takes at most {MAX_CONCEPTS}",
            )
            continue
        if len(set(concepts)) != len(concepts):
            repeated = sorted({c for c in concepts if concepts.count(c) > 1})
            errors.add(
                "repeated",
                f"row {line}: the same concept more than once for {image_id}: {', '.join(map(repr, repeated))}",
            )
            continue
        result.predictions[image_id] = concepts
        empty = "" in concepts
        malformed = [c for c in concepts if c and not CUI_PATTERN.fullmatch(c.upper())]
        add = errors.add if strict else warnings.add
        if empty:
            add(
                "empty-concept",
                f"row {line}: an empty concept ('{image_id},' or ';;'): the evaluator reads it as a concept "
                "named '' and counts it as a wrong one; for no concepts write the ID alone",
            )
        if malformed:
            add(
                "malformed",
                f"row {line}: {', '.join(map(repr, malformed[:3]))} is not a CUI (C + 7 digits); scored as "
                "a wrong concept",
            )
    if refs is not None:
        missing = [i for i in ref_list if i not in result.predictions]
        if missing:
            result.errors.append(
                f"{len(missing)} of {len(refs)} reference IDs are missing from the submission, e.g. "
                f"{', '.join(missing[:5])}; the evaluator needs every test image exactly once"
            )
    if data_rows == 0 and not result.errors:
        result.errors.append("the file has no data rows")
    errors.close()
    warnings.close()


def write_concept_submission(
    path: str | Path,
    ids: Sequence[str],
    concepts: Sequence[Sequence[str]],
    *,
    reference_ids: Sequence[str] | None = None,
) -> Path:
    """Write ``ID,CUIs`` rows (header ``ID,CUIs``, an image without concepts as its ID alone).

    CUIs are stripped, upper-cased and de-duplicated in order, at most ``MAX_CONCEPTS`` per image.
    With ``reference_ids`` the rows follow that order and must be exactly those IDs. Raises
    ``ValueError`` naming the ID otherwise; the file is written atomically.
    """
    ids = [str(i) for i in ids]
    if len(ids) != len(concepts):
        raise ValueError(f"write_concept_submission: {len(ids)} IDs but {len(concepts)} concept lists")
    by_id: dict[str, list[str]] = {}
    for pos, (image_id, cuis) in enumerate(zip(ids, concepts, strict=True)):
        if (
            not image_id
            or image_id != image_id.strip()
            or any(c in image_id for c in ',";\n\r')
            or "ID" in image_id
        ):
            raise ValueError(
                f"write_concept_submission: ID {image_id!r} (position {pos + 1}) is empty, holds a separator, "
                "quote, surrounding space or the letters 'ID' (the evaluator skips such rows as headers)"
            )
        if image_id in by_id:
            raise ValueError(f"write_concept_submission: ID {image_id} is given twice")
        clean = list(dict.fromkeys(c.strip().upper() for c in cuis if c.strip()))
        if any(";" in c or "," in c for c in clean):
            raise ValueError(f"write_concept_submission: a CUI of {image_id} holds ';' or ','")
        by_id[image_id] = clean[:MAX_CONCEPTS]
    order = ids
    if reference_ids is not None:
        refs = [str(r) for r in reference_ids]
        missing = [r for r in refs if r not in by_id]
        extra = [i for i in ids if i not in set(refs)]
        if missing or extra:
            raise ValueError(
                f"write_concept_submission: IDs differ from the references ({len(missing)} missing, e.g. "
                f"{missing[:3]}; {len(extra)} unknown, e.g. {extra[:3]})"
            )
        order = refs
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER)
        for image_id in order:
            w.writerow([image_id, ";".join(by_id[image_id])] if by_id[image_id] else [image_id])
    tmp.replace(path)
    return path


__all__ = [
    "HEADER",
    "ConceptSubmissionCheck",
    "inspect_concept_submission",
    "write_concept_submission",
]
