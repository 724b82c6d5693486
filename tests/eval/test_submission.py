"""Submission files: writing them in the ImageCLEFmedical format and checking them like the official
checker, with the row number of each problem."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest

from medcap.cli.eval import cmd_check_submission as cli
from medcap.data.tables import clean_caption
from medcap.eval.submission import (
    check_submission,
    inspect_submission,
    read_reference_ids,
    write_submission,
    zip_submission,
)
from tests.fixtures import skip_missing

SHARED = Path(__file__).resolve().parents[3] / "shared"
IDS = [f"ImageCLEFmedical_Caption_2025_test_{i}" for i in range(5)]


@pytest.fixture
def refs(tmp_path: Path) -> Path:
    """A ground-truth captions CSV (with a quoted multi-line caption, as ROCOv2 has)."""
    path = tmp_path / "test_captions.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "Caption"])
        w.writerow([IDS[0], "CT of the chest,\nwith contrast"])  # spans two lines
        for i in IDS[1:]:
            w.writerow([i, f"caption of {i}"])
    return path


def _write(tmp_path: Path, text: str | bytes, name: str = "submission.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def _good_lines() -> list[str]:
    return ["ID,Caption"] + [f"{i},caption {n}" for n, i in enumerate(IDS)]


def test_round_trip_quotes_only_where_needed(tmp_path: Path, refs: Path) -> None:
    captions = ["a, b", 'says "hi"', "line one\nline two\r\nthree", "  padded  ", "plain ünïcode – ok"]
    out = write_submission(tmp_path / "pred" / "test.csv", IDS, captions)
    raw = out.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf")
    assert b"\r" not in raw and b"\n\n" not in raw
    lines = raw.decode("utf-8").split("\n")
    assert lines[0] == "ID,Caption"
    assert lines[1] == f'{IDS[0]},"a, b"'
    assert lines[2] == f'{IDS[1]},"says ""hi"""'
    assert lines[3] == f"{IDS[2]},line one line two three"
    assert lines[4] == f"{IDS[3]},padded"
    assert lines[5] == f"{IDS[4]},plain ünïcode – ok"
    assert lines[6] == "" and len(lines) == 7  # one final newline, nothing after
    with out.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[1:] == [[i, clean_caption(c)] for i, c in zip(IDS, captions, strict=True)]
    assert check_submission(out, refs) == []


def test_write_follows_reference_order(tmp_path: Path, refs: Path) -> None:
    shuffled = [IDS[3], IDS[0], IDS[4], IDS[2], IDS[1]]
    ref_ids = [r for r, _ in read_reference_ids(refs)]
    out = write_submission(tmp_path / "s.csv", shuffled, [f"c {i}" for i in shuffled], reference_ids=ref_ids)
    with out.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [r[0] for r in rows] == IDS
    assert all(r[1] == f"c {r[0]}" for r in rows)
    assert check_submission(out, refs) == []


def test_write_rejects_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="appears twice"):
        write_submission(tmp_path / "s.csv", [IDS[0], IDS[0]], ["a", "b"])
    with pytest.raises(ValueError, match="comma"):
        write_submission(tmp_path / "s.csv", ["a,b"], ["x"])
    with pytest.raises(ValueError, match="2 IDs but 1 captions"):
        write_submission(tmp_path / "s.csv", IDS[:2], ["x"])
    with pytest.raises(ValueError, match="1 reference IDs have no caption"):
        write_submission(tmp_path / "s.csv", IDS[:4], ["x"] * 4, reference_ids=IDS)
    with pytest.raises(ValueError, match="not in the references"):
        write_submission(tmp_path / "s.csv", [*IDS, "other"], ["x"] * 6, reference_ids=IDS)
    assert not (tmp_path / "s.csv").exists()


def test_zip_holds_submission_csv(tmp_path: Path, refs: Path) -> None:
    out = write_submission(tmp_path / "test.csv", IDS, ["x"] * 5)
    z = zip_submission(out)
    assert z == tmp_path / "test.zip"
    with zipfile.ZipFile(z) as zf:
        assert zf.namelist() == ["submission.csv"]
        assert zf.read("submission.csv") == out.read_bytes()
    assert check_submission(z, refs) == []
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("preds/test.csv", out.read_bytes())
    assert "exactly one file named submission.csv" in check_submission(bad)[0]


def test_reference_rows_are_physical_lines(refs: Path) -> None:
    # The first caption spans lines 2-3, so the second ID is on line 4.
    assert read_reference_ids(refs)[:2] == [(IDS[0], 2), (IDS[1], 4)]


