"""Data from where users have it: the Hub's parquet shards (images as bytes inside the rows) and the
Hub's imagefolder layout, read by `medcap data prepare` into the same manifests with the same colour
policies and the same accounting as the ROCOv2 release layout; `--split` for data without splits;
`medcap data to-datasets` back out.

The parquet files are written here by `datasets` (the Hub's own writer, for the good data) and by
pyarrow with the same schema (for rows `datasets` refuses to write: null or empty bytes), from the
phantom dataset and from images drawn here.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import datasets  # the hub extra, part of the test extra
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medcap.cli import main
from medcap.data.manifest import MANIFEST_COLUMNS, read_manifest
from medcap.data.phantoms.make import make_phantoms
from medcap.data.prepare import prepare_dataset
from medcap.data.rocov2 import LayoutError
from medcap.data.tables import MAX_FIELD_CHARS
from tests.data.test_bad_input import bomb_jpeg, jpeg_bytes, skipped_rows
from tests.hostile_inputs import progressive_jpeg_scan_bomb

HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def hub_features():
    from datasets import Features, Image, List, Value

    return Features(
        {
            "image": Image(),
            "image_id": Value("string"),
            "caption": Value("string"),
            "cui": List(Value("string")),
        }
    )


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom dataset in the ROCOv2 release layout (grey and colour images, ROCOv2 IDs)."""
    root = tmp_path_factory.mktemp("phantoms")
    make_phantoms(root, 36, 3, size_range=(64, 96), progress=False)
    return root


def write_hub_parquet(phantoms: Path, out: Path, train_shards: int = 2) -> Path:
    """The phantoms as the Hub's ROCOv2 copy: data/<split>-NNNNN-of-NNNNN.parquet written by datasets."""
    (out / "data").mkdir(parents=True)
    for split, hub in HUB_SPLITS.items():
        caps = _csv_rows(phantoms / f"{split}_captions.csv")
        concepts = dict(_csv_rows(phantoms / f"{split}_concepts.csv"))
        ds = datasets.Dataset.from_dict(
            {
                "image": [
                    {"bytes": (phantoms / split / f"{i}.jpg").read_bytes(), "path": f"{i}.jpg"}
                    for i, _ in caps
                ],
                "image_id": [i for i, _ in caps],
                "caption": [c for _, c in caps],
                "cui": [concepts[i].split(";") for i, _ in caps],
            },
            features=hub_features(),
        )
        shards = train_shards if split == "train" else 1
        for k in range(shards):
            ds.shard(shards, k, contiguous=True).to_parquet(
                str(out / "data" / f"{hub}-{k:05d}-of-{shards:05d}.parquet")
            )
    return out


@pytest.mark.parametrize("policy", ["stored-rgb", "true-color", "all"])
def test_hub_parquet_gives_the_release_layouts_manifests(phantoms: Path, tmp_path: Path, policy: str) -> None:
    hub = write_hub_parquet(phantoms, tmp_path / "hub")
    from_release = prepare_dataset(phantoms, tmp_path / "a", color_policy=policy, progress=False, workers=1)
    from_parquet = prepare_dataset(hub, tmp_path / "b", color_policy=policy, progress=False, workers=1)
    assert list(from_parquet) == ["train", "valid", "test"]  # the Hub's "validation" is medcap's valid
    for split in ("train", "valid", "test"):
        a, b = from_release[split], from_parquet[split]
        assert b["layout"] == "parquet" and b["reconciled"] and b["rows_in"] == a["rows_in"]
        assert b["skipped_by_reason"] == a["skipped_by_reason"] and b["policy_counts"] == a["policy_counts"]
        rows_a = read_manifest(tmp_path / "a" / split / "manifest.csv")
        rows_b = read_manifest(tmp_path / "b" / split / "manifest.csv")
        assert rows_a and len(rows_a) == len(rows_b)
        for ra, rb in zip(rows_a, rows_b, strict=True):
            # Everything but the file's place is the same (modality: from the concepts, which name it).
            assert {**vars(ra), "image": ""} == {**vars(rb), "image": ""}
            # The image is the parquet row's bytes, written inside the prepared folder.
            assert Path(rb.image).parent == (tmp_path / "b" / "images" / split).resolve()
            assert Path(rb.image).read_bytes() == Path(ra.image).read_bytes()
        assert {r["id"]: r["reason"] for r in skipped_rows(tmp_path / "b", split).values()} == {
            r["id"]: r["reason"] for r in skipped_rows(tmp_path / "a", split).values()
        }
    # ROCOv2's IDs: the default policy is the original recipe's, as for the release layout.
    auto = prepare_dataset(hub, tmp_path / "c", progress=False, workers=1)
    assert {st["color_policy"] for st in auto.values()} == {"stored-rgb"}


