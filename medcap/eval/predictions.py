"""Reading predictions for ``medcap evaluate``: the submission CSV, and the formats people also have.

* The submission format (``ID,Caption``, header optional), through the one CSV reader.
* Tab-separated ``ID<TAB>Caption`` when that reading is unambiguous: every record has exactly two
  fields split at tabs, and not also when split at commas (unless the header says which).
* JSON Lines, one object a line with one ID key (``ID``, ``id``, ``image_id``) and one caption key
  (``Caption``, ``caption``, ``text``, ``prediction``); other keys are ignored.

What is wrong is said as such: a header with other names (``image_id,caption``) or an extra column
is named, not reported later as an unknown ID or as "3 fields" on every row; a JSON array or an
object without a clear ID or caption key names the line.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from medcap.data.tables import CsvError, CsvRecord, decode_csv_bytes, iter_csv_records
from medcap.eval.errors import EvaluationError

#: Column names that mean the image ID or the caption (lower case).
ID_NAMES = frozenset({"id", "image_id", "imageid", "image", "file_name", "filename", "image_name", "name"})
CAPTION_NAMES = frozenset({"caption", "captions", "text", "prediction", "predictions", "generated_caption"})
#: JSONL keys taken as the ID or the caption (lower case; a subset of the above: unambiguous ones).
JSON_ID_KEYS = frozenset({"id", "image_id"})
JSON_CAPTION_KEYS = frozenset({"caption", "text", "prediction"})


def read_predictions(path: str | Path) -> dict[str, str]:
    """Read predictions into ``{id: caption}`` in file order (submission CSV, TSV or JSON Lines)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"predictions file {path} does not exist")
    try:
        text = decode_csv_bytes(path.read_bytes(), str(path))
    except CsvError as e:
        raise EvaluationError(str(e)) from None
    head = text.lstrip()[:1]
    if head == "[":
        raise EvaluationError(
            f"{path}: a JSON array; medcap evaluate reads the submission CSV (ID,Caption) or JSON Lines "
            '(one {"ID": ..., "Caption": ...} object a line)'
        )
    if head == "{":
        return _read_jsonl(text, path)
    return _read_table(text, path)


def _records(text: str, path: Path, delimiter: str) -> list[CsvRecord]:
    try:
        return list(iter_csv_records(text, str(path), delimiter))
    except CsvError as e:
        raise EvaluationError(str(e)) from None


def _is_header(fields: list[str]) -> bool:
    names = [f.strip().lower() for f in fields]
    return bool(names) and (names[0] in ID_NAMES or any(n in CAPTION_NAMES for n in names[1:]))


def _choose_delimiter(text: str, path: Path) -> str:
    """Comma, unless the file reads as two tab-separated fields a record and not as two comma-separated ones."""
    if "\t" not in text:
        return ","
    try:
        by_tab = [r for r in iter_csv_records(text, str(path), "\t") if r.fields]
        by_comma = [r for r in iter_csv_records(text, str(path), ",") if r.fields]
    except CsvError:
        return ","
    tab_ok = bool(by_tab) and all(len(r.fields) == 2 for r in by_tab)
    comma_ok = bool(by_comma) and all(len(r.fields) == 2 for r in by_comma)
    if tab_ok and comma_ok:  # both read as two columns: only a header can tell
        if [f.strip().lower() for f in by_tab[0].fields] == ["id", "caption"]:
            return "\t"
        if [f.strip().lower() for f in by_comma[0].fields] == ["id", "caption"]:
            return ","
        raise EvaluationError(
            f"{path}: every line splits into two fields both at a tab and at a comma, so the file is "
            "ambiguous; add the header line 'ID,Caption' (comma separated) or 'ID<TAB>Caption' (tab separated)"
        )
    return "\t" if tab_ok else ","


def _read_table(text: str, path: Path) -> dict[str, str]:
    delimiter = _choose_delimiter(text, path)
    sep = "a tab" if delimiter == "\t" else "a comma"
    records = _records(text, path, delimiter)
    data = [r for r in records if r.fields and any(c.strip() for c in r.fields)]
    first = data[0] if data else None
    body = records
    if first is not None and first.line == 1 and _is_header(first.fields):
        names = [f.strip() for f in first.fields]
        lowered = [n.lower() for n in names]
        shown = delimiter.join(names)
        if len(names) > 2:
            extra = [n for n in names if n.lower() not in ("id", "caption")]
            raise EvaluationError(
                f"{path}, row 1: the header {shown!r} has {len(names)} columns; predictions have exactly two, "
                f"ID and Caption: remove the column(s) {', '.join(repr(e) for e in extra)}"
            )
        if lowered != ["id", "caption"]:
            raise EvaluationError(
                f"{path}, row 1: the header is {shown!r}; the predictions header is 'ID,Caption' (the "
                "submission format) or none: rename the columns"
            )
        body = [r for r in records if r is not first]
    rows = [r for r in body if r.fields and any(c.strip() for c in r.fields)]
    counts = Counter(len(r.fields) for r in rows)
    if len(rows) > 1 and len(counts) == 1 and next(iter(counts)) > 2:
        n = next(iter(counts))
        raise EvaluationError(
            f"{path}: every row has {n} fields separated by {sep}: an extra column? Predictions have exactly "
            "two, ID and Caption (a caption holding the separator must be in double quotes)"
        )
    out: dict[str, str] = {}
    for rec in body:
        row, rowno = rec.fields, rec.line
        if not row or all(not c.strip() for c in row):
            raise EvaluationError(f"{path}, row {rowno}: blank line (the submission format allows none)")
        problem = rec.problem()
        if problem is not None:
            raise EvaluationError(f"{path}, {problem}")
        if len(row) < 2:
            raise EvaluationError(
                f"{path}, row {rowno}: expected '<image ID>,<caption>', got {','.join(row)!r}"
            )
        if len(row) > 2:
            raise EvaluationError(
                f"{path}, row {rowno}: {len(row)} fields; quote captions that contain commas"
            )
        image_id, caption = row[0].strip(), row[1]
        if image_id in out:
            raise EvaluationError(f"{path}, row {rowno}: image ID {image_id!r} appears more than once")
        out[image_id] = caption
    return out


def _read_jsonl(text: str, path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvaluationError(
                f"{where}: not valid JSON ({e.msg} at column {e.colno}); JSON Lines hold one object a line"
            ) from None
        if not isinstance(obj, dict):
            raise EvaluationError(
                f"{where}: a JSON {type(obj).__name__}, not an object with an ID and a caption"
            )
        id_keys = [k for k in obj if k.lower() in JSON_ID_KEYS]
        cap_keys = [k for k in obj if k.lower() in JSON_CAPTION_KEYS]
        if len(id_keys) != 1 or len(cap_keys) != 1:
            what = "ID" if len(id_keys) != 1 else "caption"
            raise EvaluationError(
                f"{where}: cannot tell which key is the {what} (keys {sorted(obj)}); write each line as "
                '{"ID": "...", "Caption": "..."}'
            )
        image_id, caption = obj[id_keys[0]], obj[cap_keys[0]]
        if isinstance(image_id, bool) or not isinstance(image_id, str | int):
            raise EvaluationError(f"{where}: the ID {image_id!r} is not text")
        if not isinstance(caption, str):
            raise EvaluationError(f"{where}: the caption {caption!r} is not text")
        key = str(image_id).strip()
        if not key:
            raise EvaluationError(f"{where}: the ID is empty")
        if key in out:
            raise EvaluationError(f"{where}: image ID {key!r} appears more than once")
        out[key] = caption
    if not out:
        raise EvaluationError(f"{path}: no predictions in the file")
    return out
