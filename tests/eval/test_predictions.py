"""Predictions for `medcap evaluate` in the formats people have: the submission CSV, TSV, JSON Lines;
wrong headers, extra columns and ambiguous files named as such (not as unknown IDs or "3 fields")."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medcap.cli.eval import cmd_evaluate
from medcap.eval.evaluate import EvaluationError, read_predictions

PREDS = {"img_1": "CT of the chest, with contrast", "img_2": 'a "quoted" word', "img_3": "mri"}


def _csv(path: Path, header: list[str] | None, rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_tsv_and_jsonl_read_the_same(tmp_path: Path) -> None:
    rows = [[k, v] for k, v in PREDS.items()]
    assert read_predictions(_csv(tmp_path / "p.csv", ["ID", "Caption"], rows)) == PREDS
    assert read_predictions(_csv(tmp_path / "p.tsv", ["ID", "Caption"], rows, "\t")) == PREDS
    assert read_predictions(_csv(tmp_path / "nohead.tsv", None, rows, "\t")) == PREDS
    lines = [json.dumps({"image_id": k, "caption": v, "score": 0.5}) for k, v in PREDS.items()]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert read_predictions(tmp_path / "p.jsonl") == PREDS
    # The file name does not matter: the content decides.
    (tmp_path / "p.txt").write_text("\n".join(json.dumps({"ID": k, "Caption": v}) for k, v in PREDS.items()))
    assert read_predictions(tmp_path / "p.txt") == PREDS


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("other header", "image_id,caption\nimg_1,ct\n", "row 1: the header is 'image_id,caption'"),
        (
            "extra column",
            "ID,Caption,score\nimg_1,ct,0.5\n",
            "row 1: the header 'ID,Caption,score' has 3 columns; predictions have exactly two, ID and "
            "Caption: remove the column(s) 'score'",
        ),
        (
            "extra column, no header",
            "img_1,ct,0.5\nimg_2,mri,0.7\n",
            "every row has 3 fields separated by a comma",
        ),
        ("one unquoted comma", "ID,Caption\nimg_1,ct, chest\nimg_2,mri\n", "row 2: 3 fields; quote captions"),
        ("json array", '[{"ID": "img_1", "Caption": "ct"}]', "a JSON array"),
        ("bad json line", '{"ID": "img_1", "Caption": "ct"}\n{"ID": "img_2",\n', "line 2: not valid JSON"),
        (
            "two caption keys",
            '{"ID": "img_1", "caption": "ct", "text": "x"}\n',
            "cannot tell which key is the caption",
        ),
        ("no id key", '{"file": "img_1", "caption": "ct"}\n', "cannot tell which key is the ID"),
        ("caption not text", '{"ID": "img_1", "Caption": null}\n', "the caption None is not text"),
        (
            "duplicate",
            '{"ID": "img_1", "Caption": "a"}\n{"ID": "img_1", "Caption": "b"}\n',
            "appears more than once",
        ),
        ("ambiguous separators", "img_1\tct, chest\nimg_2\tmri, head\n", "ambiguous; add the header line"),
    ],
)
def test_wrong_formats_are_named(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / "pred.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EvaluationError, match=None) as info:
        read_predictions(path)
    assert message in str(info.value), f"{name}: {info.value}"


def test_the_cli_says_what_is_wrong_with_the_header(tmp_path: Path, capsys) -> None:
    refs = _csv(tmp_path / "refs.csv", ["ID", "Caption"], [[k, v] for k, v in PREDS.items()])
    pred = _csv(tmp_path / "pred.csv", ["image_id", "caption"], [[k, v] for k, v in PREDS.items()])
    rc = cmd_evaluate(["--predictions", str(pred), "--references", str(refs), "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert rc == 2 and "the header is 'image_id,caption'" in err and "rename the columns" in err
    assert "not in the references" not in err
