"""`medcap data prepare` under hostile or broken input: links that leave the image folder, a
decoding-time bomb, a caption over the one field limit, and unclosed quotes. Each item is skipped
with its reason (or the file is refused naming the line), and rows in = kept + skipped."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from medcap.cli import main
from medcap.data.prepare import prepare_dataset
from medcap.data.tables import MAX_FIELD_CHARS, CsvError
from tests.data.test_bad_input import jpeg_bytes, skipped_rows
from tests.hostile_inputs import progressive_jpeg_scan_bomb


def _split(root: Path, rows: list[str], images: dict[str, bytes]) -> None:
    (root / "valid").mkdir(parents=True)
    for name, data in images.items():
        (root / "valid" / name).write_bytes(data)
    (root / "valid_captions.csv").write_text("\n".join(["ID,Caption", *rows]) + "\n", encoding="utf-8")


def _manifest_ids(out: Path) -> list[str]:
    with (out / "valid" / "manifest.csv").open(encoding="utf-8", newline="") as f:
        return [r["id"] for r in csv.DictReader(f)]


def test_links_that_leave_the_image_folder_are_skipped_not_followed(tmp_path: Path) -> None:
    """The old prepare kept a link to an outside image (and the report embedded it); a link to an
    outside text file put that file's first bytes into skipped.csv."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "photo.jpg").write_bytes(jpeg_bytes(3))
    (outside / "secret.jpg").write_text("root:x:0:0:secret\n")
    root = tmp_path / "data"
    _split(root, ["a,inside", "b,linked out", "c,linked text", "d,linked inside"], {"a.jpg": jpeg_bytes(1)})
    (root / "valid" / "b.jpg").symlink_to(outside / "photo.jpg")
    (root / "valid" / "c.jpg").symlink_to(outside / "secret.jpg")
    (root / "valid" / "d.jpg").symlink_to(root / "valid" / "a.jpg")  # stays inside: kept
    stats = prepare_dataset(root, tmp_path / "out", color_policy="all", progress=False)["valid"]
    assert stats["reconciled"] and stats["skipped_by_reason"] == {"outside_folder": 2}
    assert sorted(_manifest_ids(tmp_path / "out")) == ["a", "d"]
    skipped = skipped_rows(tmp_path / "out", "valid")
    assert set(skipped) == {"b", "c"} and all(r["reason"] == "outside_folder" for r in skipped.values())
    text = (tmp_path / "out" / "valid" / "skipped.csv").read_text()
    assert "root:x" not in text and "secret" not in text.replace("secret.jpg", "")


def test_a_scan_bomb_is_skipped_at_once(tmp_path: Path) -> None:
    """20,000 scans over a 2048 x 2048 colour image: the old prepare spent 82 s on it here (its
    colour check decodes at 1/8 scale, and libjpeg still runs every scan)."""
    root = tmp_path / "data"
    _split(
        root,
        ["a,good", "b,bomb"],
        {"a.jpg": jpeg_bytes(1), "b.jpg": progressive_jpeg_scan_bomb(2048, 20_000, colour=True)},
    )
    t0 = time.perf_counter()
    stats = prepare_dataset(root, tmp_path / "out", color_policy="true-color", progress=False, workers=1)[
        "valid"
    ]
    assert time.perf_counter() - t0 < 10
    assert skipped_rows(tmp_path / "out", "valid")["b"]["reason"] == "too_many_scans"
    assert stats["reconciled"]


def test_a_caption_over_the_field_limit_skips_its_row_not_the_run(tmp_path: Path) -> None:
    """The old prepare aborted the whole run on one correctly quoted caption over 131,072
    characters, blaming the quoting."""
    root = tmp_path / "data"
    long = "word " * (MAX_FIELD_CHARS // 5 + 10)
    _split(
        root,
        ["a,good", f'b,"{long}"', "c,also good"],
        {n: jpeg_bytes(i) for i, n in enumerate(["a.jpg", "b.jpg", "c.jpg"])},
    )
    stats = prepare_dataset(root, tmp_path / "out", color_policy="all", progress=False)["valid"]
    assert _manifest_ids(tmp_path / "out") == ["a", "c"]
    row = skipped_rows(tmp_path / "out", "valid")["b"]
    assert (
        row["reason"] == "malformed_row"
        and "line 3: a field of" in row["detail"]
        and "over the limit" in row["detail"]
    )
    assert stats["reconciled"] and stats["skipped"] == 1


def test_unclosed_quotes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A quote closed rows later silently merged them into one caption; one never closed made a
    parse error blamed on the line where the file ended. Now: the merged record is skipped naming
    the lines, and an unclosed quote stops the run naming the line it opens on."""
    root = tmp_path / "data"
    images = {f"{n}.jpg": jpeg_bytes(i) for i, n in enumerate("abcde")}
    _split(root, ["a,good", 'b,"opens here', "c,swallowed row", 'd,closes here"', "e,good"], images)
    stats = prepare_dataset(root, tmp_path / "out", color_policy="all", progress=False)["valid"]
    assert _manifest_ids(tmp_path / "out") == ["a", "e"]
    skipped = skipped_rows(tmp_path / "out", "valid")
    assert "quote opened on line 3 is closed only on line 5" in skipped["b"]["detail"]
    assert skipped["c"]["reason"] == skipped["d"]["reason"] == "no_caption"  # their images, accounted for
    assert stats["reconciled"]

    root2 = tmp_path / "data2"
    _split(root2, ["a,good", 'b,"never closed', "c,row", "d,row"], images)
    with pytest.raises(CsvError, match="line 3: the quote opened on line 3 is never closed"):
        prepare_dataset(root2, tmp_path / "out2", progress=False)
    assert main(["data", "prepare", str(root2), "--out", str(tmp_path / "out3")]) != 0
    err = capsys.readouterr().err
    assert "line 3" in err and "Traceback" not in err
