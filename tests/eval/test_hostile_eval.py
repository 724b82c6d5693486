"""check-submission, evaluate and report under hostile or broken files: a zip bomb, a CSV that ends
like a zip, captions over the one field limit, unclosed quotes, Latin-1 bytes, odd metric values and
an image over Pillow's own bomb limit. Each is a clear error naming file and row, never a traceback."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from medcap.cli import main
from medcap.data.tables import MAX_FIELD_CHARS
from medcap.eval.evaluate import EvaluationError, read_predictions, read_references
from medcap.eval.report import write_report
from medcap.eval.submission import MAX_SUBMISSION_BYTES, inspect_submission
from tests.eval.test_report import make_run
from tests.hostile_inputs import blank_png, run_measured, zip_bomb_csv

IDS = [f"ImageCLEFmedical_Caption_2025_test_{i}" for i in range(4)]


def _lines(captions: list[str] | None = None) -> list[str]:
    captions = captions or [f"caption {i}" for i in range(len(IDS))]
    return ["ID,Caption", *(f"{i},{c}" for i, c in zip(IDS, captions, strict=True))]


def _refs(tmp_path: Path) -> Path:
    path = tmp_path / "refs.csv"
    path.write_text("\n".join(_lines()) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# check-submission (findings 5, 7, 8)


def test_zip_bomb_is_refused_from_the_zip_directory(tmp_path: Path) -> None:
    """256 MiB of rows in a 0.8 MB zip: the old checker inflated and parsed it all (2,075 MB and
    19.7 s measured here; 1 GiB: 8,171 MB and 77 s); now the declared size is checked first."""
    bomb = tmp_path / "submission.zip"
    bomb.write_bytes(zip_bomb_csv(256 << 20))
    code = f"""
from medcap.eval.submission import inspect_submission
check = inspect_submission({str(bomb)!r})
result = check.errors
"""
    out = run_measured(code)
    (error,) = out["result"]
    assert "uncompressed" in error and f"{MAX_SUBMISSION_BYTES:,}" in error
    assert out["peak_rss_mb"] < 150, out


def test_a_csv_that_ends_like_a_zip_is_read_as_a_csv(tmp_path: Path) -> None:
    """A text file whose last bytes are a zip end record made zipfile.is_zipfile say yes, and the
    old checker died in BadZipFile."""
    end_record = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, 46, 0, 0)
    path = tmp_path / "s.csv"
    path.write_bytes(("\n".join(_lines()) + "\n").encode() + end_record)
    check = inspect_submission(path)
    assert check.errors and all("Traceback" not in e for e in check.errors)
    assert any("NUL" in e for e in check.errors)
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    assert "cannot be read as one" in inspect_submission(damaged).errors[0]


def test_a_caption_over_the_field_limit_is_that_rows_error(tmp_path: Path) -> None:
    """The old checker stopped at it ('field larger than field limit') and then claimed the file had
    no caption rows; the other rows are checked as usual."""
    long = "x" * (MAX_FIELD_CHARS + 10)
    path = tmp_path / "s.csv"
    path.write_text("\n".join(_lines(["a", long, "b", "c"])) + "\n", encoding="utf-8")
    check = inspect_submission(path, _refs(tmp_path))
    assert check.rows == 4
    assert check.errors == [
        f"row 3: a field of {len(long):,} characters, over the limit of {MAX_FIELD_CHARS:,} that CSV checkers read; shorten the caption"
    ]


def test_an_unclosed_quote_is_reported_at_the_line_it_opens(tmp_path: Path) -> None:
    lines = _lines()
    lines[2] = f'{IDS[1]},"never closed'
    path = tmp_path / "s.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    errors = inspect_submission(path, _refs(tmp_path)).errors
    assert errors[0].startswith("row 3: the quote opened on line 3 is never closed"), errors
    assert not any("missing from the submission" in e for e in errors)  # not claimed: rows unread


# ----------------------------------------------------------------------------------------------
# evaluate (findings 7, 8)


def test_evaluate_names_the_line_of_bad_bytes_long_fields_and_open_quotes(tmp_path: Path, capsys) -> None:
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(("\n".join(_lines(["a", "b", "Röntgen", "c"])) + "\n").encode("latin-1"))
    with pytest.raises(EvaluationError, match=r"latin1.csv, line 4: bytes .* not valid utf-8"):
        read_predictions(latin1)
    with pytest.raises(EvaluationError, match="line 4"):
        read_references(latin1)
    refs = _refs(tmp_path)
    rc = main(
        ["evaluate", "--predictions", str(latin1), "--references", str(refs), "--out", str(tmp_path / "ev")]
    )
    assert rc != 0 and "Traceback" not in capsys.readouterr().err

    long = tmp_path / "long.csv"
    long.write_text("\n".join(_lines(["a", "x" * (MAX_FIELD_CHARS + 1), "b", "c"])) + "\n", encoding="utf-8")
    for reader in (read_predictions, read_references):
        with pytest.raises(EvaluationError, match="line 3: a field of 131,073 characters, over the limit"):
            reader(long)

    merged = tmp_path / "merged.csv"
    lines = _lines()
    lines[1] = f'{IDS[0]},"opens here'
    lines[3] = f'{IDS[2]},closes here"'
    merged.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(EvaluationError, match="quote opened on line 2 is closed only on line 4"):
        read_predictions(merged)


# ----------------------------------------------------------------------------------------------
# report (finding 7)


def test_report_survives_odd_metrics_a_bomb_image_and_a_broken_csv(tmp_path: Path) -> None:
    """A non-numeric metric made the old report raise in the format call; an image over Pillow's
    own bomb limit (2 x 89.5 megapixels, reachable after 'prepare --max-pixels' is raised)
    aborted it in the baseline; a per_caption.csv with an unclosed quote is shown as such."""
    run = make_run(tmp_path)
    metrics_path = run / "eval" / "test" / "metrics.json"
    summary = json.loads(metrics_path.read_text())
    summary["metrics"]["bertscore"]["mean"] = "n/a"
    summary["metrics"]["rouge1"] = 0.25  # a bare number instead of {"mean": ...}
    summary["metrics"]["bleu"] = {"mean": 0.1, "ci95": ["low", None]}
    metrics_path.write_text(json.dumps(summary))
    manifest = tmp_path / "prepared" / "test" / "manifest.csv"
    with manifest.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(blank_png(13_500, 13_500))  # 182 megapixels in 180 KB
    for r in rows:
        r["image"] = str(bomb)
    with manifest.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    page = write_report(run).read_text(encoding="utf-8")
    assert "no numeric mean for bertscore" in page
    assert "image unreadable" in page and "bertscore" in page

    per_caption = run / "eval" / "test" / "per_caption.csv"
    per_caption.write_text(per_caption.read_text(encoding="utf-8") + 'x,"never closed\n', encoding="utf-8")
    page = write_report(run).read_text(encoding="utf-8")
    assert "is never closed" in page and "Training" in page
