"""ImageCLEFmedical caption submission files: write them right, and check any such file.

The format (ImageCLEFmedical 2023-2026 caption prediction)::

    ID,Caption
    ImageCLEFmedical_Caption_2025_test_0,"Axial CT of the chest, showing a mass."

comma separated, the caption quoted only where needed (a comma or a double quote in it), UTF-8
without a byte-order mark, no blank lines, one line per image (no line breaks inside a caption),
no leading or trailing spaces around an ID (around a caption they are a warning: the scorer strips
them, and 471 of the 9,927 ROCOv2 test references have them), each test ID exactly once and, as the newer checkers want,
in the ground-truth order. The file is submitted zipped, as ``submission.csv`` inside the archive.

``write_submission`` writes such a file from IDs and captions; ``check_submission`` validates any
file the way the official checker does (and a little more), giving the row number of each problem.
Rows are physical line numbers, counting the header as row 1, as an editor shows them.
"""

from __future__ import annotations

import csv
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medcap.data.tables import MAX_FIELD_CHARS, CsvError, decode_csv_bytes, iter_csv_records

HEADER = ("ID", "Caption")

#: Largest submission read, as a file or inside its zip (checked from the zip's directory before
#: anything is inflated). A real one is about 2 MB (10,000 captions); a 1 MB zip can hold 1 GiB.
MAX_SUBMISSION_BYTES = 64 * 1024 * 1024

#: First bytes of a zip archive (a local file header, or the end record of an empty archive).
_ZIP_STARTS = (b"PK\x03\x04", b"PK\x05\x06")

#: Every character Python's ``str.splitlines`` breaks on; none may appear inside a caption.
_LINE_BREAKS = re.compile("[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")

#: At most this many messages per kind of problem; the rest are counted in one line.
MAX_MESSAGES_PER_KIND = 20


def clean_caption(text: str) -> str:
    """A caption as it may appear in a submission: line breaks become spaces, ends stripped."""
    return _LINE_BREAKS.sub(" ", str(text)).strip()


