"""Reading the CSV files datasets come with (captions, concepts): UTF-8 with or without BOM,
comma, tab or semicolon separated, quoted fields, headers or none, bad bytes named by line."""

from __future__ import annotations

import codecs
import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Zero-width format characters (Unicode Cf) seen in real captions; invisible, so removed.
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\ufeff"), None)


class CsvError(ValueError):
    """A CSV file cannot be read; the message names the file, the line and what to do."""


def clean_caption(text: str) -> str:
    """Strip Unicode whitespace at both ends, drop zero-width characters, collapse internal runs of
    whitespace (including no-break and thin spaces, tabs and newlines) to one space."""
    return " ".join(text.translate(_ZERO_WIDTH).split())


@dataclass
class CsvRecord:
    """One data record of a CSV: its fields and the physical line where it starts (1-based)."""

    line: int
    fields: list[str]
    replaced: bool = False
    """True when undecodable bytes in this record were replaced (``encoding_errors='replace'``)."""


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
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records: list[CsvRecord] = []
    prev_end = 0
    try:
        for fields in reader:
            start, end = prev_end + 1, reader.line_num
            prev_end = end
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            hit = any(start <= ln <= end for ln in bad_lines) if bad_lines else False
            records.append(CsvRecord(line=start, fields=fields, replaced=hit))
    except csv.Error as e:
        raise CsvError(
            f"{path}, line {reader.line_num}: {e}. Check the quoting near that line "
            "(a field that holds commas, quotes or newlines must be enclosed in double quotes)."
        ) from None
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
        cap = f[cap_col] if len(f) == n_fields else None
        rows.append(CaptionRow(line=rec.line, id=rid, caption_raw=cap, replaced=rec.replaced))
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
