"""``medcap data phantoms``: plan and write a phantom dataset in the ROCOv2 release layout."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing as mp
import os
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medcap.data.phantoms.design import (
    CUI_NAMES,
    FACT_COLUMNS,
    FINDING_CUI,
    GENERATOR_VERSION,
    HELD_OUT_EVERY,
    MODALITY_CUI,
    ORGAN_CUI,
    REGION_CUI,
    SIDE_CUI,
    SPLITS,
    PhantomOptionError,
    PhantomParams,
    _check_modalities,
    _format_number,
    _sample_params,
    compose_caption,
    held_out_rules,
    is_held_out,
)
from medcap.data.phantoms.draw import render_phantom


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    # QUOTE_MINIMAL and LF line ends: exactly the ROCOv2 files' format.
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(header)
        w.writerows(rows)


def _split_counts(n: int, splits: tuple[float, float, float]) -> dict[str, int]:
    if len(splits) != 3 or any(s < 0 for s in splits) or sum(splits) <= 0:
        raise PhantomOptionError(
            f"splits must be three non-negative fractions for train,valid,test, got {splits}"
        )
    total = sum(splits)
    n_valid = round(n * splits[1] / total)
    n_test = round(n * splits[2] / total)
    n_train = n - n_valid - n_test
    if n_train < 0:
        n_test += n_train
        n_train = 0
    return {"train": n_train, "valid": n_valid, "test": n_test}


def _options(
    n: int,
    seed: int,
    size_range: tuple[int, int],
    splits: tuple[float, float, float],
    blank: bool,
    modalities: tuple[str, ...],
) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "n": n,
        "seed": seed,
        "size_range": list(size_range),
        "splits": list(splits),
        "blank": blank,
        "modalities": list(modalities),
    }


def plan_phantoms(
    n: int,
    seed: int = 0,
    *,
    size_range: tuple[int, int] = (500, 1000),
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    modalities: tuple[str, ...] | None = None,
) -> dict[str, list[tuple[str, PhantomParams]]]:
    """The (image ID, parameters) of every phantom :func:`make_phantoms` would draw, per split,
    without drawing anything (cheap: used by tests and to inspect a dataset's design).

    Train never holds a held-out combination (:func:`held_out_rules` of the modalities); in valid
    and test every :data:`HELD_OUT_EVERY`-th image (the 1st, 5th, ...) is drawn from one, the
    rules in turn, and the others from the training distribution."""
    mods = _check_modalities(modalities)
    rules = held_out_rules(mods)
    counts = _split_counts(n, tuple(splits))  # type: ignore[arg-type]
    plan: dict[str, list[tuple[str, PhantomParams]]] = {}
    for split_index, split in enumerate(SPLITS):
        rows = []
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, split_index, i, 0])
            rule = None
            if split != "train" and i % HELD_OUT_EVERY == 0 and rules:
                rule = rules[(i // HELD_OUT_EVERY) % len(rules)]
            params = _sample_params(rng, rule, size_range, mods, rules)
            rows.append((f"ROCOv2_2023_{split}_{i + 1:06d}", params))
        plan[split] = rows
    return plan


_OUR_FILES = [
    f"{s}_{kind}.csv" for s in SPLITS for kind in ("captions", "concepts", "concepts_manual", "phantom_facts")
]

_OUR_FILES += ["cui_mapping.csv", "phantoms.json"]


def _draw_and_save(job: tuple[str, tuple[int, ...], PhantomParams, bool]) -> tuple[float, float]:
    """Draw one phantom and write its JPEG; returns the lesion centre (fractions of width, height).
    Top-level so that worker processes can run it."""
    path, stream, p, blank = job
    # Drawing has its own random stream, so blank and drawn datasets share their captions.
    rng = np.random.default_rng(list(stream))
    im, lesion = render_phantom(p, rng, blank=blank)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
    Path(path).write_bytes(buf.getvalue())
    return lesion


def make_phantoms(
    out: str | Path,
    n: int,
    seed: int = 0,
    *,
    size_range: tuple[int, int] = (500, 1000),
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    blank: bool = False,
    modalities: tuple[str, ...] | None = None,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``n`` phantom images with captions and concepts in the ROCOv2 layout under ``out``.

    Args:
        out: dataset root to create.
        n: total number of images over the three splits.
        seed: everything (facts, drawing, JPEG quality) follows from it: same options, same bytes.
        size_range: (min, max) pixels of each side; aspects stay within 0.7-1.45.
        splits: fractions for train, valid, test (normalised).
        blank: draw uninformative flat images with the same captions, sizes and stored modes.
        modalities: draw only these (e.g. ``("ct", "xray")`` for an easier dataset); None = all
            five. The held-out rules that still apply are :func:`held_out_rules` of them.
        overwrite: replace an existing phantom dataset in ``out`` made with other options.
        workers: processes that draw (0 = one per CPU core); the output does not depend on it.
        progress: show a tqdm progress bar.

    Returns:
        A summary: options, per-split counts (images, stored modes, true colour, colour marks, held-out) and
        per-fact value counts. It is also written to ``out/phantoms.json``. If ``out`` already holds
        a phantom dataset made with the same options, nothing is redrawn and its summary is
        returned with ``"reused": True``.
    """
    out = Path(out)
    if n < 1:
        raise PhantomOptionError(f"n must be at least 1, got {n}")
    lo, hi = size_range
    if not (16 <= lo <= hi):
        raise PhantomOptionError(f"size_range must be (min, max) with 16 <= min <= max, got {size_range}")
    mods = _check_modalities(modalities)
    rules = held_out_rules(mods)
    options = _options(n, seed, (lo, hi), tuple(float(s) for s in splits), blank, mods)  # type: ignore[arg-type]
    summary_path = out / "phantoms.json"
    if summary_path.exists():
        try:
            previous = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = {}
        complete = all((out / f).exists() for f in _OUR_FILES) and all(
            sum(1 for _ in (out / s).glob("*.jpg")) == previous.get("splits", {}).get(s, {}).get("images")
            for s in SPLITS
            if (out / s).is_dir()
        )
        if previous.get("options") == options and complete:
            previous["reused"] = True
            return previous
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} is not empty; pass overwrite=True (--overwrite) to replace a phantom dataset there, "
                "or choose an empty folder"
            )
        if not summary_path.exists():
            raise FileExistsError(
                f"{out} is not empty and holds no phantoms.json: refusing to overwrite a folder that was not "
                "made by 'medcap data phantoms'; choose an empty folder"
            )
        for name in _OUR_FILES:
            (out / name).unlink(missing_ok=True)
        for s in SPLITS:
            shutil.rmtree(out / s, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    summary: dict[str, Any] = {
        "options": options,
        "splits": {},
        "facts": {},
        "held_out_rules": list(rules),
    }
    fact_counts: dict[str, Counter] = {
        k: Counter() for k in ("modality", "region", "finding", "side", "size")
    }
    plan = plan_phantoms(n, seed, size_range=(lo, hi), splits=splits, modalities=mods)
    for split in SPLITS:
        (out / split).mkdir(exist_ok=True)
    jobs = [
        (str(out / split / f"{image_id}.jpg"), (seed, split_index, i, 1), p, blank)
        for split_index, split in enumerate(SPLITS)
        for i, (image_id, p) in enumerate(plan[split])
    ]
    workers = (os.cpu_count() or 1) if workers == 0 else max(1, workers)
    with ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            # spawn, not fork: the caller may hold torch threads, and children need only numpy/Pillow
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")))
            drawn = pool.map(_draw_and_save, jobs, chunksize=8)
        else:
            drawn = map(_draw_and_save, jobs)
        positions = list(tqdm(drawn, total=len(jobs), desc="phantoms", unit="img", disable=not progress))
    k = 0
    for split in SPLITS:
        cap_rows, con_rows, man_rows, fact_rows = [], [], [], []
        stats = Counter()
        for image_id, p in plan[split]:
            lx, ly = positions[k]
            k += 1
            caption = compose_caption(p)
            true_color = p.doppler and not blank
            color_marks = p.arrow not in (None, "white") and not blank
            held = is_held_out(asdict(p), rules)
            cap_rows.append([image_id, caption])
            organ_cui = ORGAN_CUI.get(p.organ)
            cuis = [MODALITY_CUI[p.modality], REGION_CUI[p.region], FINDING_CUI[p.finding], SIDE_CUI[p.side]]
            if organ_cui and organ_cui not in cuis:
                cuis.append(organ_cui)
            con_rows.append([image_id, ";".join(cuis)])
            man_rows.append([image_id, ";".join([MODALITY_CUI[p.modality], REGION_CUI[p.region]])])
            fact_rows.append([
                image_id, p.modality, p.plane, p.region, p.finding, p.side, p.size or "",
                f"{_format_number(p.size_value)} {p.size_unit}" if p.size_value is not None else "",
                p.organ, p.arrow or "", str(int(p.doppler)), p.stored_mode, str(int(true_color)), str(int(color_marks)),
                f"{lx:.4f}", f"{ly:.4f}", str(int(held)), str(p.width), str(p.height),
            ])  # fmt: skip
            stats["images"] += 1
            stats[f"stored_{p.stored_mode}"] += 1
            stats["true_color"] += int(true_color)
            stats["color_marks"] += int(color_marks)
            stats["held_out"] += int(held)
            for fact, counter in fact_counts.items():
                counter[getattr(p, fact) or "none"] += 1
        _write_csv(out / f"{split}_captions.csv", ["ID", "Caption"], cap_rows)
        _write_csv(out / f"{split}_concepts.csv", ["ID", "CUIs"], con_rows)
        _write_csv(out / f"{split}_concepts_manual.csv", ["ID", "CUIs"], man_rows)
        _write_csv(out / f"{split}_phantom_facts.csv", FACT_COLUMNS, fact_rows)
        summary["splits"][split] = {
            k: int(stats.get(k, 0))
            for k in ("images", "stored_L", "stored_RGB", "true_color", "color_marks", "held_out")
        }
    _write_csv(
        out / "cui_mapping.csv", ["CUI", "Canonical name"], [[c, name] for c, name in CUI_NAMES.items()]
    )
    summary["facts"] = {k: dict(sorted(v.items())) for k, v in fact_counts.items()}
    summary["convention"] = "radiological: the patient's right is on the image left"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return {**summary, "reused": False}