# Each checker error, with the row (line) it must name. Header = row 1, first data row = row 2.
CASES: list[tuple[str, object, str]] = [
    (
        "bom",
        lambda lines: "\ufeff" + "\n".join(lines) + "\n",
        "row 1: the file starts with a UTF-8 byte-order mark",
    ),
    (
        "header",
        lambda lines: "\n".join(["id,caption", *lines[1:]]) + "\n",
        "row 1: the header must be exactly",
    ),
    (
        "no header",
        lambda lines: "\n".join(lines[1:]) + "\n",
        "row 1: the header line 'ID,Caption' is missing",
    ),
    ("blank", lambda lines: "\n".join([*lines[:3], "", *lines[3:]]) + "\n", "row 4: blank line"),
    ("blank at end", lambda lines: "\n".join(lines) + "\n\n", "row 7: blank line"),
    ("whitespace line", lambda lines: "\n".join([*lines[:2], "   ", *lines[2:]]) + "\n", "row 3: blank line"),
    (
        "unquoted comma",
        lambda lines: "\n".join([*lines[:3], f"{IDS[2]},CT, axial", *lines[4:]]) + "\n",
        "row 4: expected 2 columns (ID,Caption), found 3",
    ),
    (
        "one column",
        lambda lines: "\n".join([*lines[:5], IDS[4]]) + "\n",
        "row 6: expected 2 columns (ID,Caption), found 1",
    ),
    (
        "duplicate",
        lambda lines: "\n".join([*lines, f"{IDS[1]},again"]) + "\n",
        f"row 7: duplicate ID {IDS[1]} (first given in row 3)",
    ),
    (
        "unknown",
        lambda lines: "\n".join([*lines, "ImageCLEFmedical_Caption_2025_test_99,x"]) + "\n",
        "row 7: ID ImageCLEFmedical_Caption_2025_test_99 is not in the references",
    ),
    (
        "missing",
        lambda lines: "\n".join(lines[:4]) + "\n",
        f"2 of 5 reference IDs are missing from the submission, e.g. {IDS[3]} (reference row 6)",
    ),
    (
        "order",
        lambda lines: "\n".join([lines[0], lines[1], lines[3], lines[2], *lines[4:]]) + "\n",
        f"row 3: ID {IDS[2]} is out of the ground-truth order: {IDS[1]} (reference row 4) should come here",
    ),
    (
        "multi-line caption",
        lambda lines: "\n".join([*lines[:2], f'{IDS[1]},"two\nlines"', *lines[3:]]) + "\n",
        "rows 3-4: a quoted field spans several lines",
    ),
    (
        "line separator",
        lambda lines: "\n".join([*lines[:2], f"{IDS[1]},two\u2028lines", *lines[3:]]) + "\n",
        "row 3: the caption holds a line-break character",
    ),
    (
        "json lines",
        lambda lines: "\n".join(f'{{"ID": "{i}", "Caption": "x"}}' for i in IDS) + "\n",
        "row 1: the file is JSON (JSON Lines or an array), not a CSV",
    ),
    (
        "tab separated",
        lambda lines: "\n".join(line.replace(",", "\t", 1) for line in lines) + "\n",
        "row 1: the file is tab separated",
    ),
    (
        "space around id",
        lambda lines: "\n".join([*lines[:5], f" {IDS[4]},x"]) + "\n",
        f"row 6: the ID ' {IDS[4]}' has leading or trailing whitespace",
    ),
    (
        "empty id",
        lambda lines: "\n".join([*lines, ",orphan caption"]) + "\n",
        "row 7: the ID is empty",
    ),
    (
        "comma in unquoted-looking caption",
        lambda lines: "\n".join([*lines[:5], f'{IDS[4]},"a",b']) + "\n",
        "row 6: expected 2 columns",
    ),
]


@pytest.mark.parametrize(("name", "make", "expected"), CASES, ids=[c[0] for c in CASES])
def test_checker_errors_name_the_row(tmp_path: Path, refs: Path, name: str, make, expected: str) -> None:
    path = _write(tmp_path, make(_good_lines()))
    errors = check_submission(path, refs)
    assert any(e.startswith(expected) for e in errors), f"{name}: {errors}"


def test_checker_accepts_good_file_and_crlf(tmp_path: Path, refs: Path) -> None:
    assert check_submission(_write(tmp_path, "\n".join(_good_lines()) + "\n"), refs) == []
    assert check_submission(_write(tmp_path, "\r\n".join(_good_lines()) + "\r\n", "crlf.csv"), refs) == []
    # Without a final newline too.
    assert check_submission(_write(tmp_path, "\n".join(_good_lines()), "nofinal.csv"), refs) == []


def test_checker_non_utf8_row(tmp_path: Path, refs: Path) -> None:
    body = ("\n".join(_good_lines()[:3]) + "\n").encode() + IDS[2].encode() + b",caf\xe9\n"
    body += ("\n".join(_good_lines()[4:]) + "\n").encode()
    errors = check_submission(_write(tmp_path, body), refs)
    assert errors and errors[0].startswith("row 4: not valid UTF-8 (byte 0xe9")


def test_checker_empty_file_and_missing_file(tmp_path: Path) -> None:
    assert check_submission(_write(tmp_path, ""))[0].startswith("row 1: the file is empty")
    assert check_submission(tmp_path / "nope.csv")[0].endswith("file not found")
    assert "no caption rows" in check_submission(_write(tmp_path, "ID,Caption\n", "h.csv"))[0]