def _png(mode: str = "L", size: tuple[int, int] = (80, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, "PNG")
    return buf.getvalue()


def test_parquet_rows_with_bad_images_or_fields_are_skipped_with_their_reason(tmp_path: Path) -> None:
    """Bad bytes inside parquet rows meet the same checks as bad files: decode limits included."""
    good = jpeg_bytes(1, mode="L")
    rows = [
        ("grey", good, "a grey scan"),
        ("png", _png(), "a png"),
        ("empty", b"", "zero bytes"),
        ("cut", good[: len(good) // 2], "cut short"),
        ("text", b"this is not an image at all", "text bytes"),
        ("nobytes", None, "bytes missing"),
        ("grey", jpeg_bytes(2), "the same ID again"),
        (None, good, "no ID"),
        ("blank", good, "   "),
        ("scans", progressive_jpeg_scan_bomb(1024, 5_000), "a decoding-time bomb"),
        ("pixels", bomb_jpeg(30_000, 30_000), "a decompression bomb"),
        ("../../escape", good, "an ID that is no file name"),
        ("long", good, "x" * (MAX_FIELD_CHARS + 1)),
    ]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b, _ in rows], type=image_type),
            "image_id": pa.array([i for i, _, _ in rows], type=pa.string()),
            "caption": pa.array([c for _, _, c in rows], type=pa.string()),
        }
    )
    (tmp_path / "own").mkdir()
    pq.write_table(table, tmp_path / "own" / "mine.parquet")
    out = tmp_path / "out"
    st = prepare_dataset(tmp_path / "own" / "mine.parquet", out, progress=False, workers=1)["data"]
    assert st["color_policy"] == "all"  # not ROCOv2: every image is kept, grey included
    assert st["rows_in"] == len(rows) and st["reconciled"] and st["kept"] == 3
    assert st["skipped_by_reason"] == {
        "empty_file": 1,
        "truncated": 1,
        "unreadable": 1,
        "missing_image": 1,
        "duplicate_id": 1,
        "malformed_row": 2,
        "empty_caption": 1,
        "too_many_scans": 1,
        "too_many_pixels": 1,
    }
    kept = read_manifest(out / "data" / "manifest.csv")
    assert [r.id for r in kept] == ["grey", "png", "../../escape"]
    assert [Path(r.image).suffix for r in kept] == [".jpg", ".png", ".jpg"]
    images = (out / "images" / "data").resolve()
    assert all(Path(r.image).parent == images for r in kept)  # an ID is never a path
    assert {p.parent for p in out.rglob("*.jpg")} == {images}
    reasons = {(r["id"], r["reason"]) for r in skipped_rows(out, "data").values()}
    assert ("nobytes", "missing_image") in reasons and ("long", "malformed_row") in reasons


def test_parquet_layout_problems_stop_before_any_work(phantoms: Path, tmp_path: Path, capsys) -> None:
    hub = write_hub_parquet(phantoms, tmp_path / "hub", train_shards=2)
    (hub / "data" / "train-00001-of-00002.parquet").unlink()
    assert main(["data", "prepare", str(hub), "--out", str(tmp_path / "p"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "split 'train'" in err and "00001 of 00002 are missing" in err
    assert not (tmp_path / "p").exists()
    (hub / "data" / "train-00001-of-00002.parquet").write_bytes(b"PAR1 not really a parquet file")
    assert main(["data", "prepare", str(hub), "--out", str(tmp_path / "p"), "--no-progress"]) == 2
    assert "train-00001-of-00002.parquet is not a readable parquet file" in capsys.readouterr().err
    # Columns that are not the Hub's layout are named.
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"picture": [b"x"], "words": ["y"]}), bad)
    assert main(["data", "prepare", str(bad), "--out", str(tmp_path / "q"), "--no-progress"]) == 2
    assert "no image column" in capsys.readouterr().err


