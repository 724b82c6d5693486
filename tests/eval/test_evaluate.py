"""medcap evaluate / compare: file formats, ID matching, protocols, bootstrap, paired comparison."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from medcap.cli.eval import cmd_compare as cli_compare
from medcap.cli.eval import cmd_evaluate as cli_evaluate
from medcap.eval.compare import compare, paired_bootstrap
from medcap.eval.evaluate import EvaluationError, bootstrap_means, evaluate, read_predictions
from medcap.eval.metrics import MetricsConfig, java_missing_reason, score_captions
from tests.eval.test_metrics import make_images, make_tiny_clip, minilm_path, real_captions


def write_csv(path: Path, header: list[str], rows: list[list[str]], bom: bool = False) -> Path:
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def real_set(n: int) -> tuple[list[str], list[str], list[str]]:
    """IDs, references (real captions, including the one that is only U+202F) and predictions."""
    caps = real_captions()
    rng = random.Random(3)
    blank = next(k for k, c in enumerate(caps) if not c.strip())  # the caption that is only U+202F
    picked = [blank, *rng.sample(range(len(caps)), n - 1)]
    ids = [f"ROCOv2_2023_valid_{i + 1:06d}" for i in picked]
    refs = [caps[i] for i in picked]
    preds = [""] + [
        " ".join(r.split()[: max(1, len(r.split()) // 2)]) if k % 2 else rng.choice(caps)
        for k, r in enumerate(refs[1:])
    ]
    return ids, refs, preds


def read_per_caption(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_evaluate_imageclef2024_on_real_captions(tmp_path, capsys):
    ids, refs, preds = real_set(30)
    ref_csv = write_csv(
        tmp_path / "valid_captions.csv",
        ["ID", "Caption"],
        [[i, c] for i, c in zip(ids, refs, strict=True)],
        bom=True,
    )
    # Predictions in a different order than the references: matching is by ID.
    order = list(reversed(range(30)))
    pred_csv = write_csv(tmp_path / "pred.csv", ["ID", "Caption"], [[ids[k], preds[k]] for k in order])
    out = tmp_path / "eval"
    code = cli_evaluate(
        [
            "--predictions",
            str(pred_csv),
            "--references",
            str(ref_csv),
            "--protocol",
            "imageclef2024",
            "--bertscore-model",
            minilm_path(),
            "--bertscore-layers",
            "6",
            "--out",
            str(out),
            "--bootstrap",
            "200",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "bertscore" in printed and "(primary)" in printed
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["protocol"] == "imageclef2024" and summary["n"] == 30 and summary["primary"] == "bertscore"
    assert summary["bootstrap"]["samples"] == 200
    for m, e in summary["metrics"].items():
        lo, hi = e["ci95"]
        assert lo <= e["mean"] <= hi, m
    assert "layer 6" in summary["models"]["bertscore"]
    assert (
        "--bleurt-model" in summary["unavailable"]["bleurt"]
        and "--clip-model" in summary["unavailable"]["clipscore"]
    )
    assert any("corpus-level BLEU" in n for n in summary["notes"])
    rows = read_per_caption(out / "per_caption.csv")
    assert [r["id"] for r in rows] == ids  # reference order
    assert rows[0]["reference"] == "\u202f" and rows[0]["prediction"] == ""
    expected_cols = ["bertscore", "rouge1", "bleu1", "bleu2", "bleu3", "bleu4", "cider"]
    if java_missing_reason() is None:
        expected_cols.insert(6, "meteor")
    assert list(rows[0])[3:] == expected_cols
    for m in expected_cols:
        assert float(rows[0][m]) == 1.0  # both empty after preprocessing
        assert summary["metrics"][m]["mean"] == pytest.approx(np.mean([float(r[m]) for r in rows]), abs=1e-7)
    direct = score_captions(
        preds,
        refs,
        MetricsConfig(
            metrics=["bertscore"], bertscore_model=minilm_path(), bertscore_layers=6, show_progress=False
        ),
    )
    assert [float(r["bertscore"]) for r in rows] == pytest.approx(direct["bertscore"], abs=1e-7)


def test_manifest_references_and_2025_protocol_with_image_similarity(tmp_path):
    n = 4
    images = make_images(tmp_path / "img", n)
    clip = make_tiny_clip(tmp_path / "clip")
    ids = [f"ImageCLEFmedical_Caption_2025_valid_{i}" for i in range(n)]
    refs = ["CT of the chest, 2 nodules.", "MRI brain", "X-ray of the left hand", "ultrasound of the liver"]
    preds = ["chest CT", "brain MRI with contrast", "", "liver ultrasound"]
    manifest = write_csv(
        tmp_path / "manifest.csv",
        ["id", "image", "caption_raw", "caption", "cuis", "modality"],
        [[i, str(p), c, c, "", "ct"] for i, p, c in zip(ids, images, refs, strict=True)],
    )
    pred_csv = write_csv(
        tmp_path / "sub.csv", ["ID", "Caption"], [[i, p] for i, p in zip(ids, preds, strict=True)]
    )
    summary = evaluate(
        pred_csv,
        manifest,
        "imageclef2025",
        tmp_path / "ev",
        bertscore_model=minilm_path(),
        bertscore_layers=6,
        clip_model=str(clip),
        bootstrap=100,
        show_progress=False,
    )
    assert summary["primary"] == "relevance"
    assert "idf from 4 preprocessed references" in summary["models"]["bertscore"]
    for m in ("medcat", "alignscore", "factuality"):
        assert m in summary["unavailable"]
    assert any("MedImageInsight" in n for n in summary["notes"])
    rows = read_per_caption(tmp_path / "ev" / "per_caption.csv")
    assert list(rows[0])[3:] == ["bertscore", "rouge1", "similarity", "relevance"]
    for r in rows:
        parts = [float(r[m]) for m in ("bertscore", "rouge1", "similarity")]
        assert float(r["relevance"]) == pytest.approx(sum(parts) / 3, abs=1e-7)
    assert float(rows[2]["similarity"]) == 0.0  # empty prediction


def test_id_mismatches_and_bad_files(tmp_path, capsys):
    refs = write_csv(tmp_path / "refs.csv", ["ID", "Caption"], [["a", "ct"], ["b", "mri"], ["c", "xray"]])
    missing = write_csv(tmp_path / "missing.csv", ["ID", "Caption"], [["a", "ct"], ["b", "mri"]])
    with pytest.raises(EvaluationError, match=r"1 reference ID\(s\) have no prediction, e.g. c.*--subset"):
        evaluate(missing, refs, "imageclef2024", tmp_path / "o")
    extra = write_csv(
        tmp_path / "extra.csv", ["ID", "Caption"], [["a", "ct"], ["b", "mri"], ["c", "x"], ["zz", "x"]]
    )
    with pytest.raises(EvaluationError, match=r"1 prediction ID\(s\) are not in the references, e.g. zz"):
        evaluate(extra, refs, "imageclef2024", tmp_path / "o")
    assert (
        cli_evaluate(["--predictions", str(missing), "--references", str(refs), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "have no prediction" in capsys.readouterr().err

    (tmp_path / "dup.csv").write_text("ID,Caption\na,ct\nb,x\na,y\n")
    with pytest.raises(EvaluationError, match=r"row 4: image ID 'a' appears more than once"):
        read_predictions(tmp_path / "dup.csv")
    (tmp_path / "commas.csv").write_text("ID,Caption\na,ct, of the chest\n")
    with pytest.raises(EvaluationError, match=r"row 2: 3 fields; quote captions"):
        read_predictions(tmp_path / "commas.csv")
    (tmp_path / "blank.csv").write_text("ID,Caption\na,ct\n\nb,x\n")
    with pytest.raises(EvaluationError, match=r"row 3: blank line"):
        read_predictions(tmp_path / "blank.csv")
    # No header is fine (the official checker accepts it), quoted commas and newlines too.
    (tmp_path / "nohead.csv").write_text('a,"ct, chest\nview"\nb,mri\n')
    assert read_predictions(tmp_path / "nohead.csv") == {"a": "ct, chest\nview", "b": "mri"}
    (tmp_path / "badref.csv").write_text("image,text\na,b\n")
    with pytest.raises(EvaluationError, match="expected a header with ID and Caption"):
        evaluate(tmp_path / "nohead.csv", tmp_path / "badref.csv", "imageclef2024", tmp_path / "o")
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate(tmp_path / "nope.csv", refs, "imageclef2024", tmp_path / "o")
    with pytest.raises(EvaluationError, match="unknown protocol"):
        evaluate(missing, refs, "imageclef2019", tmp_path / "o")


def test_subset_and_missing_bertscore_model(tmp_path):
    refs = write_csv(
        tmp_path / "refs.csv", ["ID", "Caption"], [["a", "CT of the chest"], ["b", "MRI"], ["c", "X-ray"]]
    )
    preds = write_csv(
        tmp_path / "p.csv", ["ID", "Caption"], [["c", "x-ray of the hand"], ["a", "CT of the chest"]]
    )
    s = evaluate(
        preds,
        refs,
        "imageclef2025",
        tmp_path / "o",
        bertscore_model=str(tmp_path / "no-model"),
        bertscore_layers=6,
        subset=True,
        bootstrap=50,
        show_progress=False,
    )
    assert s["n"] == 2 and s["n_references"] == 3 and s["subset"] is True
    assert "no-model" in s["unavailable"]["bertscore"] and "bertscore" not in s["metrics"]
    # "xray of the hand" vs "xray": P = 1/4, R = 1, F = 0.4.
    assert s["metrics"]["rouge1"]["mean"] == pytest.approx((1.0 + 0.4) / 2)
    # Relevance from the one computable part, and the summary says it is not the official one.
    assert s["metrics"]["relevance"]["mean"] == pytest.approx(0.7)
    assert any("missing bertscore, similarity" in n and "NOT comparable" in n for n in s["notes"])
    assert [r["id"] for r in read_per_caption(tmp_path / "o" / "per_caption.csv")] == ["a", "c"]


# ----------------------------------------------------------------------------------------------
# Bootstrap and compare


def test_bootstrap_intervals():
    const = np.full((50, 1), 0.7)
    boot = bootstrap_means(const, 200, 0)
    assert np.allclose(boot, 0.7)
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 0.1, size=(400, 1))
    boot = bootstrap_means(x, 2000, 0)[:, 0]
    se = 0.1 / np.sqrt(400)
    assert boot.std() == pytest.approx(se, rel=0.15)
    assert bootstrap_means(x, 100, 5)[:, 0].tolist() == bootstrap_means(x, 100, 5)[:, 0].tolist()  # seeded


def write_eval(
    folder: Path, ids: list[str], scores: dict[str, list[float]], protocol: str = "imageclef2024"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "per_caption.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "reference", "prediction", *scores])
        for k, i in enumerate(ids):
            w.writerow([i, "ref", "pred", *(f"{v[k]:.6f}" for v in scores.values())])
    (folder / "metrics.json").write_text(json.dumps({"protocol": protocol, "models": {"bertscore": "m"}}))
    return folder


def test_paired_bootstrap_and_compare(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = [f"id{i}" for i in range(300)]
    base = rng.uniform(0.3, 0.9, 300)
    better = base + 0.02 + rng.normal(0, 0.01, 300)  # paired: small but consistent gain
    noise = base + rng.normal(0, 0.05, 300)  # no real difference
    r = paired_bootstrap(better, base, 1000, 0)
    assert r["diff"] == pytest.approx(0.02, abs=0.003) and r["ci95"][0] > 0 and r["prob_a_better"] == 1.0
    assert r["p_value"] < 0.01
    r0 = paired_bootstrap(base, base, 500, 0)
    assert r0["diff"] == 0 and r0["p_value"] == 1.0

    a = write_eval(tmp_path / "A" / "eval" / "test", ids, {"bertscore": list(better), "rouge1": list(noise)})
    b = write_eval(tmp_path / "B", ids[::-1], {"bertscore": list(base[::-1]), "rouge1": list(base[::-1])})
    res = compare(tmp_path / "A", b, samples=1000)  # a run dir and an eval dir; rows in another order
    assert res["n"] == 300 and res["warnings"] == []
    assert res["metrics"]["bertscore"]["verdict"].startswith("A is better than B on bertscore")
    assert res["metrics"]["rouge1"]["verdict"].startswith("no clear difference on rouge1")
    assert cli_compare([str(a), str(b), "--out", str(tmp_path / "cmp.json")]) == 0
    out = capsys.readouterr().out
    assert "A is better than B on bertscore" in out and "P(A>B)" in out
    assert json.loads((tmp_path / "cmp.json").read_text())["metrics"]["bertscore"]["diff"] > 0
    # B against A says the opposite.
    swapped = compare(b, a)["metrics"]["bertscore"]
    assert swapped["verdict"].startswith("B is better than A on bertscore by "), swapped["verdict"]
    assert swapped["diff"] == pytest.approx(-res["metrics"]["bertscore"]["diff"])

    write_eval(tmp_path / "C", ids[:299], {"bertscore": list(base[:299])})
    with pytest.raises(EvaluationError, match="score different captions"):
        compare(a, tmp_path / "C")
    write_eval(tmp_path / "D", ids, {"bertscore": list(base)}, protocol="imageclef2025")
    assert "different protocols" in compare(a, tmp_path / "D")["warnings"][0]
    assert cli_compare([str(a), str(tmp_path / "nothing")]) == 2
    assert "no per_caption.csv" in capsys.readouterr().err
