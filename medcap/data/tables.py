"""Reading CSV files: the one CSV reader of medcap. Datasets' captions and concepts (prepare),
submissions (check-submission), predictions and references (evaluate) and the run files the report
reads all go through ``iter_csv_records``, so they share one field-size limit and one quoting rule:

* UTF-8 with or without BOM; comma, tab or semicolon separated (datasets); bad bytes named by line;
* strict quoting: a quote that is never closed is an error naming the line it opens on, and a
  quoted field that swallows the rows after it is visible (``CsvRecord.end_line``);
* fields longer than ``MAX_FIELD_CHARS`` are a problem of their row (``CsvRecord.too_long``), not
  a parser error that ends the file: prepare skips the row, check-submission and evaluate name it.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

#: Longest field (in characters) any CSV of medcap may hold: the csv module's own default, which is
#: what the official submission checkers parse with. ROCOv2's longest caption is about 4,400
#: characters (778 words).
MAX_FIELD_CHARS = 131_072

# The csv module's own limit would end the parse at the first longer field, with the quoting blamed;
# ours is checked per record instead (the whole text is in memory already, so this costs nothing).
csv.field_size_limit(sys.maxsize)

#: A continuation line of a multi-line field that looks like the start of a record (``<ID>,...``):
#: the sign of an unclosed quote that swallowed the rows after it.
_LOOKS_LIKE_A_ROW = re.compile(r"^[^\s,;\t\"]+[,;\t]")

# Zero-width format characters (Unicode Cf) seen in real captions; invisible, so removed.
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\ufeff"), None)


class CsvError(ValueError):
    """A CSV file cannot be read; the message names the file, the line and what to do. ``line`` and
    ``reason`` are the parts, for callers that word their own messages (the submission checker)."""

    def __init__(self, message: str, line: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.reason = reason or message


def clean_caption(text: str) -> str:
    """Strip Unicode whitespace at both ends, drop zero-width characters, collapse internal runs of
    whitespace (including no-break and thin spaces, tabs and newlines) to one space."""
    return " ".join(text.translate(_ZERO_WIDTH).split())


@dataclass
class CsvRecord:
    """One data record of a CSV: its fields and the physical lines it spans (1-based)."""

    line: int
    fields: list[str]
    replaced: bool = False
    """True when undecodable bytes in this record were replaced (``encoding_errors='replace'``)."""
    end_line: int = 0
    """The last physical line of the record (more than ``line`` when a quoted field holds line breaks)."""

    @property
    def too_long(self) -> int | None:
        """The length of the longest field when it is over ``MAX_FIELD_CHARS``, else None."""
        longest = max((len(f) for f in self.fields), default=0)
        return longest if longest > MAX_FIELD_CHARS else None

    def problem(self) -> str | None:
        """What is wrong with this record as one row of a table, in words naming its lines, or None:
        a field over the length limit, or a quoted field that swallowed what look like later rows."""
        if self.too_long is not None:
            return (
                f"line {self.line}: a field of {self.too_long:,} characters, over the limit of "
                f"{MAX_FIELD_CHARS:,} (shorten it; if it holds several rows, a quote is not closed)"
            )
        if self.end_line > self.line:
            swallowed = [
                line for f in self.fields for line in f.splitlines()[1:] if _LOOKS_LIKE_A_ROW.match(line)
            ]
            if swallowed:
                return (
                    f"lines {self.line}-{self.end_line}: the quote opened on line {self.line} is closed only "
                    f"on line {self.end_line}, so {len(swallowed)} line(s) that look like rows (e.g. "
                    f"{swallowed[0][:40]!r}) became part of one field; close the quote on line {self.line}"
                )
        return None


def iter_csv_records(text: str, label: str, delimiter: str = ",") -> Iterator[CsvRecord]:
    """The records of CSV text with the physical lines each spans, blank lines included (as empty
    records), parsed with strict quoting. A quote that is never closed (or text right after a
    closing quote) raises ``CsvError`` naming ``label`` and the line the record starts on."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    prev_end = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            start = prev_end + 1
            if "unexpected end of data" in str(e):
                what = (
                    f"the quote opened on line {start} is never closed, so every line after it would be "
                    "read as one field"
                )
            else:
                what = f"{e} (reached line {reader.line_num})"
            reason = (
                f"{what}. A field that holds commas, quotes or line breaks must be enclosed in double "
                'quotes, with each quote inside it doubled ("").'
            )
            raise CsvError(f"{label}, line {start}: {reason}", line=start, reason=reason) from None
        start, end = prev_end + 1, reader.line_num
        prev_end = end
        yield CsvRecord(line=start, fields=fields, end_line=end)


