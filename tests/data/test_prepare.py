"""`medcap data prepare` and `medcap data stats` on generated images with real ROCOv2 captions.

Images are drawn here with Pillow; captions and concepts are the real ROCOv2 validation files in
../shared/data/rocov2-valid/ (tests that need them skip where that folder is absent).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from medcap.data import inspect as inspect_module
from medcap.data.images import read_image
from medcap.data.manifest import MANIFEST_COLUMNS, modality_from_cuis, read_manifest
from medcap.data.prepare import prepare_dataset
from medcap.data.tables import clean_caption
from tests.fixtures import skip_missing

SHARED = Path(__file__).resolve().parents[3] / "shared"
VALID = SHARED / "data" / "rocov2-valid"


def grey_array(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth grey picture (JPEG-friendly) that differs per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    return (128 + 100 * np.cos(np.hypot(x - cx, y - cy) / rng.uniform(4, 9))).clip(0, 255).astype("uint8")


def make_image(path: Path, kind: str, seed: int = 0, size: tuple[int, int] = (128, 96)) -> None:
    """kind: L (one channel), grey-rgb (grey stored as RGB), color (a colour picture),
    arrow (grey stored as RGB with a small blue arrow)."""
    w, h = size
    a = grey_array(seed, h, w)
    if kind == "L":
        im = Image.fromarray(a, "L")
    elif kind == "grey-rgb":
        im = Image.fromarray(a, "L").convert("RGB")
    elif kind == "color":
        im = Image.fromarray(np.stack([a, 255 - a, a // 3], axis=-1), "RGB")
    elif kind == "arrow":
        im = Image.fromarray(a, "L").convert("RGB")
        ImageDraw.Draw(im).line([(w // 2, h // 2), (w // 2 + 6, h // 2 + 4)], fill=(30, 60, 255), width=2)
    else:
        raise ValueError(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=88)


def real_rows(n: int) -> list[tuple[str, str]]:
    with (VALID / "valid_captions.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    picked = rows[:n]
    ids = {r[0] for r in picked}
    picked += [r for r in rows if r[1][:1] == " " and r[0] not in ids][:20]  # leading-space captions
    picked += [r for r in rows if r[0] == "ROCOv2_2023_valid_003902"]  # caption is only U+202F
    return [(r[0], r[1]) for r in picked]


@pytest.fixture(scope="module")
def real_valid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """ROCOv2 release layout: real valid CSVs, images generated for ~320 of the IDs."""
    if not (VALID / "valid_captions.csv").is_file():
        skip_missing(f"real ROCOv2 captions not found at {VALID} (a user's clone has no ../shared)")
    root = tmp_path_factory.mktemp("rocov2")
    rows = real_rows(300)
    kinds = ["L", "grey-rgb", "color", "arrow"]
    for k, (rid, _) in enumerate(rows):
        make_image(root / "valid" / f"{rid}.jpg", kinds[k % 4], seed=k)
    for name in ("valid_captions.csv", "valid_concepts.csv", "valid_concepts_manual.csv"):
        shutil.copy(VALID / name, root / name)
    return root, rows


def test_real_captions_prepare_reconciles(real_valid, tmp_path):
    root, rows = real_valid
    out = tmp_path / "prep"
    stats = prepare_dataset(root, out, color_policy="all", workers=2, progress=False)["valid"]
    n_csv = 9904
    assert stats["rows_in"] == n_csv == stats["kept"] + stats["skipped"]
    assert stats["reconciled"] is True
    # every real row without a generated image is reported, not dropped silently
    assert stats["skipped_by_reason"]["missing_image"] == n_csv - len(rows)
    assert stats["skipped_by_reason"]["empty_caption"] == 1
    assert stats["kept"] == len(rows) - 1
    with (out / "valid" / "skipped.csv").open(encoding="utf-8", newline="") as f:
        skipped = list(csv.DictReader(f))
    assert len(skipped) == stats["skipped"]
    empty = [r for r in skipped if r["reason"] == "empty_caption"]
    assert empty[0]["id"] == "ROCOv2_2023_valid_003902" and "\\u202f" in empty[0]["detail"]

    kept = read_manifest(out / "valid" / "manifest.csv")
    by_id = {r.id: r for r in kept}
    raw = dict(rows)
    lead = [rid for rid, cap in rows if cap[:1] == " "]
    assert len(lead) >= 10
    for rid in lead:
        assert by_id[rid].caption_raw == raw[rid]  # raw kept exactly
        assert by_id[rid].caption == " ".join(raw[rid].split()) and not by_id[rid].caption[0].isspace()
    # modality follows concepts_manual
    with (VALID / "valid_concepts_manual.csv").open(encoding="utf-8", newline="") as f:
        manual = {r[0]: r[1].split(";") for r in list(csv.reader(f))[1:]}
    for r in kept:
        assert r.modality == modality_from_cuis(manual[r.id])
    assert stats["modality"]["ct"] == sum(r.modality == "ct" for r in kept) > 0
    # colour: 4 kinds cycle -> L, grey-rgb, colour, grey+arrow
    kinds = {rid: ["L", "grey-rgb", "color", "arrow"][k % 4] for k, (rid, _) in enumerate(rows)}
    for r in kept:
        assert r.true_color is (kinds[r.id] == "color"), (r.id, kinds[r.id])
        assert r.mode == ("L" if kinds[r.id] == "L" else "RGB")
    pc = stats["policy_counts"]
    assert pc["all"] == stats["kept"]
    assert pc["stored-rgb"] == sum(k != "L" for rid, k in kinds.items() if rid in by_id)
    assert pc["true-color"] == sum(k == "color" for rid, k in kinds.items() if rid in by_id)
    assert stats["color"]["grey_with_color_marks"] == sum(
        k == "arrow" for rid, k in kinds.items() if rid in by_id
    )
    assert stats["id_scheme"] == "rocov2"
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["totals"] == {"rows_in": n_csv, "kept": stats["kept"], "skipped": stats["skipped"]}


@pytest.mark.parametrize("policy", ["stored-rgb", "true-color"])
def test_policies_on_real_subset(real_valid, tmp_path, policy):
    root, rows = real_valid
    st = prepare_dataset(root, tmp_path / "p", color_policy=policy, workers=1, progress=False)["valid"]
    expected = st["policy_counts"][policy]
    assert st["kept"] == expected > 0
    assert st["skipped_by_reason"]["color_policy"] == st["policy_counts"]["all"] - expected
    kept = read_manifest(tmp_path / "p" / "valid" / "manifest.csv")
    if policy == "stored-rgb":
        assert all(r.mode == "RGB" for r in kept)
        assert all(r.true_color is None for r in kept)  # fast path: colour not measured
        assert st["policy_counts"]["true-color"] is None
    else:
        assert all(r.true_color for r in kept)


def test_stored_rgb_reads_headers_only(tmp_path, monkeypatch):
    """The stored-rgb fast path must not decode pixel data of intact files."""
    root = tmp_path / "ds"
    for i, kind in enumerate(["L", "grey-rgb", "color"] * 3):
        make_image(root / "train" / f"img{i}.jpg", kind, seed=i)
    (root / "train_captions.csv").write_text(
        "ID,Caption\n" + "".join(f"img{i},a caption {i}\n" for i in range(9))
    )

    def boom(*a, **k):
        raise AssertionError("decoded an image on the stored-rgb fast path")

    monkeypatch.setattr(inspect_module, "_reduced_decode", boom)
    st = prepare_dataset(root, tmp_path / "out", color_policy="stored-rgb", workers=1, progress=False)[
        "train"
    ]
    assert st["kept"] == 6 and st["skipped_by_reason"] == {"color_policy": 3}


def test_true_color_definition(tmp_path):
    """Grey stored as RGB (JPEG noise), grey with a coloured arrow, and a real colour image."""
    root = tmp_path / "ds"
    kinds = {"grey": "grey-rgb", "arrow": "arrow", "color": "color", "mono": "L"}
    for name, kind in kinds.items():
        make_image(root / "test" / f"{name}.jpg", kind, seed=3, size=(640, 512))
    # a Doppler-like overlay: colour over ~8% of a grey picture is colour content
    a = grey_array(5, 512, 640)
    im = Image.fromarray(a, "L").convert("RGB")
    ImageDraw.Draw(im).ellipse([250, 200, 420, 360], fill=(220, 30, 30))
    im.save(root / "test" / "doppler.jpg", quality=85)
    ids = [*kinds, "doppler"]
    (root / "test_captions.csv").write_text("ID,Caption\n" + "".join(f"{i},x\n" for i in ids))
    prepare_dataset(root, tmp_path / "out", color_policy="all", workers=1, progress=False)
    rows = {r.id: r for r in read_manifest(tmp_path / "out" / "test" / "manifest.csv")}
    assert {i: rows[i].true_color for i in ids} == {
        "grey": False,
        "arrow": False,
        "color": True,
        "mono": False,
        "doppler": True,
    }
    st = json.loads((tmp_path / "out" / "test" / "stats.json").read_text())
    assert st["color"]["grey_stored_as_rgb"] == 2 and st["color"]["grey_with_color_marks"] == 1


def test_clean_caption():
    assert clean_caption("\u202f") == ""
    assert (
        clean_caption(" \t Axial CT\u00a0image,\n\n showing\u2009mass \u200b")
        == "Axial CT image, showing mass"
    )
    assert clean_caption("of\u200b\u200bliver") == "ofliver"  # zero-width characters are invisible


def test_modality_mapping():
    assert modality_from_cuis(["C0040405", "C0817096"]) == "ct"
    assert modality_from_cuis(["C0032743"]) == "pet"
    assert modality_from_cuis(["C0817096"]) == "other"
    assert modality_from_cuis([]) == "other"
    assert modality_from_cuis(None) == "unknown"


def test_imageclef_2025_split_folder_layout(tmp_path):
    root = tmp_path / "ic2025"
    ids = [f"ImageCLEFmedical_Caption_2025_valid_{i}" for i in range(5)]
    for i, rid in enumerate(ids):
        make_image(root / "valid" / "images" / f"{rid}.jpg", "grey-rgb", seed=i)
    (root / "valid" / "captions.csv").write_text(
        "ID,Caption\n" + "".join(f'{rid},"CT of the chest, case {k}"\n' for k, rid in enumerate(ids))
    )
    (root / "valid" / "concepts_manual.csv").write_text("ID,CUIs\n" + "".join(f"{r},C0040405\n" for r in ids))
    st = prepare_dataset(root, tmp_path / "out", progress=False)["valid"]
    assert st["layout"] == "imageclef-split-folder" and st["id_scheme"] == "imageclefmedical-2025"
    assert st["kept"] == 5 and st["modality"]["ct"] == 5
    assert read_manifest(tmp_path / "out" / "valid" / "manifest.csv")[2].caption == "CT of the chest, case 2"


def test_imageclef_2024_ids_in_release_layout(tmp_path):
    root = tmp_path / "ic2024"
    ids = [f"ImageCLEFmedical_Caption_2024_train_{i:06d}" for i in range(1, 4)]
    for i, rid in enumerate(ids):
        make_image(root / "train_images" / f"{rid}.jpg", "L", seed=i)  # folder named like the zip
    (root / "train_captions.csv").write_text("ID,Caption\n" + "".join(f"{r},MRI brain\n" for r in ids))
    st = prepare_dataset(root, tmp_path / "out", color_policy="all", progress=False)["train"]
    assert st["id_scheme"] == "imageclefmedical-2024" and st["kept"] == 3
    assert st["modality"]["unknown"] == 3  # no concepts_manual file: modality unknown, not guessed


def test_imageclef_2023_tab_separated(tmp_path):
    root = tmp_path / "ic2023"
    ids = [f"ImageCLEFmedical_Caption_2023_valid_{i:06d}" for i in range(1, 4)]
    for i, rid in enumerate(ids):
        make_image(root / "valid" / f"{rid}.jpg", "grey-rgb", seed=i)
    (root / "ImageCLEFmedical_Caption_2023_caption_prediction_valid_labels.csv").write_text(
        "ID\tcaption\n" + "".join(f"{r}\tUltrasound, left kidney\n" for r in ids)
    )
    (root / "ImageCLEFmedical_Caption_2023_concept_detection_valid_labels.csv").write_text(
        "ID\tcuis\n" + "".join(f"{r}\tC0041618;C0022646\n" for r in ids)
    )
    st = prepare_dataset(root, tmp_path / "out", progress=False)["valid"]
    assert st["layout"] == "imageclef-2023" and st["sources"]["captions"]["delimiter"] == "\t"
    rows = read_manifest(tmp_path / "out" / "valid" / "manifest.csv")
    assert [r.caption for r in rows] == ["Ultrasound, left kidney"] * 3
    assert rows[0].cuis == ["C0041618", "C0022646"]


def test_plain_folder_and_csv(tmp_path):
    imgs = tmp_path / "mine"
    make_image(imgs / "a.jpg", "grey-rgb", 1)
    Image.fromarray(grey_array(2)).save(imgs / "b.png")
    make_image(imgs / "c.jpeg", "color", 3)
    (imgs / "notes.txt").write_text("not an image")
    cap = tmp_path / "caps.csv"
    cap.write_text("ID,Caption\na.jpg,first\nb,second\nc,third\n")  # with and without extension
    st = prepare_dataset(
        None,
        tmp_path / "out",
        images=imgs,
        captions=cap,
        split_name="mine",
        color_policy="all",
        progress=False,
    )["mine"]
    assert st["kept"] == 3 and st["layout"] == "plain" and st["sources"]["ignored_files"] == 1
    rows = read_manifest(tmp_path / "out" / "mine" / "manifest.csv")
    assert [Path(r.image).name for r in rows] == ["a.jpg", "b.png", "c.jpeg"]
    assert [r.id for r in rows] == ["a.jpg", "b", "c"]
    assert all(read_image(r.image).mode == "RGB" for r in rows)


def test_cli_prepare_and_stats(tmp_path, capsys):
    from medcap.cli import main

    root = tmp_path / "ds"
    for split, n in (("train", 6), ("valid", 3)):
        for i in range(n):
            make_image(root / split / f"{split}{i}.jpg", ["L", "color", "grey-rgb"][i % 3], seed=i)
        (root / f"{split}_captions.csv").write_text(
            "ID,Caption\n" + "".join(f"{split}{i},{' word' * (3 + 4 * i)}\n" for i in range(n))
        )
        (root / f"{split}_concepts_manual.csv").write_text(
            "ID,CUIs\n"
            + "".join(f"{split}{i},{['C0040405', 'C1306645', 'C0024485'][i % 3]}\n" for i in range(n))
        )
    out = tmp_path / "prep"
    rc = main(["data", "prepare", str(root), "--out", str(out), "--color-policy", "all", "--no-progress"])
    assert rc == 0
    assert "train: rows in 6 = kept 6 + skipped 0" in capsys.readouterr().out
    for split in ("train", "valid"):
        for f in ("manifest.csv", "skipped.csv", "notes.csv", "stats.json"):
            assert (out / split / f).is_file()
        with (out / split / "manifest.csv").open() as fh:
            assert next(csv.reader(fh)) == MANIFEST_COLUMNS
    rc = main(["data", "stats", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "train" in text and "valid" in text and "stored-rgb" in text and "p90" in text
    assert "total" in text and "xray" in text
    for png in ("caption_length_hist.png", "modality_bars.png"):
        p = out / "plots" / png
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG"
        with Image.open(p) as im:
            assert im.size[0] > 400


def test_stats_on_missing_folder(tmp_path, capsys):
    from medcap.cli import main

    assert main(["data", "stats", str(tmp_path)]) == 2
    assert "prepare.json" in capsys.readouterr().err


def test_prepare_phantoms(tmp_path):
    """The built-in phantom dataset prepares cleanly, and what prepare reads from the files
    (modality from concepts_manual, stored mode, colour) agrees with how each image was drawn."""
    from medcap.data import phantoms

    root = tmp_path / "ph"
    phantoms.make_phantoms(root, 30, seed=7, size_range=(300, 400), progress=False)
    out = tmp_path / "prep"
    stats = prepare_dataset(root, out, color_policy="all", workers=1, progress=False)
    assert set(stats) == {"train", "valid", "test"}
    for split, st in stats.items():
        assert st["reconciled"] and st["skipped"] == 0 and st["kept"] == st["rows_in"] > 0
        with (root / f"{split}_phantom_facts.csv").open(encoding="utf-8", newline="") as f:
            facts = {r["ID"]: r for r in csv.DictReader(f)}
        for r in read_manifest(out / split / "manifest.csv"):
            fact = facts[r.id]
            assert r.modality == fact["modality"]
            assert r.mode == fact["stored_mode"]
            if fact["doppler"] == "1":
                assert r.true_color is True  # a colour Doppler overlay is colour content
            if fact["arrow"] in ("", "white") and fact["doppler"] == "0":
                assert r.true_color is False  # grey, whether stored as L or RGB


def test_stored_rgb_with_check_color_reports_every_policy(tmp_path, capsys):
    from medcap.cli import main

    root = tmp_path / "ds"
    kinds = ["L", "grey-rgb", "color", "arrow"]
    for i, kind in enumerate(kinds):
        make_image(root / "test" / f"t{i}.jpg", kind, seed=i)
    (root / "test_captions.csv").write_text("ID,Caption\n" + "".join(f"t{i},caption {i}\n" for i in range(4)))
    out = tmp_path / "out"
    assert main(["data", "prepare", str(root), "--out", str(out), "--check-color", "--no-progress"]) == 0
    st = json.loads((out / "test" / "stats.json").read_text())
    assert st["policy_counts"] == {"stored-rgb": 3, "true-color": 1, "all": 4}
    assert [r.true_color for r in read_manifest(out / "test" / "manifest.csv")] == [False, True, False]
    capsys.readouterr()
    assert main(["data", "stats", str(out), "--no-plots"]) == 0
    assert "colour not measured" not in capsys.readouterr().out  # all three policies have numbers