def _grey_folder(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"scan{i}.jpg").write_bytes(jpeg_bytes(i, mode="L"))


def test_own_greyscale_scans_are_kept_and_a_dropping_policy_is_loud(tmp_path: Path, capsys) -> None:
    """The issue's example: 6 greyscale scans with a captions CSV kept 0 of 6 with exit code 0."""
    _grey_folder(tmp_path / "my_greyscale_scans", 6)
    (tmp_path / "c.csv").write_text("ID,Caption\n" + "".join(f"scan{i},scan number {i}\n" for i in range(6)))
    base = [
        "data",
        "prepare",
        "--images",
        str(tmp_path / "my_greyscale_scans"),
        "--captions",
        str(tmp_path / "c.csv"),
    ]
    assert main([*base, "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "kept 6 + skipped 0" in captured.out and "colour policy all" in captured.out
    assert "WARNING" not in captured.err
    assert len(read_manifest(tmp_path / "p" / "data" / "manifest.csv")) == 6
    assert main(["data", "stats", str(tmp_path / "p"), "--no-plots"]) == 0  # the next command works

    assert main([*base, "--out", str(tmp_path / "q"), "--color-policy", "stored-rgb", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "WARNING: split data: the colour policy stored-rgb dropped 6 of the 6 readable images" in err
    assert "--color-policy all" in err and "no image kept" in err
    stats = json.loads((tmp_path / "q" / "data" / "stats.json").read_text())
    assert stats["warnings"] and stats["skipped_by_reason"] == {"color_policy": 6}


def test_imagefolder_csv_with_subfolders_and_bad_rows(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    _grey_folder(root, 3)
    _grey_folder(root / "more", 1)
    (root / "orphan.png").write_bytes(_png())
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes(9))
    (root / "metadata.csv").write_text(
        "file_name,text,source\n"
        "scan0.jpg,first scan,a\n"
        'scan1.jpg,"second, with a comma",b\n'
        "more/scan0.jpg,in a sub-folder,c\n"
        "../outside.jpg,leaves the folder,d\n"
        "missing.jpg,no such file,e\n"
        "scan2.jpg,an unquoted, comma,f\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    st = prepare_dataset(root, out, progress=False, workers=1)["data"]
    assert st["layout"] == "imagefolder" and st["color_policy"] == "all"
    assert st["rows_in"] == 7 and st["reconciled"]  # 6 metadata rows + the orphan
    # scan2.jpg is accounted for by its malformed row, orphan.png by no_caption.
    assert st["skipped_by_reason"] == {
        "outside_folder": 1,
        "missing_image": 1,
        "malformed_row": 1,
        "no_caption": 1,
    }
    rows = read_manifest(out / "data" / "manifest.csv")
    assert [(r.id, r.caption) for r in rows] == [
        ("scan0", "first scan"),
        ("scan1", "second, with a comma"),
        ("more/scan0", "in a sub-folder"),
    ]
    assert all(r.mode == "L" for r in rows)  # grey kept, converted when read


def test_imagefolder_jsonl_split_folders(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for split, n in (("train", 4), ("validation", 2)):
        _grey_folder(root / split, n)
        lines = [
            json.dumps({"file_name": f"scan{i}.jpg", "caption": f"{split} {i}", "cui": ["C0040405"]})
            for i in range(n)
        ]
        lines.insert(1, "{not json")
        lines.insert(2, json.dumps(["a", "list"]))
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    results = prepare_dataset(root, tmp_path / "out", progress=False, workers=1)
    assert list(results) == ["train", "valid"]
    for name, n in (("train", 4), ("valid", 2)):
        st = results[name]
        assert st["kept"] == n and st["skipped_by_reason"] == {"malformed_row": 2} and st["reconciled"]
        rows = read_manifest(tmp_path / "out" / name / "manifest.csv")
        assert rows[0].cuis == ["C0040405"] and rows[0].modality == "ct"
    with (tmp_path / "out" / "train" / "skipped.csv").open(encoding="utf-8", newline="") as f:
        details = [r["detail"] for r in csv.DictReader(f)]
    assert any("metadata.jsonl line 2: not valid JSON" in d for d in details)


def _manifest_ids(path: Path) -> list[str]:
    return [r.id for r in read_manifest(path)]


def test_split_divides_data_without_splits(tmp_path: Path, capsys) -> None:
    root = tmp_path / "folder"
    _grey_folder(root, 40)
    (root / "metadata.csv").write_text(
        "file_name,text\n" + "".join(f"scan{i}.jpg,scan {i}\n" for i in range(40)) + "gone.jpg,missing\n"
    )
    args = ["data", "prepare", str(root), "--split", "0.8,0.1,0.1", "--no-progress"]
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--seed", "2", "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    parts = {s: _manifest_ids(tmp_path / "a" / s / "manifest.csv") for s in ("train", "valid", "test")}
    assert [len(v) for v in parts.values()] == [32, 4, 4]
    assert sorted(sum(parts.values(), [])) == sorted(f"scan{i}" for i in range(40))
    stats = {s: json.loads((tmp_path / "a" / s / "stats.json").read_text()) for s in parts}
    assert all(st["reconciled"] for st in stats.values())
    assert sum(st["skipped"] for st in stats.values()) == 1  # the missing image, in one split
    assert sum(st["rows_in"] for st in stats.values()) == 41
    same = {s: _manifest_ids(tmp_path / "b" / s / "manifest.csv") for s in parts}
    other = {s: _manifest_ids(tmp_path / "c" / s / "manifest.csv") for s in parts}
    assert same == parts and other != parts
    # Data that has splits already is not divided again; bad fractions are named.
    write = main(["data", "prepare", str(root), "--split", "0.8,0.1", "--out", str(tmp_path / "d")])
    assert write == 2 and "must sum to 1" in capsys.readouterr().err


def test_split_refuses_data_with_splits(phantoms: Path, tmp_path: Path, capsys) -> None:
    assert main(["data", "prepare", str(phantoms), "--split", "0.8,0.2", "--out", str(tmp_path / "p")]) == 2
    assert "this data has 3: train, valid, test" in capsys.readouterr().err


def test_to_datasets_round_trips(phantoms: Path, tmp_path: Path, capsys) -> None:
    prep = tmp_path / "prep"
    prepare_dataset(phantoms, prep, color_policy="all", progress=False, workers=1)
    assert main(["data", "to-datasets", str(prep), "--out", str(tmp_path / "arrow")]) == 0
    loaded = datasets.load_from_disk(str(tmp_path / "arrow"))
    assert list(loaded) == ["train", "valid", "test"]
    for split in loaded:
        rows = read_manifest(prep / split / "manifest.csv")
        ds = loaded[split].cast_column("image", datasets.Image(decode=False))
        assert ds["image_id"] == [r.id for r in rows] and ds["caption"] == [r.caption for r in rows]
        assert ds["cui"] == [r.cuis for r in rows] and ds["true_color"] == [r.true_color for r in rows]
        assert [im["bytes"] for im in ds["image"]] == [Path(r.image).read_bytes() for r in rows]
    assert set(loaded["train"].features) == {"image", "image_id", "caption", "caption_raw", "cui"} | set(
        MANIFEST_COLUMNS[5:]
    )
    # The parquet format is the Hub's layout, which prepare reads again to the same manifests.
    assert main(["data", "to-datasets", str(prep), "--out", str(tmp_path / "pq"), "--format", "parquet"]) == 0
    assert (tmp_path / "pq" / "data" / "validation-00000-of-00001.parquet").is_file()
    again = prepare_dataset(
        tmp_path / "pq", tmp_path / "prep2", color_policy="all", progress=False, workers=1
    )
    for split, st in again.items():
        a = read_manifest(prep / split / "manifest.csv")
        b = read_manifest(tmp_path / "prep2" / split / "manifest.csv")
        assert st["kept"] == len(a) and [{**vars(r), "image": ""} for r in a] == [
            {**vars(r), "image": ""} for r in b
        ]
    assert main(["data", "to-datasets", str(prep), "--out", str(tmp_path / "arrow")]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(LayoutError, match="no prepared split"):
        from medcap.data.to_datasets import prepared_to_datasets

        prepared_to_datasets(tmp_path / "nothing", tmp_path / "x")
