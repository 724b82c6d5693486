"""The phantom dataset: ROCOv2 layout, determinism, image modes, captions that parse back to the
drawing parameters, held-out combinations, and facts that are visible in the pixels."""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcap.cli.data import cmd_phantoms as cli
from medcap.data.phantoms import caption_facts, fact_accuracy, is_held_out, make_phantoms, phantom_facts
from medcap.data.phantoms import design as phantoms
from medcap.data.phantoms.design import (
    CUI_NAMES,
    DESIGN,
    FINDING_CUI,
    HELD_OUT_RULES,
    MODALITY_CUI,
    REGION_CUI,
    SIDE_CUI,
    SPLITS,
    compose_caption,
)
from medcap.data.phantoms.draw import render_phantom
from medcap.data.phantoms.make import plan_phantoms

N = 48  # small but enough for every split to hold held-out rows and all three stored modes
FACTS = ("modality", "plane", "region", "finding", "side", "size")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms") / "ds"
    make_phantoms(out, N, seed=7, progress=False)
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- layout and CSV format


def test_layout_is_exactly_rocov2(dataset: Path) -> None:
    for split in SPLITS:
        caps = _rows(dataset / f"{split}_captions.csv")
        assert caps, split
        ids = [r["ID"] for r in caps]
        assert len(set(ids)) == len(ids)
        for image_id in ids:
            assert re.fullmatch(rf"ROCOv2_2023_{split}_\d{{6}}", image_id)
            assert (dataset / split / f"{image_id}.jpg").is_file()
        assert sorted(p.stem for p in (dataset / split).iterdir()) == sorted(ids)
        for kind in ("concepts", "concepts_manual"):
            rows = _rows(dataset / f"{split}_{kind}.csv")
            assert [r["ID"] for r in rows] == ids
            assert all(re.fullmatch(r"C\d{7}(;C\d{7})*", r["CUIs"]) for r in rows)
    first_lines = {
        **{f"{s}_captions.csv": "ID,Caption" for s in SPLITS},
        **{f"{s}_concepts.csv": "ID,CUIs" for s in SPLITS},
        **{f"{s}_concepts_manual.csv": "ID,CUIs" for s in SPLITS},
        "cui_mapping.csv": "CUI,Canonical name",
    }
    for name, header in first_lines.items():
        raw = (dataset / name).read_bytes()
        assert not raw.startswith(b"\xef\xbb\xbf"), f"{name} has a BOM"
        assert b"\r" not in raw, f"{name} has CR line ends"
        text = raw.decode("utf-8")
        assert text.split("\n", 1)[0] == header
        assert text.endswith("\n") and not text.endswith("\n\n")


def test_captions_are_quoted_only_where_needed(dataset: Path) -> None:
    lines = (dataset / "train_captions.csv").read_text(encoding="utf-8").splitlines()[1:]
    rows = _rows(dataset / "train_captions.csv")
    assert any("," in r["Caption"] for r in rows), "templates should produce some captions with commas"
    for line, row in zip(lines, rows, strict=True):
        quoted = line.split(",", 1)[1].startswith('"')
        assert quoted == ("," in row["Caption"] or '"' in row["Caption"]), line