def test_checker_order_can_be_ignored_and_works_without_references(tmp_path: Path, refs: Path) -> None:
    lines = _good_lines()
    path = _write(tmp_path, "\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    assert check_submission(path, refs, check_order=False) == []
    assert check_submission(path) == []
    assert any("ground-truth order" in e for e in check_submission(path, refs))
    # References given as a list of IDs: rows counted from 2.
    errors = check_submission(path, IDS)
    assert errors == [
        f"row 2: ID {IDS[4]} is out of the ground-truth order: {IDS[0]} (reference row 2) should come here; "
        "4 rows are out of place. Write the rows in the order of the references"
    ]


def test_empty_captions_warn_but_pass(tmp_path: Path, refs: Path) -> None:
    lines = _good_lines()
    lines[2] = f"{IDS[1]},"
    check = inspect_submission(_write(tmp_path, "\n".join(lines) + "\n"), refs)
    assert check.ok and check.rows == 5
    assert check.warnings and "1 empty captions (rows 3)" in check.warnings[0]


def test_whitespace_around_a_caption_is_a_warning(tmp_path: Path, refs: Path) -> None:
    lines = _good_lines()
    lines[5] = f"{IDS[4]}, padded "
    check = inspect_submission(_write(tmp_path, "\n".join(lines) + "\n"), refs)
    assert check.ok, check.errors
    assert check.warnings == [
        "1 captions have leading or trailing whitespace (rows 6): allowed, the scorer strips it "
        "(medcap's own submissions are written stripped)"
    ]
    # Around an ID it is still an error: the ID would not match.
    lines[5] = f" {IDS[4]},padded"
    assert not inspect_submission(_write(tmp_path, "\n".join(lines) + "\n", "id.csv"), refs).ok


def test_the_real_references_as_a_submission_pass_with_a_whitespace_warning(tmp_path: Path) -> None:
    """About 400 real ROCOv2 valid captions start or end with whitespace; submitting the references
    themselves (line breaks made spaces, nothing stripped) must pass with one warning counting them."""
    valid = SHARED / "data" / "rocov2-valid" / "valid_captions.csv"
    if not valid.is_file():
        skip_missing(f"real ROCOv2 captions not found at {valid}")
    with valid.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    captions = [" ".join(c.splitlines()) if "\n" in c or "\r" in c else c for _, c in rows]
    padded = sum(c != c.strip() for c in captions)
    assert padded > 300
    sub = tmp_path / "refs_as_submission.csv"
    with sub.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "Caption"])
        w.writerows(zip([i for i, _ in rows], captions, strict=True))
    check = inspect_submission(sub, valid)
    assert check.ok, check.errors[:3]
    assert check.warnings[0].startswith(f"{padded} captions have leading or trailing whitespace")


def test_many_errors_are_capped(tmp_path: Path) -> None:
    lines = ["ID,Caption"] + [f"id_{i},a, b" for i in range(100)]
    errors = check_submission(_write(tmp_path, "\n".join(lines) + "\n"))
    assert len(errors) == 21
    assert errors[-1].startswith("... and 80 more rows with the same problem")


def test_cli_exit_codes(tmp_path: Path, refs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_submission(tmp_path / "good.csv", IDS, ["x"] * 5)
    assert cli([str(good), "--references", str(refs)]) == 0
    assert "OK:" in capsys.readouterr().out
    bad = _write(tmp_path, "\n".join(_good_lines()[:-1]) + "\n", "bad.csv")
    assert cli([str(bad), "--references", str(refs)]) == 1
    out = capsys.readouterr().out
    assert "1 of 5 reference IDs are missing" in out
    assert cli([str(good), "--references", str(tmp_path / "absent.csv")]) == 1


def test_medcap_command_dispatch(tmp_path: Path, refs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medcap.cli import main

    good = write_submission(tmp_path / "good.csv", IDS, ["x"] * 5)
    assert main(["check-submission", str(good), "--references", str(refs)]) == 0
    assert "OK:" in capsys.readouterr().out


def test_real_rocov2_valid_references(tmp_path: Path) -> None:
    """A full submission for the real ROCOv2 valid captions passes; one dropped row is found."""
    captions_csv = SHARED / "data" / "rocov2-valid" / "valid_captions.csv"
    if not captions_csv.is_file():
        skip_missing(f"{captions_csv} not present (the shared data folder is absent in a user's clone)")
    with captions_csv.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [r["ID"] for r in rows]
    # The references themselves, written as a submission, are valid (captions with newlines fixed).
    out = write_submission(tmp_path / "s.csv", ids, [r["Caption"] for r in rows])
    assert check_submission(out, captions_csv) == []
    lines = out.read_text(encoding="utf-8").split("\n")
    del lines[100]
    errors = check_submission(_write(tmp_path, "\n".join(lines), "drop.csv"), captions_csv)
    assert len(errors) == 1 and errors[0].startswith(f"1 of {len(set(ids))} reference IDs are missing")
