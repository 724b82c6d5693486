"""The HTML report: built from a synthetic run dir, checked for content, rendered in Chromium."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from medcap.cli.eval import cmd_report as cli
from medcap.eval.report import write_report
from tests.fixtures import skip_missing

MODALITIES = ["ct", "xray", "mri"]


def make_run(
    root: Path, n: int = 24, with_log: bool = True, with_eval: bool = True, with_prep: bool = True
) -> Path:
    """A run dir as train/predict/evaluate write it, with a prepared data folder beside it."""
    prep, run = root / "prepared", root / "run"
    run.mkdir(parents=True)
    ids = [f"ROCOv2_2023_test_{i:06d}" for i in range(n)]
    refs = [
        f"{MODALITIES[i % 3]} image showing a lesion in the {'left' if i % 2 else 'right'} lobe"
        for i in range(n)
    ]
    preds = [f"{MODALITIES[(i * 7) % 3]} image with a lesion" if i % 4 else refs[i] for i in range(n)]
    if with_prep:
        for split, count in (("train", 3 * n), ("valid", n // 2), ("test", n)):
            d = prep / split
            d.mkdir(parents=True)
            rows = []
            for i in range(count):
                iid = ids[i] if split == "test" else f"ROCOv2_2023_{split}_{i:06d}"
                img = d / f"{iid}.jpg"
                im = Image.new("RGB", (96, 96), (20, 20, 20))
                ImageDraw.Draw(im).ellipse((20 + i % 30, 20, 70, 70), fill=(200, 200, 200))
                im.save(img)
                cap = refs[i] if split == "test" else refs[i % n] + " and more" * (i % 5)
                rows.append(
                    {
                        "id": iid,
                        "image": str(img.resolve()),
                        "caption_raw": cap,
                        "caption": cap,
                        "cuis": "",
                        "modality": MODALITIES[i % 3],
                        "width": 96,
                        "height": 96,
                        "mode": "RGB",
                        "true_color": 0,
                    }
                )
            with (d / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            stats = {
                "split": split,
                "rows_in": count + 1,
                "kept": count,
                "skipped": 1,
                "skipped_by_reason": {"empty_caption": 1},
                "color_policy": "all",
                "modality": {m: sum(r["modality"] == m for r in rows) for m in [*MODALITIES, "other"]},
                "caption_words": {"p50": 9.0, "p90": 14.0, "max": 25.0},
            }
            (d / "stats.json").write_text(json.dumps(stats))
    (run / "config.yaml").write_text(
        f"data:\n  prepared: {prep}\nmodel:\n  name_or_path: tiny\n  peft:\n    method: lora\n    r: 8\n"
        "train:\n  max_steps: 200\n  lr: 0.001\n  batch_size: 8\n"
    )
    if with_log:
        with (run / "log.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "epoch", "split", "loss", "lr", "samples_per_s"])
            for s in range(1, 201):
                w.writerow([s, s / 100, "train", 4 * math.exp(-s / 60) + 0.5, 1e-3 * min(1, s / 20), 30.0])
                if s % 50 == 0:
                    w.writerow([s, s / 100, "valid", 4 * math.exp(-s / 70) + 0.7, "", ""])
    if with_eval:
        ev = run / "eval" / "test"
        ev.mkdir(parents=True)
        with (ev / "per_caption.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "reference", "prediction", "bertscore", "rouge1"])
            for i in range(n):
                w.writerow(
                    [
                        ids[i],
                        refs[i],
                        preds[i],
                        f"{(1.0 if preds[i] == refs[i] else 0.3 + i / (3 * n)):.6f}",
                        "0.5",
                    ]
                )
        (ev / "metrics.json").write_text(
            json.dumps(
                {
                    "protocol": "imageclef2024",
                    "n": n,
                    "primary": "bertscore",
                    "secondary": "rouge1",
                    "metrics": {
                        "bertscore": {"mean": 0.61, "ci95": [0.55, 0.67]},
                        "rouge1": {"mean": 0.5, "ci95": [0.5, 0.5]},
                    },
                    "unavailable": {"meteor": "Java not found on PATH"},
                    "models": {"bertscore": "MiniLM (layer 6)"},
                    "notes": ["bleu1_corpus: 0.2"],
                    "bootstrap": {"samples": 1000},
                }
            )
        )
    return run


def _images(page: str) -> list[str]:
    return re.findall(r'src="data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)"', page)


def test_full_report_has_every_section(tmp_path):
    run = make_run(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    # Self-contained: no external resources at all.
    assert "http://" not in page and "https://" not in page and 'src="file:' not in page
    assert "imageclef2024" in page and "0.6100" in page and "0.5500 – 0.6700" in page
    assert "Java not found on PATH" in page  # unavailable metric and its reason
    for heading in ("Metrics", "Training", "Example captions", "Data", "Run settings"):
        assert f"<h2>{heading}</h2>" in page
    for grid in ("<h3>Best</h3>", "<h3>Worst</h3>", "<h3>Random</h3>"):
        assert grid in page
    # The best card is a perfect prediction (score 1), the worst the lowest score.
    best = page.index("<h3>Best</h3>")
    assert "bertscore 1.0000" in page[best : page.index("<h3>Worst</h3>")]
    imgs = _images(page)
    # 2 plot images in training (loss + lr in one figure = 1), data plots 3, thumbnails 18.
    assert len(imgs) >= 1 + 3 + 18
    for b64 in imgs:
        raw = base64.b64decode(b64)
        assert raw[:4] == b"\x89PNG" or raw[:2] == b"\xff\xd8"
    best_valid = 4 * math.exp(-200 / 70) + 0.7
    assert f"best {best_valid:.4f} at step 200" in page  # validation curve summarised


def test_report_degrades_gracefully(tmp_path):
    run = make_run(tmp_path, with_log=False, with_eval=False, with_prep=False)
    page = write_report(run).read_text(encoding="utf-8")
    assert "log.csv not found" in page
    assert "No evaluation found" in page
    assert "No per_caption.csv" in page
    assert "not found: no data statistics" in page
    # Images missing but eval present: captions are still shown, with a note.
    run2 = make_run(tmp_path / "b", with_prep=False)
    page2 = write_report(run2).read_text(encoding="utf-8")
    assert "shown without images" in page2 and "<h3>Best</h3>" in page2


def test_cli_and_missing_run_dir(tmp_path, capsys):
    run = make_run(tmp_path, n=8)
    assert cli([str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file()
    assert cli([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        skip_missing("chromium not installed (bash scripts/install-system-deps.sh installs it)")
    run = make_run(tmp_path)
    page = write_report(run)
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--screenshot={shot}",
                "--window-size=1280,2400",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            timeout=120,
        )
    assert shot.is_file(), proc.stderr.decode(errors="replace")[-2000:]
    with Image.open(shot) as im:
        im = im.convert("RGB")
        assert im.size == (1280, 2400)
        colours = im.resize((128, 240)).getcolors(maxcolors=100_000)
    # A blank page has one or two colours; the report has text, plots and thumbnails.
    assert colours is not None and len(colours) > 200