def test_images_are_jpegs_of_rocov2_like_sizes_and_mixed_modes(dataset: Path) -> None:
    modes = Counter()
    aspects = []
    for split in SPLITS:
        truth = phantom_facts(dataset, split)
        for image_id, t in truth.items():
            raw = (dataset / split / f"{image_id}.jpg").read_bytes()
            assert raw[:3] == b"\xff\xd8\xff"
            im = Image.open(io.BytesIO(raw))
            assert im.format == "JPEG"
            assert im.size == (int(t["width"]), int(t["height"]))
            assert 500 <= im.width <= 1000 and 500 <= im.height <= 1000
            aspects.append(im.width / im.height)
            assert im.mode == t["stored_mode"]
            if im.mode == "L":
                modes["L"] += 1
                continue
            im.draft("RGB", (im.width // 2, im.height // 2))  # decode at half size: 4x faster
            arr = np.asarray(im, dtype=np.int16)
            coloured = (arr.max(axis=2) - arr.min(axis=2)) > 60
            if t["true_color"] == "1":  # colour Doppler: colour is a real part of the picture
                modes["colour"] += 1
                assert coloured.mean() > 0.01, f"{image_id}: true colour on {coloured.mean():.2%} of pixels"
            elif t["color_marks"] == "1":  # a coloured arrow on a grey picture
                modes["marks"] += 1
                assert 100 < coloured.sum() and coloured.mean() < 0.01, f"{image_id}: {coloured.mean():.2%}"
            else:
                modes["grey RGB"] += 1
                spread = arr.max(axis=2) - arr.min(axis=2)
                assert np.percentile(spread, 99.9) <= 8, f"{image_id}: grey RGB but channels differ"
    assert modes["L"] and modes["grey RGB"] and modes["colour"] and modes["marks"], modes
    assert min(aspects) < 0.95 and max(aspects) > 1.05, "aspect ratios should vary"


# ---------------------------------------------------------------- determinism


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    make_phantoms(tmp_path / "a", 10, seed=3, progress=False)
    make_phantoms(tmp_path / "b", 10, seed=3, progress=False)
    make_phantoms(tmp_path / "c", 10, seed=4, progress=False)
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["train_captions.csv"] != c["train_captions.csv"]
    assert a["train/ROCOv2_2023_train_000001.jpg"] != c["train/ROCOv2_2023_train_000001.jpg"]


def test_rerun_with_same_options_reuses_and_other_options_need_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    first = make_phantoms(out, 6, seed=1, progress=False)
    assert first["reused"] is False
    assert make_phantoms(out, 6, seed=1, progress=False)["reused"] is True
    next((out / "train").glob("*.jpg")).unlink()  # an incomplete dataset is not reused
    with pytest.raises(FileExistsError, match="overwrite"):
        make_phantoms(out, 6, seed=1, progress=False)
    assert make_phantoms(out, 6, seed=1, overwrite=True, progress=False)["reused"] is False
    with pytest.raises(FileExistsError, match="overwrite"):
        make_phantoms(out, 7, seed=1, progress=False)
    summary = make_phantoms(out, 7, seed=1, overwrite=True, progress=False)
    assert sum(s["images"] for s in summary["splits"].values()) == 7
    assert sum(1 for _ in out.rglob("*.jpg")) == 7
    other = tmp_path / "not_ours"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not made by"):
        make_phantoms(other, 6, seed=1, overwrite=True, progress=False)
    assert (other / "precious.txt").exists()


# ---------------------------------------------------------------- captions and facts


def test_captions_parse_back_to_the_drawing_parameters(dataset: Path) -> None:
    for split in SPLITS:
        truth = phantom_facts(dataset, split)
        for row in _rows(dataset / f"{split}_captions.csv"):
            parsed = caption_facts(row["Caption"])
            want = truth[row["ID"]]
            for fact in FACTS:
                assert (parsed[fact] or "") == want[fact], (fact, row["Caption"], want)


def _design_combinations():
    for modality, regions in DESIGN.items():
        for region, findings in regions.items():
            for finding in findings:
                for plane in phantoms._planes(modality, region, finding):
                    yield modality, region, finding, plane


def test_caption_facts_on_every_design_combination_and_wording() -> None:
    """Every (modality, region, finding, plane, side, size, template, wording) the generator can
    write parses back, also after the official preprocessing (lowercase, digits -> "number", no
    punctuation; the size is lost there)."""
    base = plan_phantoms(20, seed=11)["train"][0][1]
    punctuation = re.compile(r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]")
    for (modality, region, finding, plane), side, size, template, wording in itertools.product(
        _design_combinations(), ("left", "right"), ("small", "large"), range(3), range(2)
    ):
        p = phantoms.PhantomParams(
            **{
                **base.__dict__,
                "modality": modality,
                "region": region,
                "finding": finding,
                "side": side,
                "plane": plane,
                "template": template,
                "wording": wording,
                "arrow": "red" if template == 1 else None,
                "doppler": modality == "ultrasound" and wording == 1,
                "organ": phantoms._organ(modality, region, finding),
                **phantoms._size_fields(modality, region, finding, size),
            }
        )
        text = compose_caption(p)
        got = caption_facts(text)
        for fact in FACTS:
            assert got[fact] == getattr(p, fact), (fact, text)
        crude = punctuation.sub("", re.sub(r"\d+", "number", text.lower()))
        got = caption_facts(crude)
        for fact in ("modality", "plane", "region", "finding", "side"):
            assert got[fact] == getattr(p, fact), (fact, crude)


def test_caption_facts_edge_cases() -> None:
    none = caption_facts("")
    assert all(v is None for v in none.values())
    assert caption_facts("xray of both knees, fracture of the left tibia")["modality"] == "xray"
    assert caption_facts("X ray chest")["modality"] == "xray"
    assert caption_facts("chest radiograph with a mass")["modality"] == "xray"
    assert caption_facts("mr image of the brain")["modality"] == "mri"
    assert caption_facts("sonogram of the neck")["modality"] == "ultrasound"
    assert caption_facts("a mass in the left and right lung")["side"] is None
    assert caption_facts("CT of the head showing a 2.5 cm mass")["size"] == "small"
    assert caption_facts("CT of the head showing a 3.5 cm mass")["size"] == "large"
    assert caption_facts("DSA of the head showing a 2 cm aneurysm")["size"] == "large"  # 20 mm vs 12/25
    assert caption_facts("a 5 cm mass")["size"] is None  # no modality/region: no size class


def test_concept_csvs_match_the_facts(dataset: Path) -> None:
    mapping = {r["CUI"]: r["Canonical name"] for r in _rows(dataset / "cui_mapping.csv")}
    assert mapping == CUI_NAMES
    for split in SPLITS:
        truth = phantom_facts(dataset, split)
        manual = {r["ID"]: r["CUIs"].split(";") for r in _rows(dataset / f"{split}_concepts_manual.csv")}
        auto = {r["ID"]: r["CUIs"].split(";") for r in _rows(dataset / f"{split}_concepts.csv")}
        for image_id, t in truth.items():
            assert manual[image_id] == [MODALITY_CUI[t["modality"]], REGION_CUI[t["region"]]]
            assert auto[image_id][:4] == [
                MODALITY_CUI[t["modality"]],
                REGION_CUI[t["region"]],
                FINDING_CUI[t["finding"]],
                SIDE_CUI[t["side"]],
            ]
            assert all(c in mapping for c in auto[image_id])
            assert len(set(auto[image_id])) == len(auto[image_id])


# ---------------------------------------------------------------- held-out combinations


def test_held_out_combinations_only_outside_train_with_every_value_in_train() -> None:
    plan = plan_phantoms(1200, seed=5)
    train = [p.__dict__ for _, p in plan["train"]]
    assert not any(is_held_out(f) for f in train)
    train_values = {k: {f[k] for f in train} for k in ("modality", "region", "finding", "side", "size")}
    for split in ("valid", "test"):
        rows = [p.__dict__ for _, p in plan[split]]
        held = [f for f in rows if is_held_out(f)]
        assert len(held) >= len(rows) // phantoms.HELD_OUT_EVERY
        for rule in HELD_OUT_RULES:  # every rule occurs
            assert any(all(f[k] == v for k, v in rule.items()) for f in held), rule
        for f in held:  # ... and is made only of values seen in train
            for k in train_values:
                assert f[k] in train_values[k], (k, f[k])
    # Every value of every fact is in train, and every design combination outside the rules too.
    for modality, regions in DESIGN.items():
        assert modality in train_values["modality"]
        for region, findings in regions.items():
            for finding in findings:
                for side in ("left", "right"):
                    combo = {"modality": modality, "region": region, "finding": finding, "side": side}
                    seen = any(all(f[k] == v for k, v in combo.items()) for f in train)
                    assert seen != is_held_out(combo), combo


def test_held_out_column_marks_them(dataset: Path) -> None:
    for split in SPLITS:
        truth = phantom_facts(dataset, split)
        marked = [t for t in truth.values() if t["held_out"] == "1"]
        assert all(is_held_out(t) for t in marked)
        assert all(not is_held_out(t) for t in truth.values() if t["held_out"] == "0")
        assert bool(marked) == (split != "train")


# ---------------------------------------------------------------- the facts are in the pixels


def _small(im: Image.Image, size: int = 64) -> np.ndarray:
    return np.asarray(im.convert("L").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _variant(p: phantoms.PhantomParams, **changes: object) -> phantoms.PhantomParams:
    return phantoms.PhantomParams(**{**p.__dict__, "arrow": None, "doppler": False, **changes})


def test_side_follows_the_radiological_convention(dataset: Path) -> None:
    # Patient's left is drawn in the image right half, patient's right in the left half.
    for split in SPLITS:
        for image_id, t in phantom_facts(dataset, split).items():
            x = float(t["lesion_x"])
            assert (x > 0.5) == (t["side"] == "left"), (image_id, t["side"], x)


def _params(modality: str, region: str, finding: str, plane: str, side: str, size: str = "large"):
    base = plan_phantoms(1, seed=0)["train"][0][1]
    return _variant(
        base,
        modality=modality,
        region=region,
        finding=finding,
        plane=plane,
        side=side,
        organ=phantoms._organ(modality, region, finding),
        width=380,  # drawn at about this size anyway (WORK_SIDE); the test looks at 64 px
        height=352,
        **phantoms._size_fields(modality, region, finding, size),
    )


def _draw64(q: phantoms.PhantomParams) -> np.ndarray:
    return _small(render_phantom(q, np.random.default_rng(0))[0])


@pytest.mark.parametrize("modality", list(DESIGN))
def test_each_fact_changes_the_64px_image_where_it_should(modality: str) -> None:
    """For every design combination of a modality, render it again with one fact changed (same
    drawing random stream): the 64 px images must differ clearly, and a side change must move the
    lesion from one half to the other."""
    regions = DESIGN[modality]
    for region, findings in regions.items():
        for finding in findings:
            for plane in phantoms._planes(modality, region, finding):
                what = f"{modality} {region} {finding} {plane}"
                p = _params(modality, region, finding, plane, "left")
                ref = _draw64(p)
                diff = np.abs(ref - _draw64(_variant(p, side="right")))
                half = diff.shape[1] // 2
                # the lesion (drawn in the image right half for the patient's left) moves across
                assert diff[:, half:].max() > 60 and diff[:, :half].max() > 60, f"{what}: side barely visible"
                for other in findings:
                    if other != finding and plane in phantoms._planes(modality, region, other):
                        q = _params(modality, region, other, plane, "left")
                        assert np.abs(_draw64(q) - ref).max() > 60, f"{what}: looks like {other}"
                for other_region, other_findings in regions.items():
                    if other_region != region:
                        q = _params(
                            modality,
                            other_region,
                            other_findings[0],
                            "axial"
                            if plane == "axial"
                            else phantoms._planes(modality, other_region, other_findings[0])[0],
                            "left",
                        )
                        assert np.abs(_draw64(q) - ref).mean() > 8, f"{what}: looks like {other_region}"
                for other_plane in phantoms._planes(modality, region, finding):
                    if other_plane != plane:
                        q = _params(modality, region, finding, other_plane, "left")
                        assert np.abs(_draw64(q) - ref).mean() > 8, f"{what}: looks like {other_plane}"
                if p.size is not None:
                    small = _draw64(_params(modality, region, finding, plane, "left", "small"))
                    assert (np.abs(small - ref) > 40).sum() >= 4, f"{what}: size classes look alike"


def test_modalities_are_told_apart_by_a_nearest_centroid_at_24px(dataset: Path) -> None:
    """A crude learnability check: per-modality mean 24 px images from train classify the valid and
    test images' modality far above chance (0.2)."""

    def vec(split: str, image_id: str) -> np.ndarray:
        v = _small(Image.open(dataset / split / f"{image_id}.jpg"), 24).ravel()
        return (v - v.mean()) / (v.std() + 1e-6)

    train = phantom_facts(dataset, "train")
    cents = {}
    for m in DESIGN:
        vs = [vec("train", i) for i, t in train.items() if t["modality"] == m]
        assert vs, m
        cents[m] = np.mean(vs, axis=0)
    hits = total = 0
    for split in ("valid", "test"):
        for image_id, t in phantom_facts(dataset, split).items():
            v = vec(split, image_id)
            guess = min(cents, key=lambda m: float(np.sum((cents[m] - v) ** 2)))
            hits += guess == t["modality"]
            total += 1
    assert hits / total >= 0.7, f"modality nearest-centroid accuracy {hits}/{total}"


# ---------------------------------------------------------------- blank variant and CLI


def test_blank_variant_has_same_captions_and_flat_images(tmp_path: Path) -> None:
    make_phantoms(tmp_path / "drawn", 8, seed=9, progress=False)
    make_phantoms(tmp_path / "blank", 8, seed=9, blank=True, progress=False)
    for split in SPLITS:
        for kind in ("captions", "concepts", "concepts_manual"):
            name = f"{split}_{kind}.csv"
            assert (tmp_path / "drawn" / name).read_bytes() == (tmp_path / "blank" / name).read_bytes()
        drawn, blank = phantom_facts(tmp_path / "drawn", split), phantom_facts(tmp_path / "blank", split)
        for image_id, t in blank.items():
            im = Image.open(tmp_path / "blank" / split / f"{image_id}.jpg")
            assert im.mode == drawn[image_id]["stored_mode"]
            assert im.size == (int(drawn[image_id]["width"]), int(drawn[image_id]["height"]))
            assert _small(im).std() < 6
            assert t["true_color"] == "0"


def test_cli_writes_the_dataset_and_rejects_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "ds"
    rc = cli(
        [
            "--out",
            str(out),
            "--n",
            "5",
            "--seed",
            "2",
            "--size-range",
            "500,600",
            "--splits",
            "0.6,0.2,0.2",
            "--quiet",
        ]
    )
    assert rc == 0
    assert "train" in capsys.readouterr().out
    for p in out.rglob("*.jpg"):
        with Image.open(p) as im:
            assert 500 <= min(im.size) and max(im.size) <= 600
    counts = {s: len(_rows(out / f"{s}_captions.csv")) for s in SPLITS}
    assert counts == {"train": 3, "valid": 1, "test": 1}
    with pytest.raises(SystemExit):
        cli(["--out", str(tmp_path / "x"), "--splits", "0.5,0.5"])
    assert cli(["--out", str(tmp_path / "y"), "--n", "0", "--quiet"]) == 2
    assert "n must be at least 1" in capsys.readouterr().err
    assert cli(["--out", str(out), "--n", "6", "--quiet"]) == 2  # exists with other options


def test_phantom_facts_names_a_missing_sidecar(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train_phantom_facts.csv"):
        phantom_facts(tmp_path, "train")


def test_fact_accuracy_scores_generated_captions(dataset: Path) -> None:
    truth = phantom_facts(dataset, "valid")
    refs = {r["ID"]: r["Caption"] for r in _rows(dataset / "valid_captions.csv")}
    perfect = fact_accuracy(refs, truth)
    assert perfect == {
        "n": len(truth),
        "modality": 1.0,
        "region": 1.0,
        "side": 1.0,
        "finding": 1.0,
        "all": 1.0,
    }
    assert fact_accuracy({}, truth)["all"] == 0.0
    flipped = {
        i: c.replace("left", "tmp").replace("right", "left").replace("tmp", "right") for i, c in refs.items()
    }
    scores = fact_accuracy(flipped, truth, facts=("modality", "side", "size"))
    assert scores["modality"] == 1.0 and scores["side"] == 0.0 and scores["all"] == 0.0
    assert scores["size"] == 1.0
    held = fact_accuracy(refs, truth, held_out=True)
    seen = fact_accuracy(refs, truth, held_out=False)
    assert held["n"] + seen["n"] == len(truth) and held["n"] > 0 and seen["n"] > 0
    with pytest.raises(ValueError, match="unknown facts"):
        fact_accuracy(refs, truth, facts=("colour",))


def test_modality_subsets_keep_only_rules_that_leave_every_value_in_train(tmp_path: Path) -> None:
    assert phantoms.held_out_rules() == HELD_OUT_RULES
    us = phantoms.held_out_rules(("ultrasound",))
    assert {"modality": "ultrasound", "finding": "mass"} not in us  # it would remove "mass" from train
    assert {"region": "abdomen", "finding": "mass", "side": "left"} in us
    for mods in [("ct", "xray"), ("angiography",), ("ultrasound",), ("mri", "ultrasound")]:
        rules = phantoms.held_out_rules(mods)
        plan = plan_phantoms(400, seed=3, modalities=mods)
        train = [p.__dict__ for _, p in plan["train"]]
        assert {f["modality"] for f in train} == set(mods)
        assert not any(is_held_out(f, rules) for f in train)
        everything = [p.__dict__ for split in SPLITS for _, p in plan[split]]
        for k in ("modality", "region", "finding", "side"):
            assert {f[k] for f in train} == {f[k] for f in everything}, (mods, k)
        if rules:
            assert any(is_held_out(p.__dict__, rules) for _, p in plan["test"])
    out = tmp_path / "ds"
    summary = make_phantoms(out, 12, seed=1, modalities=("xray", "ct"), progress=False)
    assert summary["options"]["modalities"] == ["ct", "xray"]
    assert set(summary["facts"]["modality"]) <= {"ct", "xray"}
    truth = {**phantom_facts(out, "valid"), **phantom_facts(out, "test")}
    rules = phantoms.held_out_rules(("ct", "xray"))
    assert all((t["held_out"] == "1") == is_held_out(t, rules) for t in truth.values())
    with pytest.raises(phantoms.PhantomOptionError, match="subset of"):
        make_phantoms(tmp_path / "bad", 5, modalities=("pet",), progress=False)
    assert cli(["--out", str(tmp_path / "c"), "--n", "4", "--modalities", "angiography", "--quiet"]) == 0
    assert {t["modality"] for t in phantom_facts(tmp_path / "c", "train").values()} == {"angiography"}
    assert cli(["--out", str(tmp_path / "d"), "--n", "4", "--modalities", "ct,pet", "--quiet"]) == 2