def write_submission(
    path: str | Path,
    ids: Sequence[str],
    captions: Sequence[str],
    *,
    reference_ids: Sequence[str] | None = None,
) -> Path:
    """Write ``ID,Caption`` rows to ``path`` in the ImageCLEFmedical format; returns ``path``.

    Captions are cleaned (line breaks -> spaces, ends stripped) and quoted only where needed. With
    ``reference_ids`` (the ground-truth order) the rows follow that order and the IDs must be
    exactly the references' IDs. Raises ``ValueError`` naming the offending ID otherwise (a
    duplicate, an empty ID or one with a comma, quote or whitespace, or a missing/unknown ID).
    The file is written atomically: a crash never leaves half a submission.
    """
    ids = [str(i) for i in ids]
    captions = [str(c) for c in captions]
    if len(ids) != len(captions):
        raise ValueError(f"write_submission: {len(ids)} IDs but {len(captions)} captions")
    first_seen: dict[str, int] = {}
    for pos, image_id in enumerate(ids):
        if (
            not image_id
            or image_id != image_id.strip()
            or any(c in image_id for c in ',"')
            or (_LINE_BREAKS.search(image_id))
        ):
            raise ValueError(
                f"write_submission: ID {image_id!r} (position {pos + 1}) is empty or holds a comma, "
                "quote, line break or surrounding space; image IDs must be plain names"
            )
        if image_id in first_seen:
            raise ValueError(
                f"write_submission: ID {image_id!r} appears twice (positions {first_seen[image_id] + 1} "
                f"and {pos + 1}); each image must be captioned once"
            )
        first_seen[image_id] = pos
    by_id = dict(zip(ids, captions, strict=True))
    order = ids
    if reference_ids is not None:
        refs = [str(r).strip() for r in reference_ids]
        ref_set = set(refs)
        missing = [r for r in refs if r not in by_id]
        unknown = [i for i in ids if i not in ref_set]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"{len(missing)} reference IDs have no caption (e.g. {', '.join(missing[:3])})")
            if unknown:
                parts.append(f"{len(unknown)} IDs are not in the references (e.g. {', '.join(unknown[:3])})")
            raise ValueError("write_submission: " + "; ".join(parts))
        order = list(dict.fromkeys(refs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(HEADER)
        for image_id in order:
            writer.writerow([image_id, clean_caption(by_id[image_id])])
    tmp.replace(path)
    return path


def zip_submission(csv_path: str | Path, zip_path: str | Path | None = None) -> Path:
    """Pack a submission CSV as ``submission.csv`` inside a zip (what the challenge site takes).

    ``zip_path`` defaults to the CSV's path with ``.zip``.
    """
    csv_path = Path(csv_path)
    zip_path = Path(zip_path) if zip_path is not None else csv_path.with_suffix(".zip")
    tmp = zip_path.with_name(zip_path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(csv_path, arcname="submission.csv")
    tmp.replace(zip_path)
    return zip_path


@dataclass
class SubmissionCheck:
    """What ``inspect_submission`` found: errors make the file invalid, warnings do not."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rows: int = 0
    """Data rows read (lines after the header)."""

    @property
    def ok(self) -> bool:
        return not self.errors


def read_reference_ids(path: str | Path) -> list[tuple[str, int]]:
    """IDs of a ground-truth CSV with the physical row each is on, in file order.

    Takes the ``ID`` column of a captions CSV (``ID,Caption``) or the ``id`` column of a prepared
    ``manifest.csv``; without such a header, the first column. A BOM and blank lines are tolerated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"references file {path} does not exist")
    out: list[tuple[str, int]] = []
    records = iter_csv_records(decode_csv_bytes(path.read_bytes(), str(path)), str(path))
    header = next(records, None)
    if header is None:
        return out
    lowered = [h.strip().lower() for h in header.fields]
    if "id" in lowered:
        col = lowered.index("id")
    else:
        col = 0
        if header.fields and header.fields[0].strip():
            out.append((header.fields[0].strip(), 1))
    for rec in records:
        row = rec.fields
        if row and len(row) > col and row[col].strip():
            out.append((row[col].strip(), rec.line))
    return out


def check_submission(
    path: str | Path,
    references: str | Path | Sequence[str] | None = None,
    *,
    check_order: bool = True,
) -> list[str]:
    """Validate a submission file (CSV, or a zip holding ``submission.csv``) like the official checker.

    Returns the list of errors, each starting with the row it is on (empty when the file is valid).
    ``references`` (a ground-truth CSV path, or the IDs in ground-truth order) enables the
    unknown-ID, missing-ID and order checks; ``check_order=False`` drops the order check.
    """
    return inspect_submission(path, references, check_order=check_order).errors


def inspect_submission(
    path: str | Path,
    references: str | Path | Sequence[str] | None = None,
    *,
    check_order: bool = True,
) -> SubmissionCheck:
    """Like ``check_submission`` but also returns warnings (empty captions, captions with surrounding whitespace) and the row count."""
    path = Path(path)
    result = SubmissionCheck()
    if not path.is_file():
        result.errors.append(f"{path}: file not found")
        return result
    size = path.stat().st_size
    if size > MAX_SUBMISSION_BYTES:
        result.errors.append(
            f"{path}: the file is {size:,} bytes; a submission is at most {MAX_SUBMISSION_BYTES:,} "
            "(about 2 MB for 10,000 captions): is this the right file?"
        )
        return result
    raw = path.read_bytes()
    if raw.startswith(_ZIP_STARTS):  # by content: a CSV may end in bytes that look like a zip's end record
        raw_or_error = _csv_from_zip(path)
        if isinstance(raw_or_error, str):
            result.errors.append(raw_or_error)
            return result
        raw = raw_or_error
    refs: list[tuple[str, int]] | None = None
    if references is not None:
        if isinstance(references, str | Path):
            try:
                refs = read_reference_ids(references)
            except CsvError as e:
                result.errors.append(f"references: {e}")
                return result
        else:
            refs = [(str(r).strip(), i + 2) for i, r in enumerate(references)]
    _check_bytes(raw, refs, check_order, result)
    return result


def _csv_from_zip(path: Path) -> bytes | str:
    """The bytes of ``submission.csv`` inside a zip, or the error; never inflates more than
    ``MAX_SUBMISSION_BYTES`` (the size is taken from the zip's directory, and reading stops there
    even when the directory lies)."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            names = [i.filename for i in infos]
            if names != ["submission.csv"]:
                shown = names if len(names) <= 10 else [*names[:10], f"... {len(names) - 10} more"]
                return (
                    f"{path}: the zip must hold exactly one file named submission.csv at its top level, "
                    f"found {shown}"
                )
            if infos[0].file_size > MAX_SUBMISSION_BYTES:
                return (
                    f"{path}: submission.csv inside the zip is {infos[0].file_size:,} bytes uncompressed; a "
                    f"submission is at most {MAX_SUBMISSION_BYTES:,} (about 2 MB for 10,000 captions)"
                )
            with zf.open(infos[0]) as f:
                data = f.read(MAX_SUBMISSION_BYTES + 1)
            if len(data) > MAX_SUBMISSION_BYTES:
                return (
                    f"{path}: submission.csv inflates past {MAX_SUBMISSION_BYTES:,} bytes; not a submission"
                )
            return data
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as e:
        return f"{path}: starts like a zip archive but cannot be read as one ({e}); zip the CSV again"


class _Collector:
    """Caps messages per kind so one systematic mistake does not print 10,000 lines."""

    def __init__(self, out: list[str]) -> None:
        self.out = out
        self.counts: dict[str, int] = {}

    def add(self, kind: str, message: str) -> None:
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if n <= MAX_MESSAGES_PER_KIND:
            self.out.append(message)

    def close(self) -> None:
        for kind, n in self.counts.items():
            if n > MAX_MESSAGES_PER_KIND:
                self.out.append(
                    f"... and {n - MAX_MESSAGES_PER_KIND} more rows with the same problem ({kind})"
                )


def _check_bytes(
    raw: bytes, refs: list[tuple[str, int]] | None, check_order: bool, result: SubmissionCheck
) -> None:
    errors = _Collector(result.errors)
    if not raw.strip():
        result.errors.append(
            "row 1: the file is empty; expected the header 'ID,Caption' and one row per image"
        )
        return
    if raw.startswith(b"\xef\xbb\xbf"):
        errors.add(
            "bom", "row 1: the file starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without BOM"
        )
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # Report every bad line, then carry on with replacement characters to find other problems.
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.add(
                    "encoding",
                    f"row {lineno}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                    "save the file as UTF-8",
                )
        text = raw.decode("utf-8", errors="replace")
    if "\x00" in text:
        errors.add("nul", "the file contains NUL bytes; it is not a text CSV file")
        text = text.replace("\x00", "")

    head = text.lstrip()[:1]
    first_line = text.split("\n", 1)[0]
    if head in ("{", "["):
        result.errors.append(
            "row 1: the file is JSON (JSON Lines or an array), not a CSV; the challenge takes CSV with the "
            "header 'ID,Caption' (medcap predict writes it; medcap evaluate also reads JSON Lines)"
        )
        return
    if "\t" in first_line and "," not in first_line:
        result.errors.append(
            "row 1: the file is tab separated; the challenge takes comma-separated CSV with the header "
            "'ID,Caption' (quote captions that hold a comma)"
        )
        return

    # The csv module breaks records only at \r and \n; number rows the same way.
    physical = re.split(r"\r\n|\r|\n", text)
    seen: dict[str, int] = {}  # ID -> row
    data_ids: list[tuple[str, int]] = []
    empty_caption_rows: list[int] = []
    padded_caption_rows: list[int] = []
    ref_index = {rid: (i, row) for i, (rid, row) in reversed(list(enumerate(refs or [])))}
    stopped_at: int | None = None
    header_done = False
    try:
        for rec in iter_csv_records(text, "submission"):
            record, start, line_end = rec.fields, rec.line, rec.end_line
            where = f"row {start}" if line_end == start else f"rows {start}-{line_end}"
            if line_end > start:
                errors.add(
                    "multiline",
                    f"{where}: a quoted field spans several lines (a line break inside a caption, or an "
                    "unclosed quote); each image must be on one line",
                )
            if not record or all(not c.strip() for c in record) and len(record) <= 1:
                errors.add("blank", f"row {start}: blank line; remove it (no blank lines are allowed)")
                continue
            if not header_done:
                header_done = True
                if tuple(record) == HEADER:
                    continue
                looks_like_data = record[0].strip().lower() not in ("id", "image_id", "imageid")
                if looks_like_data:
                    errors.add(
                        "header", "row 1: the header line 'ID,Caption' is missing; add it as the first line"
                    )
                else:
                    errors.add(
                        "header",
                        f"row 1: the header must be exactly 'ID,Caption', found {','.join(record)!r}",
                    )
                    continue
            result.rows += 1
            if rec.too_long is not None:
                errors.add(
                    "too-long",
                    f"{where}: a field of {rec.too_long:,} characters, over the limit of {MAX_FIELD_CHARS:,} "
                    "that CSV checkers read; shorten the caption",
                )
            if len(record) != 2:
                errors.add(
                    "columns",
                    f"{where}: expected 2 columns (ID,Caption), found {len(record)}; "
                    "a caption with a comma must be in double quotes",
                )
                if not record[0].strip():
                    continue
            image_id = record[0]
            caption = record[1] if len(record) > 1 else ""
            if not image_id.strip():
                errors.add("empty-id", f"{where}: the ID is empty")
                continue
            if image_id != image_id.strip():
                errors.add("id-space", f"{where}: the ID {image_id!r} has leading or trailing whitespace")
            if caption != caption.strip():
                # A warning: the scorer strips captions (and 471 of the 9,927 ROCOv2 test references
                # start or end with a space themselves).
                padded_caption_rows.append(start)
            if len(record) == 2 and "," in caption and start <= len(physical) and line_end == start:
                after_first_comma = physical[start - 1].split(",", 1)[1]
                if not (after_first_comma.startswith('"') and after_first_comma.endswith('"')):
                    errors.add(
                        "quoting",
                        f"{where}: the caption contains a comma but is not enclosed in double quotes",
                    )
            if line_end == start and _LINE_BREAKS.search(caption):
                errors.add(
                    "linesep",
                    f"{where}: the caption holds a line-break character (e.g. U+2028, U+0085, form feed) "
                    "that line-based checkers split on; replace it with a space",
                )
            if not caption.strip():
                empty_caption_rows.append(start)
            key = image_id.strip()
            if key in seen:
                errors.add("duplicate", f"{where}: duplicate ID {key} (first given in row {seen[key]})")
                continue
            seen[key] = start
            if refs is not None and key not in ref_index:
                errors.add("unknown", f"{where}: ID {key} is not in the references")
                continue
            data_ids.append((key, start))
    except CsvError as e:
        stopped_at = e.line
        errors.add("csv", f"row {e.line}: {e.reason} The rows from here on could not be read.")

    if (
        result.rows == 0
        and stopped_at is None
        and not any(m.startswith("row 1: the file is empty") for m in result.errors)
    ):
        errors.add("no-rows", "the file has a header but no caption rows")

    if refs is not None and stopped_at is not None:
        result.errors.append(
            f"missing IDs and their order were not checked: the file could not be read past row {stopped_at}"
        )
    elif refs is not None:
        missing = [(rid, row) for rid, row in refs if rid not in seen]
        missing = list(dict.fromkeys(missing))
        if missing:
            examples = ", ".join(f"{rid} (reference row {row})" for rid, row in missing[:5])
            result.errors.append(
                f"{len(missing)} of {len(ref_index)} reference IDs are missing from the submission, "
                f"e.g. {examples}; caption every test image"
            )
        if check_order and data_ids:
            _check_order(data_ids, ref_index, errors)
    errors.close()

    if padded_caption_rows:
        rows = ", ".join(str(r) for r in padded_caption_rows[:10])
        more = f" and {len(padded_caption_rows) - 10} more" if len(padded_caption_rows) > 10 else ""
        result.warnings.append(
            f"{len(padded_caption_rows)} captions have leading or trailing whitespace (rows {rows}{more}): "
            "allowed, the scorer strips it (medcap's own submissions are written stripped)"
        )
    if empty_caption_rows:
        rows = ", ".join(str(r) for r in empty_caption_rows[:10])
        more = f" and {len(empty_caption_rows) - 10} more" if len(empty_caption_rows) > 10 else ""
        result.warnings.append(
            f"{len(empty_caption_rows)} empty captions (rows {rows}{more}): allowed, but an empty caption "
            "scores 0 unless its reference is empty too"
        )


def _check_order(
    data_ids: list[tuple[str, int]], ref_index: dict[str, tuple[int, int]], errors: _Collector
) -> None:
    """The known IDs must appear in the references' order: report the first row out of place."""
    expected = sorted(data_ids, key=lambda item: ref_index[item[0]][0])
    misplaced = [(got, want) for got, want in zip(data_ids, expected, strict=True) if got[0] != want[0]]
    if misplaced:
        (got_id, row), (want_id, _) = misplaced[0]
        errors.add(
            "order",
            f"row {row}: ID {got_id} is out of the ground-truth order: {want_id} (reference row "
            f"{ref_index[want_id][1]}) should come here; {len(misplaced)} rows are out of place. "
            "Write the rows in the order of the references",
        )


__all__ = [
    "HEADER",
    "SubmissionCheck",
    "check_submission",
    "clean_caption",
    "inspect_submission",
    "read_reference_ids",
    "write_submission",
    "zip_submission",
]