def decode_csv_bytes(data: bytes, label: str, encoding: str = "utf-8") -> str:
    """CSV bytes as text (a UTF-8 BOM dropped); undecodable bytes raise ``CsvError`` naming the line."""
    if data.startswith(codecs.BOM_UTF8) and encoding.lower().replace("_", "-") in (
        "utf-8",
        "utf8",
        "utf-8-sig",
    ):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CsvError(
            f"{label}, line {line}: bytes {data[e.start : e.end]!r} are not valid {encoding}; "
            "save the file as UTF-8"
        ) from None


def read_csv_dicts(path: Path, encoding: str = "utf-8") -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV with a header line as ``(header, [(line, {column: value}), ...])``, through the one
    reader (blank lines skipped). Missing trailing fields are empty strings; ``CsvError`` names the
    file and line of an undecodable byte, an unclosed quote or a field over the length limit."""
    text = decode_csv_bytes(path.read_bytes(), str(path), encoding)
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    for rec in iter_csv_records(text, str(path)):
        if not rec.fields or (len(rec.fields) == 1 and not rec.fields[0].strip()):
            continue
        if rec.too_long is not None:
            raise CsvError(f"{path}, {rec.problem()}")
        if header is None:
            header = rec.fields
            continue
        rows.append(
            (rec.line, {k: (rec.fields[i] if i < len(rec.fields) else "") for i, k in enumerate(header)})
        )
    return header or [], rows


@dataclass
class CsvTable:
    """A parsed CSV: column positions, records, and what was noticed while reading it."""

    path: Path
    header: list[str] | None
    records: list[CsvRecord]
    delimiter: str
    had_bom: bool = False
    replaced_bytes: int = 0


def read_csv_table(
    path: Path,
    encoding: str = "utf-8",
    encoding_errors: Literal["strict", "replace"] = "strict",
) -> CsvTable:
    """Read a CSV (or TSV) file fully, handling a UTF-8 BOM, quoted commas and newlines.

    Bytes that are not valid in ``encoding`` raise ``CsvError`` naming the file, line and bytes
    (``strict``), or are replaced by U+FFFD and the affected records flagged (``replace``).
    The delimiter is a comma, unless the first line has none: then a tab (2023 edition) or a semicolon.
    """
    data = path.read_bytes()
    had_bom = data.startswith(codecs.BOM_UTF8)
    if had_bom and encoding.lower().replace("_", "-") in ("utf-8", "utf8", "utf-8-sig"):
        data = data[len(codecs.BOM_UTF8) :]
    bad_spans: list[tuple[int, int]] = []
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        if encoding_errors != "replace":
            line = data.count(b"\n", 0, e.start) + 1
            raise CsvError(
                f"{path}, line {line}: bytes {data[e.start : e.end]!r} are not valid {encoding}. "
                "Re-save the file as UTF-8, or pass --encoding with its real encoding (e.g. cp1252), "
                "or --encoding-errors replace to replace undecodable bytes with U+FFFD "
                "(the rows affected are counted in stats.json and listed in notes.csv)."
            ) from None
        pieces: list[str] = []
        pos = 0
        decoder = codecs.getincrementaldecoder(encoding)("strict")
        # Decode piecewise so every bad byte span is known (to flag exactly the rows it hit).
        while pos < len(data):
            try:
                pieces.append(decoder.decode(data[pos:], final=True))
                break
            except UnicodeDecodeError as e:
                start = pos + e.start
                end = pos + e.end
                pieces.append(data[pos:start].decode(encoding, errors="strict"))
                pieces.append("\ufffd")
                bad_spans.append((start, end))
                pos = end
                decoder.reset()
        text = "".join(pieces)
    bad_lines = {data.count(b"\n", 0, s) + 1 for s, _ in bad_spans}

    first_line = text.split("\n", 1)[0]
    delimiter = ","
    if "," not in first_line:  # a 2023-edition TSV, or a spreadsheet export with semicolons
        delimiter = "\t" if "\t" in first_line else (";" if ";" in first_line else ",")
    records: list[CsvRecord] = []
    for rec in iter_csv_records(text, str(path), delimiter):
        if not rec.fields or (len(rec.fields) == 1 and not rec.fields[0].strip()):
            continue  # blank line
        rec.replaced = any(rec.line <= ln <= rec.end_line for ln in bad_lines) if bad_lines else False
        records.append(rec)
    return CsvTable(
        path=path,
        header=None,
        records=records,
        delimiter=delimiter,
        had_bom=had_bom,
        replaced_bytes=sum(e - s for s, e in bad_spans),
    )


_ID_NAMES = {"id", "image", "image_id", "imageid", "filename", "file", "name"}

_CAPTION_NAMES = {"caption", "captions", "text", "description"}

_CUIS_NAMES = {"cuis", "cui", "concepts", "concept", "labels"}


def _split_header(table: CsvTable, value_names: set[str], what: str) -> tuple[int, int, bool]:
    """Find the ID and value columns from the header; a headerless 2-column file is read as
    ``ID,value`` (returns ``headerless=True``)."""
    if not table.records:
        return 0, 1, False
    first = [f.strip().lower() for f in table.records[0].fields]
    id_col = next((i for i, f in enumerate(first) if f in _ID_NAMES), None)
    val_col = next((i for i, f in enumerate(first) if f in value_names), None)
    if id_col is not None and val_col is not None:
        table.header = table.records.pop(0).fields
        return id_col, val_col, False
    if len(first) == 2 and id_col is None and val_col is None:
        return 0, 1, True
    raise CsvError(
        f"{table.path}, line {table.records[0].line}: header {table.records[0].fields!r} has no "
        f"ID and {what} columns. Expected a header like 'ID,{what}' "
        f"(names accepted: ID: {sorted(_ID_NAMES)}, {what}: {sorted(value_names)})."
    )


@dataclass
class CaptionRow:
    """A caption record as read, before any check."""

    line: int
    id: str
    caption_raw: str | None
    replaced: bool = False
    problem: str | None = None
    """Why the record cannot be a caption row although it parsed (``CsvRecord.problem``)."""


def read_captions(
    path: Path, encoding: str = "utf-8", encoding_errors: Literal["strict", "replace"] = "strict"
) -> tuple[list[CaptionRow], dict[str, Any]]:
    """Read a captions CSV (``ID,Caption``) into rows in file order, and facts about the file."""
    table = read_csv_table(path, encoding, encoding_errors)
    id_col, cap_col, headerless = _split_header(table, _CAPTION_NAMES, "Caption")
    n_fields = len(table.header) if table.header else 2
    rows: list[CaptionRow] = []
    for rec in table.records:
        f = rec.fields
        rid = f[id_col].strip() if len(f) > id_col else ""
        # Extra fields (an unquoted comma) are not guessed at: the row is reported as malformed.
        problem = rec.problem()
        cap = f[cap_col] if len(f) == n_fields and problem is None else None
        rows.append(
            CaptionRow(line=rec.line, id=rid, caption_raw=cap, replaced=rec.replaced, problem=problem)
        )
    facts = {
        "file": str(path),
        "bom": table.had_bom,
        "delimiter": table.delimiter,
        "headerless": headerless,
        "records": len(rows),
        "replaced_bytes": table.replaced_bytes,
        "records_with_replaced_bytes": sum(r.replaced for r in rows),
    }
    return rows, facts


def read_concepts(
    path: Path | None, encoding: str = "utf-8", encoding_errors: Literal["strict", "replace"] = "strict"
) -> tuple[dict[str, list[str]] | None, dict[str, Any]]:
    """Read a concepts CSV (``ID,CUIs`` with CUIs joined by ';'); ``None`` when the file is absent."""
    if path is None or not path.is_file():
        return None, {"file": str(path) if path else None, "present": False}
    table = read_csv_table(path, encoding, encoding_errors)
    id_col, val_col, headerless = _split_header(table, _CUIS_NAMES, "CUIs")
    out: dict[str, list[str]] = {}
    dups = 0
    for rec in table.records:
        f = rec.fields
        rid = f[id_col].strip() if len(f) > id_col else ""
        if not rid:
            continue
        if rid in out:
            dups += 1
            continue
        raw = f[val_col] if len(f) > val_col else ""
        out[rid] = [c.strip() for c in raw.replace(",", ";").split(";") if c.strip()]
    return out, {
        "file": str(path),
        "present": True,
        "records": len(table.records),
        "duplicate_ids": dups,
        "bom": table.had_bom,
        "headerless": headerless,
    }
