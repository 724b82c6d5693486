"""Bad input for `medcap data prepare`: every case gets a clear reason, nothing crashes mid-run,
nothing is lost silently (rows in = kept + skipped in every split)."""

from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcap.cli import main
from medcap.data.images import read_image
from medcap.data.manifest import read_manifest
from medcap.data.prepare import prepare_dataset
from medcap.data.rocov2 import LayoutError
from medcap.data.tables import CsvError, read_captions


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    a = (128 + 90 * np.sin(x / (3 + seed % 5)) * np.cos(y / 4) + rng.normal(0, 5, (h, w))).clip(0, 255)
    im = Image.fromarray(a.astype("uint8"), "L")
    if mode != "L":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bomb_jpeg(width: int, height: int) -> bytes:
    """A tiny valid-looking JPEG whose header claims width x height (no pixels behind it)."""
    d = bytearray(jpeg_bytes(1))
    i = d.find(b"\xff\xc0")  # baseline SOF0: FF C0, length(2), precision(1), height(2), width(2)
    d[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(d)


def write_split(root: Path, split: str, captions: list[tuple[str, str]], header: str = "ID,Caption") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    with (root / f"{split}_captions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header.split(","))
        w.writerows(captions)


def skipped_rows(out: Path, split: str) -> dict[str, dict[str, str]]:
    with (out / split / "skipped.csv").open(encoding="utf-8", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def notes_rows(out: Path, split: str) -> list[dict[str, str]]:
    with (out / split / "notes.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """One split holding every kind of bad image and caption row, prepared once with 2 workers."""
    root = tmp_path_factory.mktemp("messy")
    img = root / "train"
    caps: list[tuple[str, str]] = []

    def add(rid: str, data: bytes | None, caption: str = "Axial CT of the abdomen.") -> None:
        if data is not None:
            (img / f"{rid}.jpg").write_bytes(data)
        caps.append((rid, caption))

    write_split(root, "train", [])
    good = jpeg_bytes(0)
    add("good", good)
    add("missing", None)  # caption row, no image file
    add("zero", b"")
    add("truncated", good[: len(good) // 2])
    add("cut_eoi", good[:-2])
    add("random", np.random.default_rng(1).bytes(3000))
    add("bad_header", good[:3] + np.random.default_rng(2).bytes(400) + good[403:])
    mid = bytearray(good)
    mid[len(good) // 2 : len(good) // 2 + 300] = np.random.default_rng(3).bytes(300)
    add("mid_damage", bytes(mid))
    add("bomb", bomb_jpeg(30000, 30000))
    buf = io.BytesIO()
    Image.open(io.BytesIO(good)).save(buf, "PNG")
    add("png_as_jpg", buf.getvalue())
    add("empty_caption", good, "")
    add("space_caption", good, " \u202f\t\n ")
    add("dup", good, "first")
    add("dup", good, "second")
    (img / "orphan.jpg").write_bytes(good)  # image, no caption row
    (img / "Thumbs.db").write_bytes(b"junk")  # not an image: ignored, counted in stats
    write_split(root, "train", caps)
    out = root / "prep"
    st = prepare_dataset(root, out, color_policy="all", workers=2, verify_decode=True, progress=False)[
        "train"
    ]
    return root, out, st


def test_messy_split_reconciles(messy):
    _, out, st = messy
    assert st["rows_in"] == 14 + 1 == st["kept"] + st["skipped"]  # 14 caption rows + 1 orphan image
    assert st["reconciled"]
    with (out / "train" / "skipped.csv").open(encoding="utf-8", newline="") as f:
        assert sum(1 for _ in csv.DictReader(f)) == st["skipped"]
    with (out / "train" / "manifest.csv").open(encoding="utf-8", newline="") as f:
        assert sum(1 for _ in csv.DictReader(f)) == st["kept"]
    assert st["sources"]["ignored_files"] == 1


@pytest.mark.parametrize(
    ("rid", "reason", "in_detail"),
    [
        ("missing", "missing_image", "no file"),
        ("orphan", "no_caption", "train_captions.csv"),
        ("zero", "empty_file", "0 bytes"),
        ("truncated", "truncated", "truncated"),
        ("cut_eoi", "truncated", "truncated"),
        ("random", "unreadable", "not a recognised image format"),
        ("bad_header", "corrupt", "JPEG"),
        ("mid_damage", "corrupt", "decode"),
        ("bomb", "too_many_pixels", "900,000,000 pixels"),
        ("empty_caption", "empty_caption", "''"),
        ("space_caption", "empty_caption", "\\u202f"),
        ("dup", "duplicate_id", "repeats the ID of line"),
    ],
)
def test_each_bad_item_has_its_reason(messy, rid, reason, in_detail):
    _, out, _ = messy
    row = skipped_rows(out, "train")[rid]
    assert row["reason"] == reason
    assert in_detail in row["detail"]


def test_duplicate_keeps_first_row(messy):
    _, out, _ = messy
    kept = {r.id: r for r in read_manifest(out / "train" / "manifest.csv")}
    assert kept["dup"].caption == "first"
    assert set(kept) == {"good", "png_as_jpg", "dup"}


def test_png_saved_as_jpg_is_kept_with_a_note(messy):
    """Decision: keep. Pillow reads by content, the pixels are intact, and load_image handles it;
    dropping it would lose a valid image. The mismatch is listed in notes.csv and stats.json."""
    _, out, st = messy
    note = [n for n in notes_rows(out, "train") if n["id"] == "png_as_jpg"]
    assert note and note[0]["note"] == "format_mismatch" and "PNG data in a .jpg file" in note[0]["detail"]
    assert st["notes_by_kind"]["format_mismatch"] == 1
    assert st["formats"] == {"JPEG": 2, "PNG": 1}
    row = next(r for r in read_manifest(out / "train" / "manifest.csv") if r.id == "png_as_jpg")
    assert read_image(row.image).size == (96, 72)


def test_pixel_limit_is_configurable(tmp_path):
    root = tmp_path / "ds"
    write_split(root, "valid", [("small", "x"), ("big", "y")])
    (root / "valid" / "small.jpg").write_bytes(jpeg_bytes(0, (40, 30)))
    (root / "valid" / "big.jpg").write_bytes(jpeg_bytes(0, (200, 150)))
    st = prepare_dataset(root, tmp_path / "out", max_pixels=10_000, progress=False, workers=1)["valid"]
    assert st["kept"] == 1 and st["skipped_by_reason"] == {"too_many_pixels": 1}
    assert "30,000 pixels > limit 10,000" in skipped_rows(tmp_path / "out", "valid")["big"]["detail"]


def _mode_images() -> dict[str, Image.Image]:
    grad = np.tile(np.arange(0, 250, 250 / 64).astype("uint8"), (48, 1))
    la = Image.merge("LA", [Image.fromarray(grad), Image.new("L", (64, 48), 255)])
    la.putpixel((0, 0), (200, 0))  # fully transparent pixel -> black after compositing
    p = Image.fromarray(grad).convert("P")
    i16 = Image.fromarray((grad.astype(np.uint16) * 100 + 1000).astype(np.uint16))
    cmyk = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # pure red in CMYK
    return {"la": la, "p": p, "i16": i16, "cmyk": cmyk}


def test_load_image_converts_modes_sensibly(tmp_path):
    ims = _mode_images()
    paths = {}
    for name, im in ims.items():
        paths[name] = tmp_path / f"{name}.{'jpg' if name == 'cmyk' else 'png'}"
        im.save(paths[name])
    with Image.open(paths["i16"]) as raw:
        assert raw.mode.startswith("I")  # really stored as 16-bit grey
    out = {k: read_image(p) for k, p in paths.items()}
    assert all(im.mode == "RGB" and im.size == (64, 48) for im in out.values())
    i16 = np.asarray(out["i16"])
    assert i16.min() == 0 and i16.max() == 255  # 16-bit range scaled to 8 bits
    assert (np.diff(i16[0, :, 0].astype(int)) >= 0).all()  # order of grey levels kept
    la = np.asarray(out["la"])
    assert tuple(la[0, 0]) == (0, 0, 0) and tuple(la[0, 63]) == tuple(la[0, 63, :1]) * 3
    r, g, b = np.asarray(out["cmyk"]).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60  # CMYK red stays red
    p = np.asarray(out["p"])
    assert (p[..., 0] == p[..., 1]).all() and p.max() > 200


def test_modes_prepare_and_color(tmp_path):
    root = tmp_path / "ds"
    ims = _mode_images()
    write_split(root, "test", [(k, f"{k} image") for k in ims])
    for name, im in ims.items():
        im.save(root / "test" / f"{name}.{'jpg' if name == 'cmyk' else 'png'}")
    st = prepare_dataset(root, tmp_path / "out", color_policy="all", progress=False, workers=1)["test"]
    assert st["kept"] == 4 and st["skipped"] == 0
    rows = {r.id: r for r in read_manifest(tmp_path / "out" / "test" / "manifest.csv")}
    assert rows["cmyk"].mode == "CMYK" and rows["cmyk"].true_color is True
    assert (
        rows["i16"].true_color is False and rows["la"].true_color is False and rows["p"].true_color is False
    )
    assert st["policy_counts"] == {"stored-rgb": 0, "true-color": 1, "all": 4}


def test_csv_with_bom_quotes_and_newlines(tmp_path):
    root = tmp_path / "ds"
    (root / "valid").mkdir(parents=True)
    for i in range(3):
        (root / "valid" / f"v{i}.jpg").write_bytes(jpeg_bytes(i))
    text = (
        "ID,Caption\r\n"
        'v0,"CT, axial, with contrast"\r\n'
        'v1,"Line one\nline two, ""quoted"""\r\n'
        "v2,plain caption\r\n"
    )
    (root / "valid_captions.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    st = prepare_dataset(root, tmp_path / "out", color_policy="all", progress=False, workers=1)["valid"]
    assert st["sources"]["captions"]["bom"] is True
    rows = {r.id: r for r in read_manifest(tmp_path / "out" / "valid" / "manifest.csv")}
    assert set(rows) == {"v0", "v1", "v2"}  # the BOM did not eat the first column's name
    assert rows["v0"].caption == "CT, axial, with contrast"
    assert rows["v1"].caption_raw == 'Line one\nline two, "quoted"'
    assert rows["v1"].caption == 'Line one line two, "quoted"'


def test_csv_with_non_utf8_bytes_names_file_and_line(tmp_path, capsys):
    root = tmp_path / "ds"
    (root / "valid").mkdir(parents=True)
    for i in range(3):
        (root / "valid" / f"v{i}.jpg").write_bytes(jpeg_bytes(i))
    # cp1252 bytes: o-umlaut and curly quotes are not valid UTF-8
    raw = b'ID,Caption\nv0,fine\nv1,"Sj\xf6gren syndrome, \x93quoted\x94"\nv2,ok\n'
    (root / "valid_captions.csv").write_bytes(raw)
    with pytest.raises(CsvError) as e:
        read_captions(root / "valid_captions.csv")
    msg = str(e.value)
    assert "valid_captions.csv, line 3" in msg and "--encoding" in msg
    # the CLI says the same, exit code 2, no traceback
    rc = main(["data", "prepare", str(root), "--out", str(tmp_path / "o1"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "line 3" in err and "Traceback" not in err
    # documented fallback: replace undecodable bytes, count the rows, list them in notes.csv
    st = prepare_dataset(
        root, tmp_path / "o2", encoding_errors="replace", color_policy="all", progress=False, workers=1
    )["valid"]
    assert st["kept"] == 3
    assert st["sources"]["captions"]["records_with_replaced_bytes"] == 1
    assert st["sources"]["captions"]["replaced_bytes"] == 3
    assert [n["id"] for n in notes_rows(tmp_path / "o2", "valid") if n["note"] == "decode_replaced"] == ["v1"]
    # or the real encoding
    st = prepare_dataset(
        root, tmp_path / "o3", encoding="cp1252", color_policy="all", progress=False, workers=1
    )
    rows = {r.id: r for r in read_manifest(tmp_path / "o3" / "valid" / "manifest.csv")}
    assert rows["v1"].caption == "Sjögren syndrome, \u201cquoted\u201d"


def test_malformed_rows(tmp_path):
    root = tmp_path / "ds"
    (root / "valid").mkdir(parents=True)
    for i in range(2):
        (root / "valid" / f"v{i}.jpg").write_bytes(jpeg_bytes(i))
    (root / "valid_captions.csv").write_text("ID,Caption\nv0,unquoted, comma\n,no id\nv1,ok\n")
    st = prepare_dataset(root, tmp_path / "out", color_policy="all", progress=False, workers=1)["valid"]
    assert st["rows_in"] == 3 and st["kept"] == 1
    assert st["skipped_by_reason"] == {"malformed_row": 2}
    # v0's image is then an image without a usable caption row: it is in skipped.csv once, as malformed
    assert st["orphan_images"] == 0


def test_missing_captions_csv_stops_at_once(tmp_path, capsys):
    root = tmp_path / "ds"
    write_split(root, "train", [("t0", "caption")])
    (root / "train" / "t0.jpg").write_bytes(jpeg_bytes(0))
    (root / "valid").mkdir()  # images folder present, captions CSV missing
    out = tmp_path / "out"
    rc = main(["data", "prepare", str(root), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(root / "valid_captions.csv") in err and "Expected one of these layouts" in err
    assert "Traceback" not in err
    assert not (out / "train" / "manifest.csv").exists()  # stopped before any split was processed
    with pytest.raises(LayoutError):
        prepare_dataset(root, out, splits=["test"], progress=False)
    # plain layout: the missing CSV is named too
    rc = main(
        [
            "data",
            "prepare",
            "--images",
            str(root / "train"),
            "--captions",
            str(root / "nope.csv"),
            "--out",
            str(out),
        ]
    )
    assert rc == 2 and "nope.csv" in capsys.readouterr().err


def test_empty_root_names_expected_layout(tmp_path, capsys):
    rc = main(["data", "prepare", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "train_captions.csv" in err and "ROOT/{split}_captions.csv" in err


def test_stats_json_is_valid_and_lists_reasons(messy):
    _, out, st = messy
    saved = json.loads((out / "train" / "stats.json").read_text(encoding="utf-8"))
    assert saved["skipped_by_reason"] == st["skipped_by_reason"]
    assert sum(saved["skipped_by_reason"].values()) == saved["skipped"]


def test_semicolon_csv_from_a_spreadsheet(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(jpeg_bytes(0))
    cap = tmp_path / "caps.csv"
    cap.write_bytes("ID;Caption\r\na;Röntgen thorax, p.a.\r\n".encode())
    st = prepare_dataset(None, tmp_path / "out", images=imgs, captions=cap, progress=False, workers=1)["data"]
    assert st["sources"]["captions"]["delimiter"] == ";" and st["kept"] == 1
    assert read_manifest(tmp_path / "out" / "data" / "manifest.csv")[0].caption == "Röntgen thorax, p.a."
