"""The phantom dataset: synthetic radiology-like images and captions in the ROCOv2 release layout.

``medcap data phantoms --out DIR --n N --seed S`` (or :func:`make_phantoms`) draws CT-, MR-, X-ray-,
ultrasound- and angiography-like images procedurally (numpy + Pillow) and writes, exactly as the
ROCOv2 release does::

    DIR/{train,valid,test}/ROCOv2_2023_{split}_NNNNNN.jpg
    DIR/{split}_captions.csv            ID,Caption
    DIR/{split}_concepts.csv            ID,CUIs        (modality, region, finding, side, organ)
    DIR/{split}_concepts_manual.csv     ID,CUIs        (modality, region)
    DIR/cui_mapping.csv                 CUI,Canonical name

plus two extra files that the release does not have (readers of the layout ignore them):
``DIR/{split}_phantom_facts.csv`` (the drawing parameters of every image, the ground truth that
:func:`phantom_facts` reads) and ``DIR/phantoms.json`` (options and counts).

Every caption is composed from the parameters that drew its image, and every fact it states is
visible in the image, large enough to survive a resize to 64 px:

* modality, by overall appearance: CT = round body section, white bone, dark fat, black air,
  a scanner table below; MR (T2-weighted) = bright fat and fluid, black bone cortex and air, coil
  shading; X-ray = frontal projection, bright bones on a dark background; ultrasound = a fan-shaped
  sector of speckle on black; angiography = a dark vessel tree on a bright background.
* plane: CT/MR heads and abdomens are axial or coronal (a coronal head shows the neck below the
  skull; a coronal abdomen the lung bases, a column of vertebrae and upright kidneys); other CT/MR
  sections are axial, X-ray and angiography frontal, ultrasound transverse.
* region (head, chest, abdomen, knee, neck), by body outline and anatomy.
* side, by which half of the image holds the lesion. Radiological convention throughout: the
  patient's RIGHT is on the IMAGE LEFT (axial CT/MR seen from the feet, frontal X-ray and
  angiography seen from the front, transverse ultrasound likewise). Nothing is ever mirrored.
* finding: mass (bright, lobulated, heterogeneous), cyst (round, homogeneous, sharp: dark on CT and
  ultrasound, bright on T2 MR), fracture (displaced bone fragment with soft-tissue swelling),
  aneurysm (round sac on a vessel), occlusion (a vessel that stops; the other side is complete).
* size: two classes per (modality, region), stated in cm or mm; the lesion is drawn to that size
  relative to the body (or the ultrasound field of view).

Held-out combinations (:data:`HELD_OUT_RULES`): never in train; images 1, 5, 9, ... of valid and
test are drawn from them in turn, the other valid/test images from the training distribution.

* ultrasound + mass (train has ultrasound cysts and masses of other modalities);
* head + cyst + patient's left (CT, MR);
* knee + fracture + patient's right (X-ray);
* abdomen + mass + patient's left (CT, MR, ultrasound).

Each single value of each fact still appears in train. The ``held_out`` column of
``{split}_phantom_facts.csv`` marks these images, so a caller can score seen and new combinations
apart: the new ones need compositional generalisation. Measured with a 4-layer CNN trained from
scratch on the 1,050 train images of ``--n 1500`` at 64 px (25 epochs, CPU): on the seen
combinations of valid+test (336 images) modality 1.00, region 0.99, finding 0.93, side 0.94, size
0.91 (majority guess 0.26, 0.26, 0.51, 0.50, 0.36); on the held-out ones modality 0.98, region
0.95, but finding 0.13 and side 0.46: a small model learns the combinations, not the rule.

Images are stored with one channel (L), as grey RGB (some with coloured annotation arrows: grey
pictures with colour marks), or in true colour (colour Doppler on ultrasound), in ROCOv2-like sizes
(500-1000 px a side by default).
Everything is deterministic for a seed: the same options give the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

SPLITS = ("train", "valid", "test")
GENERATOR_VERSION = 3  # bump when the drawing or the captions change, so cached datasets are rebuilt

MODALITIES = ("ct", "mri", "xray", "ultrasound", "angiography")
REGIONS = ("head", "chest", "abdomen", "knee", "neck")
FINDINGS = ("mass", "cyst", "fracture", "aneurysm", "occlusion")
SIDES = ("left", "right")
SIZE_CLASSES = ("small", "large")

#: Which regions each modality shows, and which findings each (modality, region) can have.
DESIGN: dict[str, dict[str, tuple[str, ...]]] = {
    "ct": {"head": ("mass", "cyst", "fracture"), "chest": ("mass",), "abdomen": ("mass", "cyst")},
    "mri": {"head": ("mass", "cyst"), "abdomen": ("mass", "cyst"), "knee": ("mass", "cyst")},
    "xray": {"chest": ("mass",), "knee": ("mass", "fracture")},
    "ultrasound": {"abdomen": ("mass", "cyst"), "neck": ("mass", "cyst")},
    "angiography": {
        "head": ("aneurysm", "occlusion"),
        "abdomen": ("aneurysm", "occlusion"),
        "knee": ("aneurysm", "occlusion"),
    },
}
#: Sampling weights of the modalities (roughly ROCOv2's order, flattened so each is learnable).
MODALITY_WEIGHTS = {"ct": 0.26, "mri": 0.20, "xray": 0.22, "ultrasound": 0.17, "angiography": 0.15}

#: Combinations that never occur in train; every 4th image of valid and test is drawn from one of
#: them (in turn). Each rule maps fact names to values; an image matches when all of them agree.
HELD_OUT_RULES: tuple[dict[str, str], ...] = (
    {"modality": "ultrasound", "finding": "mass"},
    {"region": "head", "finding": "cyst", "side": "left"},
    {"region": "knee", "finding": "fracture", "side": "right"},
    {"region": "abdomen", "finding": "mass", "side": "left"},
)
HELD_OUT_EVERY = 4  # in valid/test, image i (0-based) is held-out when i % HELD_OUT_EVERY == 0

#: (modality, region) -> (unit, small value, large value, field width in the same unit). The lesion
#: is drawn with diameter = value / field width x the body (or field-of-view) width in the image.
SIZE_TABLE: dict[tuple[str, str], tuple[str, float, float, float]] = {
    ("ct", "head"): ("cm", 2, 4, 17),
    ("mri", "head"): ("cm", 2, 4, 17),
    ("ct", "chest"): ("cm", 3, 7, 32),
    ("xray", "chest"): ("cm", 3, 7, 34),
    ("ct", "abdomen"): ("cm", 3, 6, 30),
    ("mri", "abdomen"): ("cm", 3, 6, 30),
    ("mri", "knee"): ("cm", 3, 6, 30),
    ("xray", "knee"): ("cm", 3, 6, 30),
    ("ultrasound", "neck"): ("cm", 1, 2, 6),
    ("ultrasound", "abdomen"): ("cm", 2, 5, 16),
    ("angiography", "head"): ("mm", 12, 25, 160),
    ("angiography", "abdomen"): ("cm", 3, 6, 32),
    ("angiography", "knee"): ("cm", 3, 5, 30),
}
SIZED_FINDINGS = ("mass", "cyst", "aneurysm")

# UMLS CUIs (the modality ones are those ROCOv2's concepts_manual uses).
MODALITY_CUI = {
    "ct": "C0040405",
    "xray": "C1306645",
    "mri": "C0024485",
    "ultrasound": "C0041618",
    "angiography": "C0002978",
}
REGION_CUI = {
    "head": "C0018670",
    "chest": "C0817096",
    "abdomen": "C0000726",
    "knee": "C0022742",
    "neck": "C0027530",
}
FINDING_CUI = {
    "mass": "C0577559",
    "cyst": "C0010709",
    "fracture": "C0016658",
    "aneurysm": "C0002940",
    "occlusion": "C0028778",
}
SIDE_CUI = {"left": "C0205091", "right": "C0205090"}
ORGAN_CUI = {
    "brain": "C0006104",
    "lung": "C0024109",
    "kidney": "C0022646",
    "liver": "C0023884",
    "thyroid": "C0040132",
}
CUI_NAMES = {
    "C0040405": "X-Ray Computed Tomography",
    "C1306645": "Plain x-ray",
    "C0024485": "Magnetic Resonance Imaging",
    "C0041618": "Ultrasonography",
    "C0002978": "angiogram",
    "C0018670": "Head",
    "C0817096": "Chest",
    "C0000726": "Abdomen",
    "C0022742": "Knee",
    "C0027530": "Neck",
    "C0577559": "Mass of body structure",
    "C0010709": "Cyst",
    "C0016658": "Fracture",
    "C0002940": "Aneurysm",
    "C0028778": "Occlusion",
    "C0205091": "Left",
    "C0205090": "Right",
    "C0006104": "Brain",
    "C0024109": "Lung",
    "C0022646": "Kidney",
    "C0023884": "Liver",
    "C0040132": "Thyroid Gland",
}

FACT_COLUMNS = [
    "ID",
    "modality",
    "plane",
    "region",
    "finding",
    "side",
    "size",  # small | large | "" (fracture, occlusion)
    "size_text",  # as written in the caption, e.g. "3 cm"
    "organ",
    "arrow",  # "" or the arrow colour name
    "doppler",  # 1 if a colour Doppler overlay was drawn
    "stored_mode",  # L or RGB as written to the JPEG
    "true_color",  # 1 if colour is a real part of the picture (colour Doppler), as data.py counts it
    "color_marks",  # 1 if a grey image carries coloured annotation marks only (a coloured arrow)
    "lesion_x",  # lesion centre as a fraction of the width (0 = left edge)
    "lesion_y",
    "held_out",  # 1 if the (modality, region, finding, side) matches a HELD_OUT_RULES entry
    "width",
    "height",
]


# ----------------------------------------------------------------------------------------------
# The parameters of one image
# ----------------------------------------------------------------------------------------------


@dataclass
class PhantomParams:
    """Everything that decides one phantom image and its caption."""

    modality: str
    region: str
    finding: str
    side: str  # patient's side: "left" is drawn in the IMAGE RIGHT half
    size: str | None  # "small" / "large"; None for fracture and occlusion
    size_value: float | None
    size_unit: str | None
    plane: str  # axial or coronal (CT/MR), frontal (X-ray, angiography), transverse (ultrasound)
    organ: str  # anatomical site named in the caption (brain, lung, kidney, ...)
    arrow: str | None  # arrow colour name, None for no arrow
    doppler: bool
    stored_mode: str  # "L" or "RGB"
    width: int
    height: int
    template: int  # which caption template
    wording: int  # which descriptor / region wording


def _matches(facts: dict[str, Any], rule: dict[str, str]) -> bool:
    return all(facts.get(k) == v for k, v in rule.items())


def is_held_out(facts: dict[str, Any], rules: tuple[dict[str, str], ...] = HELD_OUT_RULES) -> bool:
    """True when ``facts`` (modality, region, finding, side ...) match one of ``rules``
    (default :data:`HELD_OUT_RULES`)."""
    return any(_matches(facts, rule) for rule in rules)


def _check_modalities(modalities: tuple[str, ...] | None) -> tuple[str, ...]:
    if modalities is None:
        return MODALITIES
    unknown = [m for m in modalities if m not in DESIGN]
    if unknown or not modalities:
        raise PhantomOptionError(
            f"modalities must be a non-empty subset of {', '.join(MODALITIES)}; got {', '.join(modalities) or 'none'}"
        )
    return tuple(m for m in MODALITIES if m in modalities)  # canonical order


def held_out_rules(modalities: tuple[str, ...] | None = None) -> tuple[dict[str, str], ...]:
    """The :data:`HELD_OUT_RULES` that apply to a dataset of these modalities: those that match
    some image of the design and leave every value of every fact in train (with all five
    modalities, all four)."""
    mods = _check_modalities(modalities)
    combos = [
        {"modality": m, "region": r, "finding": f, "side": side}
        for m in mods
        for r, findings in DESIGN[m].items()
        for f in findings
        for side in SIDES
    ]
    values = {k: {c[k] for c in combos} for k in ("modality", "region", "finding", "side")}
    active: list[dict[str, str]] = []
    for rule in HELD_OUT_RULES:
        rules = (*active, rule)
        train = [c for c in combos if not is_held_out(c, rules)]
        if any(_matches(c, rule) for c in combos) and all(
            {c[k] for c in train} == v for k, v in values.items()
        ):
            active.append(rule)
    return tuple(active)


def _organ(modality: str, region: str, finding: str) -> str:
    if region == "head":
        return "skull" if finding == "fracture" else ("artery" if modality == "angiography" else "brain")
    if region == "chest":
        return "lung"
    if region == "abdomen":
        if modality == "angiography":
            return "artery"
        return "liver" if modality == "ultrasound" else "kidney"
    if region == "neck":
        return "thyroid"
    # knee
    if modality == "angiography":
        return "artery"
    return {"fracture": "tibia", "cyst": "popliteal fossa"}.get(finding, "femur")


CORONAL_FRACTION = 0.3  # of the CT/MR head and abdomen images that may be coronal


def _planes(modality: str, region: str, finding: str) -> tuple[str, ...]:
    """The planes a phantom can be drawn in: CT/MR heads and abdomens also coronally (not the
    skull fracture, which is drawn on the axial skull ring)."""
    if modality in ("ct", "mri"):
        if region in ("head", "abdomen") and finding != "fracture":
            return ("axial", "coronal")
        return ("axial",)
    return ("transverse",) if modality == "ultrasound" else ("frontal",)


def _size_fields(modality: str, region: str, finding: str, size_class: str) -> dict[str, Any]:
    """size, size_value and size_unit of a lesion; all None for findings without a size."""
    if finding not in SIZED_FINDINGS:
        return {"size": None, "size_value": None, "size_unit": None}
    unit, small, large, _ = SIZE_TABLE[(modality, region)]
    return {"size": size_class, "size_value": small if size_class == "small" else large, "size_unit": unit}


def _sample_facts(rng: np.random.Generator, modalities: tuple[str, ...]) -> dict[str, str]:
    mods = list(modalities)
    p = np.array([MODALITY_WEIGHTS[m] for m in mods])
    modality = mods[int(rng.choice(len(mods), p=p / p.sum()))]
    regions = list(DESIGN[modality])
    region = regions[int(rng.integers(len(regions)))]
    findings = DESIGN[modality][region]
    finding = findings[int(rng.integers(len(findings)))]
    side = SIDES[int(rng.integers(2))]
    return {"modality": modality, "region": region, "finding": finding, "side": side}


def _sample_params(
    rng: np.random.Generator,
    held_out_rule: dict[str, str] | None,
    size_range: tuple[int, int],
    modalities: tuple[str, ...] = MODALITIES,
    rules: tuple[dict[str, str], ...] = HELD_OUT_RULES,
) -> PhantomParams:
    """Draw one image's parameters. ``held_out_rule``: None for a training-distribution image
    (matching none of ``rules``), else a rule the image must match."""
    for _ in range(10_000):
        facts = _sample_facts(rng, modalities)
        if held_out_rule is None and not is_held_out(facts, rules):
            break
        if held_out_rule is not None and _matches(facts, held_out_rule):
            break
    else:  # pragma: no cover - the rules are all satisfiable; this guards a bad edit of DESIGN
        raise RuntimeError(f"cannot sample a phantom matching {held_out_rule}")
    modality, region, finding = facts["modality"], facts["region"], facts["finding"]
    size_class = SIZE_CLASSES[int(rng.integers(2))]
    planes = _planes(modality, region, finding)
    plane = planes[1] if len(planes) > 1 and rng.random() < CORONAL_FRACTION else planes[0]
    # Colour: arrows on any modality but ultrasound, colour Doppler on ultrasound.
    arrow: str | None = None
    doppler = False
    if modality == "ultrasound":
        doppler = bool(rng.random() < 0.5)
    elif rng.random() < 0.35:
        arrow = ("yellow", "red", "blue", "green", "white")[int(rng.integers(5))]
    has_color = doppler or (arrow is not None and arrow != "white")
    stored_mode = "RGB" if has_color or rng.random() < 0.5 else "L"
    lo, hi = size_range
    for _ in range(100):  # varied aspect, within ROCOv2-like bounds
        width, height = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        if 0.7 <= width / height <= 1.45:
            break
    return PhantomParams(
        modality=modality,
        region=region,
        finding=finding,
        side=facts["side"],
        **_size_fields(modality, region, finding, size_class),
        plane=plane,
        organ=_organ(modality, region, finding),
        arrow=arrow,
        doppler=doppler,
        stored_mode=stored_mode,
        width=width,
        height=height,
        template=int(rng.integers(3)),
        wording=int(rng.integers(2)),
    )


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------

_DESCRIPTORS: dict[tuple[str, str], tuple[str, str]] = {
    ("ct", "mass"): ("enhancing mass", "hyperdense mass"),
    ("ct", "cyst"): ("hypodense cyst", "well-defined cystic lesion"),
    ("ct", "fracture"): ("depressed fracture", "displaced fracture"),
    ("mri", "mass"): ("heterogeneous mass", "solid mass"),
    ("mri", "cyst"): ("T2-hyperintense cyst", "well-defined cystic lesion"),
    ("xray", "mass"): ("rounded mass", "well-defined mass"),
    ("xray", "fracture"): ("displaced fracture", "fracture"),
    ("ultrasound", "mass"): ("hyperechoic mass", "echogenic solid mass"),
    ("ultrasound", "cyst"): ("anechoic cyst", "simple cyst"),
    ("angiography", "aneurysm"): ("saccular aneurysm", "aneurysm"),
    ("angiography", "occlusion"): ("occlusion", "abrupt occlusion"),
}

_REGION_WORDS: dict[tuple[str, str], tuple[str, str]] = {
    ("ct", "head"): ("head", "brain"),
    ("mri", "head"): ("brain", "head"),
    ("ct", "chest"): ("chest", "thorax"),
    ("ct", "abdomen"): ("abdomen", "abdomen"),
    ("mri", "abdomen"): ("abdomen", "abdomen"),
    ("mri", "knee"): ("knees", "knees"),
    ("xray", "chest"): ("chest", "chest"),
    ("xray", "knee"): ("both knees", "knees"),
    ("ultrasound", "abdomen"): ("upper abdomen", "abdomen"),
    ("ultrasound", "neck"): ("thyroid", "neck"),
    ("angiography", "head"): ("head", "brain"),
    ("angiography", "abdomen"): ("abdomen", "abdominal aorta and iliac arteries"),
    ("angiography", "knee"): ("knees", "lower limbs at the knees"),
}


def _location(p: PhantomParams) -> str:
    s = p.side
    key = (p.modality, p.region, p.finding)
    if p.region == "head":
        if p.finding == "fracture":
            return f"of the {s} parietal bone"
        if p.modality == "angiography":
            return f"of the {s} middle cerebral artery"
        return f"in the {s} cerebral hemisphere"
    if p.region == "chest":
        return f"in the {s} lung"
    if p.region == "abdomen":
        if p.modality == "angiography":
            return f"of the {s} common iliac artery"
        if p.modality == "ultrasound":
            return f"in the {s} lobe of the liver"
        return f"in the {s} kidney"
    if p.region == "neck":
        return f"in the {s} thyroid lobe"
    # knee
    if p.modality == "angiography":
        return f"of the {s} popliteal artery"
    if key[2] == "fracture":
        return f"of the {s} proximal tibia"
    if key[2] == "cyst":
        return f"in the {s} popliteal fossa"
    return f"in the {s} distal femur"


def _article(next_word: str) -> str:
    w = next_word.lower()
    if w[:1].isdigit():
        # "an 8 mm", "an 11 cm", "an 18 mm": said with a vowel sound
        return "an" if w.startswith("8") or w.split(" ")[0] in ("11", "18") else "a"
    return "an" if w[:1] in "aeiou" else "a"


def _format_number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def compose_caption(p: PhantomParams) -> str:
    """The ROCOv2-style caption of a phantom, composed only from its drawing parameters."""
    desc = _DESCRIPTORS[(p.modality, p.finding)][p.wording]
    region = _REGION_WORDS[(p.modality, p.region)][p.wording]
    if p.size_value is not None:
        phrase = f"{_format_number(p.size_value)} {p.size_unit} {desc}"
    else:
        phrase = desc
    finding = f"{_article(phrase)} {phrase} {_location(p)}"
    if p.finding == "occlusion":
        finding = f"{desc} {_location(p)}"
    arrow = " (arrow)" if p.arrow else ""
    t = p.template
    if p.modality == "ct":
        head = (
            f"{p.plane.capitalize()} CT of the {region} showing",
            f"{p.plane.capitalize()} contrast-enhanced CT image of the {region} demonstrates",
            f"CT scan of the {region} ({p.plane} view) showing",
        )[t]
    elif p.modality == "mri":
        head = (
            f"{p.plane.capitalize()} T2-weighted MRI of the {region} showing",
            f"{p.plane.capitalize()} T2-weighted MR image of the {region} demonstrates",
            f"MRI of the {region}, {p.plane} T2-weighted image, showing",
        )[t]
    elif p.modality == "xray":
        if p.region == "chest":
            head = (
                "Chest X-ray (PA view) showing",
                "Posteroanterior chest radiograph demonstrates",
                "Frontal chest X-ray showing",
            )[t]
        else:
            head = (
                f"Anteroposterior X-ray of {region} showing",
                f"AP radiograph of {region} demonstrates",
                f"Frontal X-ray of {region} showing",
            )[t]
    elif p.modality == "ultrasound":
        kind = "Color Doppler ultrasound" if p.doppler else "Ultrasound"
        head = (
            f"Transverse {kind.lower() if p.doppler else 'ultrasound'} of the {region} showing",
            f"{kind} image of the {region} (transverse view) demonstrates",
            f"{kind} of the {region}, transverse view, showing",
        )[t]
    else:
        head = (
            f"Digital subtraction angiography of the {region} (AP view) showing",
            f"Frontal angiogram of the {region} demonstrates",
            f"AP DSA of the {region} showing",
        )[t]
    text = f"{head} {finding}{arrow}."
    return text[0].upper() + text[1:]


# Keyword patterns for caption_facts, checked in order (first match wins within a fact).
_MODALITY_PATTERNS = (
    ("angiography", r"\bangiogra\w*|\bdsa\b|\baortogra\w*|\bsubtraction\b"),
    ("ultrasound", r"\bultraso\w*|\bsonogra\w*|\bdoppler\b|\bus\b"),
    ("mri", r"\bmri\b|\bmr\b|\bmagnetic resonance\b|\bt2\s*-?\s*weighted\b|\bt2weighted\b"),
    ("ct", r"\bct\b|\bcomputed tomography\b"),
    ("xray", r"\bx\s*-?\s*rays?\b|\bradiograph\w*|\bxrays?\b"),
)
_REGION_PATTERNS = (
    ("head", r"\bhead\b|\bbrain\b|\bcerebral\b|\bskull\b|\bparietal\b|\bcranial\b"),
    ("neck", r"\bneck\b|\bthyroid\b"),
    ("chest", r"\bchest\b|\bthorax\b|\bthoracic\b|\blungs?\b"),
    ("knee", r"\bknees?\b|\bfemur\b|\btibia\b|\bpopliteal\b|\blower limbs?\b"),
    ("abdomen", r"\babdom\w*|\bkidneys?\b|\bliver\b|\biliac\b|\brenal\b"),
)
_FINDING_PATTERNS = (
    ("aneurysm", r"\baneurysm\w*"),
    ("occlusion", r"\bocclu\w*"),
    ("fracture", r"\bfractur\w*"),
    ("cyst", r"\bcyst\w*"),
    ("mass", r"\bmass\w*|\btumou?r\b|\bnodule\b|\bopacity\b"),
)
_PLANE_PATTERNS = (
    ("axial", r"\baxial\b"),
    ("coronal", r"\bcoronal\b"),
    ("sagittal", r"\bsagittal\b"),
    ("transverse", r"\btransverse\b"),
    ("frontal", r"\bfrontal\b|\bpa\b|\bap\b|\bposteroanterior\b|\banteroposterior\b"),
)


def _first_match(text: str, patterns: tuple[tuple[str, str], ...]) -> str | None:
    best: tuple[int, str] | None = None
    for value, pattern in patterns:
        m = re.search(pattern, text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), value)
    return None if best is None else best[1]


def caption_facts(caption: str) -> dict[str, str | None]:
    """Parse modality, plane, region, finding, side and size back out of a caption.

    Robust to case, missing punctuation and hyphens ("xray", "x ray", "t2weighted"). A fact that is
    not stated (or stated ambiguously, e.g. both "left" and "right") is None. ``size`` is the size
    class ("small" / "large") nearest to the stated number, given the modality and region; it is
    None when any of them is missing. The earliest mention wins for modality, region and finding.
    """
    text = " " + caption.lower().replace("\u2011", "-") + " "
    facts: dict[str, str | None] = {
        "modality": _first_match(text, _MODALITY_PATTERNS),
        "plane": _first_match(text, _PLANE_PATTERNS),
        "region": _first_match(text, _REGION_PATTERNS),
        "finding": _first_match(text, _FINDING_PATTERNS),
    }
    has_left, has_right = bool(re.search(r"\bleft\b", text)), bool(re.search(r"\bright\b", text))
    facts["side"] = "left" if has_left and not has_right else "right" if has_right and not has_left else None
    size: str | None = None
    m = re.search(r"(\d+(?:\.\d+)?)\s*(mm|cm)\b", text)
    key = (facts["modality"], facts["region"])
    if m and key in SIZE_TABLE:
        unit, small, large, _ = SIZE_TABLE[key]  # type: ignore[index]
        value = float(m.group(1)) * (10.0 if m.group(2) == "cm" else 1.0) / (10.0 if unit == "cm" else 1.0)
        if value > 0:
            size = "small" if abs(math.log(value / small)) <= abs(math.log(value / large)) else "large"
    facts["size"] = size
    return facts


# ----------------------------------------------------------------------------------------------
# Drawing: a work canvas in body units, soft shapes, texture
# ----------------------------------------------------------------------------------------------

WORK_SIDE = 352  # images are drawn at this longest side, then resized to their stored size


class _Canvas:
    """A float image with coordinates in body units: (0, 0) at the body centre, x to the image
    right, y down, 1 unit = ``s`` pixels (half the shorter side, times a fill factor)."""

    def __init__(self, w: int, h: int, rng: np.random.Generator, fill: float = 0.9):
        self.w, self.h = w, h
        self.s = 0.5 * min(w, h) * fill * float(rng.uniform(0.94, 1.04))
        self.cx = w / 2 + float(rng.uniform(-0.03, 0.03)) * w
        self.cy = h / 2 + float(rng.uniform(-0.03, 0.03)) * h
        xs = (np.arange(w, dtype=np.float32) - self.cx + 0.5) / self.s
        ys = (np.arange(h, dtype=np.float32) - self.cy + 0.5) / self.s
        self.x = xs[None, :]
        self.y = ys[:, None]
        self.img = np.zeros((h, w), dtype=np.float32)

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        return self.cx + x * self.s, self.cy + y * self.s

    def _box(self, x0: float, y0: float, r: float) -> tuple[slice, slice]:
        px, py = self.to_px(x0, y0)
        rp = r * self.s + 2
        xa, xb = max(0, int(px - rp)), min(self.w, int(px + rp) + 1)
        ya, yb = max(0, int(py - rp)), min(self.h, int(py + rp) + 1)
        return slice(ya, max(ya, yb)), slice(xa, max(xa, xb))

    def ellipse(
        self,
        x0: float,
        y0: float,
        a: float,
        b: float,
        theta: float = 0.0,
        lobes: tuple[float, ...] | None = None,
    ) -> tuple[tuple[slice, slice], np.ndarray]:
        """A soft (anti-aliased) ellipse mask inside its bounding box. ``lobes``: (amplitude,
        frequency, phase, ...) triples that modulate the radius, for lobulated shapes."""
        r_max = max(a, b) * (1.0 + (sum(abs(v) for v in lobes[0::3]) if lobes else 0.0))
        box = self._box(x0, y0, r_max)
        dx = self.x[:, box[1]] - x0
        dy = self.y[box[0], :] - y0
        if theta:
            c, s = math.cos(theta), math.sin(theta)
            dx, dy = dx * c + dy * s, -dx * s + dy * c
        r = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
        if lobes:
            phi = np.arctan2(dy, dx)
            mod = np.ones_like(r)
            for amp, freq, phase in zip(lobes[0::3], lobes[1::3], lobes[2::3], strict=True):
                mod = mod + amp * np.sin(freq * phi + phase)
            r = r / mod
        mask = np.clip((1.0 - r) * (min(a, b) * self.s) + 0.5, 0.0, 1.0)
        return box, mask

    def paint(self, value: float | np.ndarray, x0: float, y0: float, a: float, b: float, **kw: Any) -> None:
        """Paint an ellipse with ``value`` (a number, or a full-canvas array sampled in the box)."""
        box, m = self.ellipse(x0, y0, a, b, **kw)
        v = value[box] if isinstance(value, np.ndarray) else value
        self.img[box] = self.img[box] * (1.0 - m) + v * m

    def add(self, delta: float, x0: float, y0: float, a: float, b: float, **kw: Any) -> None:
        """Add ``delta`` inside an ellipse (projection images sum attenuation)."""
        box, m = self.ellipse(x0, y0, a, b, **kw)
        self.img[box] += delta * m

    def line_mask(self, *polylines: list[tuple[float, float]], width: float) -> np.ndarray:
        """A soft mask of polylines of the given width (body units), with round ends. Drawn by
        Pillow at twice the size and box-reduced, which anti-aliases cheaply."""
        layer = Image.new("L", (2 * self.w, 2 * self.h), 0)
        d = ImageDraw.Draw(layer)
        wp = max(2, round(2 * width * self.s))
        for points in polylines:
            px = [(2 * x, 2 * y) for x, y in (self.to_px(*q) for q in points)]
            d.line(px, fill=255, width=wp, joint="curve")
            r = wp / 2
            for x, y in (px[0], px[-1]):
                d.ellipse((x - r, y - r, x + r, y + r), fill=255)
        return np.asarray(layer.reduce(2), dtype=np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Spatially correlated noise with unit-ish variance (bicubic upsampling of a coarse grid)."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    im = Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.float32)


def _lobes(rng: np.random.Generator, amount: float = 0.12) -> tuple[float, ...]:
    return (
        amount,
        float(rng.integers(3, 6)),
        float(rng.uniform(0, 6.28)),
        amount * 0.6,
        float(rng.integers(6, 9)),
        float(rng.uniform(0, 6.28)),
    )


@dataclass
class _Drawn:
    """What an anatomy drawer hands back: the lesion centre and radius, and the vessels that a
    colour Doppler overlay may fill (all in body units)."""

    lesion: tuple[float, float]
    lesion_r: float
    vessels: list[tuple[float, float, float, str]]  # x, y, r in body units; "red" / "blue"


def _side_sign(side: str) -> float:
    # Radiological convention: the patient's right is on the image left.
    return -1.0 if side == "right" else 1.0


def _lesion_radius(p: PhantomParams, body_width_units: float) -> float:
    if p.size_value is None:
        return 0.0
    _, _, _, field = SIZE_TABLE[(p.modality, p.region)]
    return 0.5 * p.size_value / field * body_width_units


# Tissue intensities of the two cross-sectional modalities. CT: bone white, fat dark grey, air
# black; T2 MR: fat and fluid bright, cortical bone and air black, flowing blood black.
_CT = {
    "air": 0.02, "fat": 0.30, "muscle": 0.48, "gm": 0.50, "wm": 0.43, "csf": 0.24, "bone": 0.97,
    "marrow": 0.72, "lung": 0.05, "liver": 0.58, "spleen": 0.55, "kidney": 0.66, "medulla": 0.52,
    "blood": 0.70, "bowel": 0.50, "gas": 0.03, "scalp": 0.46,
}  # fmt: skip
_MR = {
    "air": 0.01, "fat": 0.82, "muscle": 0.20, "gm": 0.52, "wm": 0.36, "csf": 0.95, "bone": 0.04,
    "marrow": 0.66, "lung": 0.02, "liver": 0.24, "spleen": 0.50, "kidney": 0.56, "medulla": 0.72,
    "blood": 0.03, "bowel": 0.45, "gas": 0.02, "scalp": 0.78,
}  # fmt: skip


def _draw_lesion_xs(
    c: _Canvas,
    p: PhantomParams,
    pal: dict[str, float],
    x0: float,
    y0: float,
    r: float,
    rng: np.random.Generator,
) -> None:
    """Mass or cyst on a CT/MR section."""
    if p.finding == "cyst":
        squash, theta = float(rng.uniform(0.85, 1.0)), float(rng.uniform(0, 3))
        if p.modality == "ct":
            c.paint(0.16, x0, y0, r, r * squash, theta=theta)
        else:
            # A thin dark rim (chemical-shift artefact at the fat-water border) keeps the bright
            # cyst visible where it lies in bright fat.
            c.paint(0.08, x0, y0, r * 1.12, r * squash * 1.12, theta=theta)
            c.paint(0.97, x0, y0, r, r * squash, theta=theta)
        return
    # Mass: lobulated, heterogeneous; on CT bright (enhancing) with a dark oedema halo in the
    # brain; on MR intermediate with a dark rim and bright necrotic spots.
    lobes = _lobes(rng)
    tex = _smooth_noise(rng, c.h, c.w, 6)
    if p.modality == "ct":
        if p.region == "head":
            c.paint(0.33, x0, y0, r * 1.35, r * 1.3, lobes=lobes)
        c.paint(0.80 + 0.07 * tex, x0, y0, r, r * 0.92, lobes=lobes)
    else:
        c.paint(0.10, x0, y0, r * 1.12, r * 1.05, lobes=lobes)
        c.paint(0.50 + 0.14 * tex, x0, y0, r, r * 0.92, lobes=lobes)
        c.paint(0.85, x0 + 0.2 * r, y0 - 0.15 * r, r * 0.28, r * 0.22)


def _draw_head_xs(c: _Canvas, p: PhantomParams, pal: dict[str, float], rng: np.random.Generator) -> _Drawn:
    a, b = 0.70 * float(rng.uniform(0.95, 1.03)), 0.88
    sg = _side_sign(p.side)
    c.paint(pal["scalp"], 0, 0, a, b)
    c.paint(pal["bone"], 0, 0, a * 0.95, b * 0.955)
    c.paint(pal["csf"], 0, 0, a * 0.87, b * 0.885)
    tex = _smooth_noise(rng, c.h, c.w, 10)
    c.paint(pal["gm"] + 0.02 * tex, 0, 0, a * 0.84, b * 0.86)
    c.paint(pal["wm"] + 0.02 * tex, 0, 0.02, a * 0.62, b * 0.66)
    for sx in (-1, 1):  # lateral ventricles and the falx
        c.paint(pal["csf"], sx * 0.11, -0.02, 0.055, 0.25, theta=sx * 0.12)
    box, m = c.ellipse(0, 0, 0.012, b * 0.84)
    c.img[box] = c.img[box] * (1 - m) + pal["csf"] * m
    if p.finding == "fracture":
        # Depressed skull fracture at the side: the bone arc is broken, a fragment pushed in,
        # and a large scalp haematoma bulges outside.
        ang = math.pi + float(rng.uniform(-0.5, 0.5)) if sg < 0 else float(rng.uniform(-0.5, 0.5))
        ex, ey = a * math.cos(ang), b * math.sin(ang)
        c.paint(pal["scalp"] + 0.08, ex * 1.02, ey * 1.02, 0.2, 0.3, theta=ang)
        c.paint(pal["csf"] * 0.6, ex * 0.95, ey * 0.95, 0.06, 0.22, theta=ang)  # gap in the bone
        c.paint(pal["bone"], ex * 0.82, ey * 0.82, 0.045, 0.2, theta=ang)  # fragment pushed in
        return _Drawn((ex * 0.9, ey * 0.9), 0.2, [])
    r = _lesion_radius(p, 2 * a)
    x0 = sg * float(rng.uniform(0.28, 0.42))
    y0 = float(rng.uniform(-0.35, 0.35))
    _draw_lesion_xs(c, p, pal, x0, y0, r, rng)
    return _Drawn((x0, y0), r, [])


def _draw_table(c: _Canvas, y: float, v: float) -> None:
    # The CT couch: a bright curved band under the patient (CT only).
    for i, yy in enumerate((y, y + 0.06)):
        c.paint(v * (1.0 - 0.3 * i), 0, yy + 0.9, 1.6, 0.9)
        c.paint(0.02, 0, yy + 0.93, 1.7, 0.9)


def _draw_chest_xs(c: _Canvas, p: PhantomParams, pal: dict[str, float], rng: np.random.Generator) -> _Drawn:
    a, b = 0.95, 0.64 * float(rng.uniform(0.95, 1.05))
    sg = _side_sign(p.side)
    c.paint(pal["fat"], 0, 0, a, b)
    c.paint(pal["muscle"], 0, 0, a * 0.92, b * 0.88)
    for k in range(16):  # ribs round the chest wall
        t = 2 * math.pi * k / 16 + 0.1
        c.paint(pal["bone"], a * 0.84 * math.cos(t), b * 0.8 * math.sin(t), 0.035, 0.035)
    for sx in (-1, 1):
        c.paint(pal["lung"], sx * 0.42, -0.02, 0.32, b * 0.7, theta=sx * 0.1)
    for _ in range(14):  # pulmonary vessels
        sx = float(rng.choice([-1, 1]))
        c.paint(
            0.35 if p.modality == "ct" else 0.1,
            sx * float(rng.uniform(0.25, 0.6)),
            float(rng.uniform(-0.3, 0.3)),
            0.015,
            0.015,
        )
    c.paint(pal["muscle"] + 0.05, 0.1, -0.06, 0.24, 0.27)  # heart, to the patient's left
    c.paint(pal["blood"], -0.08, -0.28, 0.06, 0.06)  # ascending aorta
    c.paint(pal["blood"], 0.12, 0.28, 0.06, 0.06)  # descending aorta
    c.paint(pal["bone"], 0, 0.46, 0.11, 0.1)  # vertebral body: cortex and marrow
    c.paint(pal["marrow"], 0, 0.46, 0.085, 0.075)
    c.paint(pal["bone"], 0, 0.6, 0.03, 0.08)
    c.paint(pal["bone"], 0, -b * 0.86, 0.08, 0.035)  # sternum
    r = _lesion_radius(p, 2 * a)
    x0, y0 = sg * float(rng.uniform(0.38, 0.5)), float(rng.uniform(-0.18, 0.15))
    lobes = _lobes(rng, 0.18)
    tex = _smooth_noise(rng, c.h, c.w, 6)
    c.paint(0.56 + 0.05 * tex, x0, y0, r, r * 0.95, lobes=lobes)
    _draw_table(c, b, 0.42)
    return _Drawn((x0, y0), r, [])


def _draw_abdomen_xs(c: _Canvas, p: PhantomParams, pal: dict[str, float], rng: np.random.Generator) -> _Drawn:
    a, b = 0.95, 0.7 * float(rng.uniform(0.93, 1.05))
    sg = _side_sign(p.side)
    c.paint(pal["fat"], 0, 0, a, b)
    c.paint(pal["muscle"], 0, 0.02, a * 0.88, b * 0.84)
    c.paint(pal["fat"], 0, 0.02, a * 0.84, b * 0.78)
    for _ in range(12):  # bowel loops, some with gas
        bx, by = float(rng.uniform(-0.35, 0.45)), float(rng.uniform(-0.5, 0.1))
        c.paint(pal["bowel"], bx, by, 0.09, 0.07, theta=float(rng.uniform(0, 3)))
        if rng.random() < 0.4:
            c.paint(pal["gas"], bx, by - 0.01, 0.05, 0.035)
    tex = _smooth_noise(rng, c.h, c.w, 12)
    c.paint(pal["liver"] + 0.02 * tex, -0.42, -0.12, 0.42, 0.4, theta=0.3)  # liver: patient's right
    c.paint(pal["spleen"], 0.6, 0.12, 0.15, 0.22, theta=-0.5)
    kx, ky = 0.34, 0.3
    for sx in (-1, 1):
        c.paint(pal["kidney"], sx * kx, ky, 0.13, 0.17, theta=sx * 0.5)
        c.paint(pal["medulla"], sx * (kx - 0.02), ky, 0.05, 0.08, theta=sx * 0.5)
    c.paint(pal["bone"], 0, 0.45, 0.12, 0.11)
    c.paint(pal["marrow"], 0, 0.45, 0.095, 0.085)
    c.paint(pal["bone"], 0, 0.6, 0.03, 0.08)
    c.paint(pal["muscle"], -0.17, 0.46, 0.06, 0.1)  # psoas
    c.paint(pal["muscle"], 0.17, 0.46, 0.06, 0.1)
    c.paint(pal["blood"], 0.06, 0.27, 0.055, 0.055)  # aorta
    c.paint(pal["blood"] - 0.05, -0.1, 0.25, 0.06, 0.045)  # IVC
    r = _lesion_radius(p, 2 * a)
    # On the kidney of that side, bulging outward so the lesion clears the kidney outline.
    x0 = sg * (kx + 0.06 + 0.4 * r)
    y0 = ky + float(rng.uniform(-0.08, 0.04))
    _draw_lesion_xs(c, p, pal, x0, y0, r, rng)
    if p.modality == "ct":
        _draw_table(c, b, 0.42)
    return _Drawn((x0, y0), r, [])


def _draw_knees_xs(c: _Canvas, p: PhantomParams, pal: dict[str, float], rng: np.random.Generator) -> _Drawn:
    sg = _side_sign(p.side)
    lr = 0.42
    for sx in (-1, 1):
        cx = sx * 0.47
        c.paint(pal["fat"], cx, 0, lr, lr * 0.92)
        c.paint(pal["muscle"], cx, 0.02, lr * 0.85, lr * 0.78)
        c.paint(pal["bone"], cx, -0.02, 0.27, 0.2)  # femoral condyles
        c.paint(pal["marrow"], cx, -0.02, 0.24, 0.17)
        c.paint(pal["csf"] * 0.8 + 0.1, cx, -0.25, 0.12, 0.04)  # joint fluid in front
        c.paint(pal["bone"], cx, -0.33, 0.1, 0.05)  # patella
        c.paint(pal["marrow"], cx, -0.33, 0.08, 0.035)
        c.paint(pal["blood"], cx + sx * 0.03, 0.25, 0.035, 0.035)  # popliteal vessels
    cx = sg * 0.47
    r = _lesion_radius(p, 1.9)
    if p.finding == "cyst":  # Baker's cyst in the popliteal fossa, behind the medial condyle
        x0, y0 = cx - sg * 0.08, 0.22 + 0.4 * r
    else:
        x0, y0 = cx + float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.06, 0.02))
    _draw_lesion_xs(c, p, pal, x0, y0, r, rng)
    return _Drawn((x0, y0), r, [])


def _draw_head_coronal(
    c: _Canvas, p: PhantomParams, pal: dict[str, float], rng: np.random.Generator
) -> _Drawn:
    """Coronal head: the skull vault above, the neck below, a butterfly of lateral ventricles."""
    a, b, yc = 0.7 * float(rng.uniform(0.95, 1.03)), 0.7, -0.14
    sg = _side_sign(p.side)
    c.paint(pal["muscle"], 0, 0.9, 0.34, 0.4)  # neck
    c.paint(pal["scalp"], 0, yc, a, b)
    c.paint(pal["bone"], 0, yc, a * 0.95, b * 0.95)
    c.paint(pal["csf"], 0, yc, a * 0.87, b * 0.87)
    tex = _smooth_noise(rng, c.h, c.w, 10)
    c.paint(pal["gm"] + 0.02 * tex, 0, yc, a * 0.84, b * 0.83)
    for sx in (-1, 1):
        c.paint(pal["wm"] + 0.02 * tex, sx * 0.3, yc - 0.05, 0.3, 0.42, theta=sx * 0.2)  # hemispheres
        c.paint(pal["csf"], sx * 0.1, yc - 0.05, 0.06, 0.14, theta=-sx * 0.5)  # lateral ventricles
        c.paint(pal["csf"], sx * 0.45, yc + 0.25, 0.18, 0.02, theta=-sx * 0.4)  # Sylvian fissures
        c.paint(pal["bone"], sx * 0.4, yc + 0.6, 0.2, 0.05, theta=sx * 0.35)  # skull base
    c.paint(pal["gm"], 0, 0.42, 0.1, 0.3)  # brainstem running down into the neck
    c.paint(pal["csf"], 0, yc - 0.35, 0.012, 0.35)  # interhemispheric fissure
    r = _lesion_radius(p, 2 * a)
    x0 = sg * float(rng.uniform(0.3, 0.42))
    y0 = yc + float(rng.uniform(-0.35, 0.1))
    _draw_lesion_xs(c, p, pal, x0, y0, r, rng)
    return _Drawn((x0, y0), r, [])


def _draw_abdomen_coronal(
    c: _Canvas, p: PhantomParams, pal: dict[str, float], rng: np.random.Generator
) -> _Drawn:
    """Coronal abdomen: lung bases above, liver under the right dome, both kidneys upright beside
    a column of vertebrae, psoas muscles and iliac wings below."""
    sg = _side_sign(p.side)
    c.paint(pal["fat"], 0, 0.1, 0.95, 1.35)
    c.paint(pal["muscle"], 0, 0.1, 0.88, 1.3)
    c.paint(pal["fat"], 0, 0.1, 0.83, 1.25)
    for _ in range(12):  # bowel loops in the lower abdomen
        bx, by = float(rng.uniform(-0.45, 0.45)), float(rng.uniform(0.2, 0.85))
        c.paint(pal["bowel"], bx, by, 0.09, 0.07, theta=float(rng.uniform(0, 3)))
        if rng.random() < 0.4:
            c.paint(pal["gas"], bx, by - 0.01, 0.05, 0.035)
    for sx in (-1, 1):
        c.paint(pal["lung"], sx * 0.42, -1.0, 0.34, 0.3)  # lung bases over the diaphragm
        c.paint(pal["bone"], sx * 0.58, 0.98, 0.26, 0.1, theta=-sx * 0.4)  # iliac wings
        c.paint(pal["muscle"], sx * 0.2, 0.5, 0.07, 0.42, theta=-sx * 0.25)  # psoas
    tex = _smooth_noise(rng, c.h, c.w, 12)
    c.paint(pal["liver"] + 0.02 * tex, -0.4, -0.48, 0.44, 0.3, theta=0.15)  # liver: patient's right
    c.paint(pal["spleen"], 0.55, -0.52, 0.17, 0.22, theta=-0.3)
    kx, ky = 0.34, -0.05
    for sx in (-1, 1):
        c.paint(pal["kidney"], sx * kx, ky, 0.12, 0.24, theta=-sx * 0.15)
        c.paint(pal["medulla"], sx * (kx - 0.03), ky, 0.04, 0.12, theta=-sx * 0.15)
    for k in range(-5, 6):  # vertebral bodies and discs
        c.paint(pal["bone"], 0, 0.18 * k, 0.1, 0.075)
        c.paint(pal["marrow"], 0, 0.18 * k, 0.08, 0.055)
    c.paint(pal["blood"], 0.07, -0.2, 0.035, 0.55)  # aorta
    r = _lesion_radius(p, 1.8)
    x0 = sg * (kx + 0.05 + 0.4 * r)
    y0 = ky + float(rng.uniform(-0.12, 0.12))
    _draw_lesion_xs(c, p, pal, x0, y0, r, rng)
    return _Drawn((x0, y0), r, [])


def _draw_cross_section(p: PhantomParams, c: _Canvas, rng: np.random.Generator) -> _Drawn:
    pal = dict(_CT if p.modality == "ct" else _MR)
    # Window/level jitter so absolute grey values are not a give-away.
    gain, offset = float(rng.uniform(0.9, 1.08)), float(rng.uniform(-0.04, 0.04))
    pal = {k: v * gain + offset for k, v in pal.items()}
    pal["air"] = max(0.0, pal["air"])
    c.img[:] = pal["air"]
    drawer = {
        ("head", "axial"): _draw_head_xs,
        ("head", "coronal"): _draw_head_coronal,
        ("chest", "axial"): _draw_chest_xs,
        ("abdomen", "axial"): _draw_abdomen_xs,
        ("abdomen", "coronal"): _draw_abdomen_coronal,
        ("knee", "axial"): _draw_knees_xs,
    }
    drawn = drawer[(p.region, p.plane)](c, p, pal, rng)
    if p.modality == "mri":
        # Coil shading: brighter towards the surface coils, and Rician-like noise in the air.
        bias = 1.0 + 0.18 * (np.sqrt(c.x**2 + c.y**2) - 0.5) + 0.06 * _smooth_noise(rng, c.h, c.w, 80)
        c.img *= bias
        c.img += np.abs(0.025 * rng.standard_normal(c.img.shape, dtype=np.float32))
    else:
        c.img += 0.025 * rng.standard_normal(c.img.shape, dtype=np.float32)
    c.img += 0.015 * _smooth_noise(rng, c.h, c.w, 4)
    return drawn


def _draw_xray(p: PhantomParams, c: _Canvas, rng: np.random.Generator) -> _Drawn:
    """Frontal projection: attenuation adds up, bones bright on a dark background."""
    sg = _side_sign(p.side)
    c.img[:] = 0.05
    tex = _smooth_noise(rng, c.h, c.w, 14)
    if p.region == "chest":
        c.add(0.36, 0, 0.3, 0.92, 1.1)  # trunk
        c.add(0.2, 0, -0.95, 0.22, 0.3)  # neck
        for sx in (-1, 1):
            c.add(0.14, sx * 0.66, -0.6, 0.38, 0.2, theta=sx * 0.35)  # shoulders
            c.add(0.22, sx * 0.86, -0.68, 0.17, 0.14)  # humeral heads
            c.add(-0.22, sx * 0.37, -0.06, 0.27, 0.56, theta=-sx * 0.08)  # lung fields
            ribs = [  # posterior ribs: arcs across each lung
                [
                    (sx * (0.05 + 0.7 * t), -0.55 + 0.13 * k + 0.14 * t - 0.2 * t * t)
                    for t in np.linspace(0, 1, 9)
                ]
                for k in range(8)
            ]
            c.img += 0.09 * c.line_mask(*ribs, width=0.035)
            c.img += 0.22 * c.line_mask([(sx * 0.08, -0.62), (sx * 0.55, -0.72)], width=0.05)  # clavicles
        c.add(0.28, 0.09, 0.22, 0.3, 0.27)  # heart, to the patient's left
        c.add(0.25, 0, 0.75, 0.9, 0.2)  # diaphragm and upper abdomen
        c.img += 0.2 * c.line_mask([(0, -1.2), (0, 1.2)], width=0.13)  # spine
        r = _lesion_radius(p, 1.9)
        x0, y0 = sg * float(rng.uniform(0.38, 0.48)), float(rng.uniform(-0.38, 0.0))
        c.add(0.4, x0, y0, r, r * 0.95, lobes=_lobes(rng, 0.1))
        drawn = _Drawn((x0, y0), r, [])
    else:  # both knees, AP
        drawn = _Drawn((0, 0), 0, [])
        for sx in (-1, 1):
            cx = sx * 0.47
            lat = cx + sx * 0.17  # the fibula lies laterally, away from the midline
            c.add(0.2, cx, -0.78, 0.26, 0.8)  # thigh
            c.add(0.2, cx, 0.72, 0.22, 0.75)  # calf
            c.add(0.04, cx, 0.0, 0.23, 0.2)  # knee
            bone = [[(cx, -1.4), (cx, -0.22)]]  # femoral shaft
            c.add(0.42, cx, -0.12, 0.18, 0.11)  # metaphysis flaring into the condyles
            for dx in (-0.09, 0.09):
                c.add(0.08, cx + dx, -0.06, 0.095, 0.07)
            c.add(0.1, cx, -0.14, 0.08, 0.09)  # patella, faint over the femur
            c.add(0.4, cx, 0.1, 0.2, 0.06)  # tibial plateau
            if sx == sg and p.finding == "fracture":
                # Tibial shaft fracture: the distal fragment is shifted towards the midline and
                # angulated, with a gap and soft-tissue swelling round it.
                yf = float(rng.uniform(0.38, 0.55))
                shift = -sx * 0.11
                bone += [[(cx, 0.12), (cx, yf - 0.03)], [(cx + shift, yf + 0.03), (cx + 1.6 * shift, 1.4)]]
                c.add(0.1, cx, yf, 0.28, 0.2)
                drawn = _Drawn((cx + shift / 2, yf), 0.1, [])
            else:
                bone.append([(cx, 0.12), (cx, 1.4)])  # tibial shaft
            c.img += 0.42 * c.line_mask(*bone, width=0.15)
            c.img -= 0.1 * c.line_mask(*bone, width=0.07)  # medullary cavity: cortex brighter
            c.add(0.3, lat, 0.17, 0.045, 0.045)  # fibular head
            c.img += 0.3 * c.line_mask([(lat, 0.17), (lat - sx * 0.02, 1.4)], width=0.045)
            c.add(-0.22, cx, 0.025, 0.18, 0.014)  # joint space
        if p.finding == "mass":  # a bony mass growing out of the distal femur
            cx = sg * 0.47
            r = _lesion_radius(p, 1.9)
            x0, y0 = cx + sg * (0.06 + 0.5 * r), float(rng.uniform(-0.5, -0.32))
            c.add(0.38, x0, y0, r, r * 1.1, lobes=_lobes(rng, 0.1))
            drawn = _Drawn((x0, y0), r, [])
    c.img += 0.03 * tex + 0.02 * rng.standard_normal(c.img.shape, dtype=np.float32)
    # Exposure jitter and a gamma like film/detector response
    c.img = np.clip(c.img, 0, 1) ** float(rng.uniform(0.8, 1.1)) * float(rng.uniform(0.92, 1.05))
    return drawn


def _draw_ultrasound(p: PhantomParams, c: _Canvas, rng: np.random.Generator) -> _Drawn:
    """Curvilinear probe: a fan with speckle, gain falling with depth, shadows and enhancement."""
    sg = _side_sign(p.side)
    apex_y = -1.05
    half = math.radians(float(rng.uniform(36, 42)))
    rad = np.sqrt(c.x**2 + (c.y - apex_y) ** 2)
    ang = np.arctan2(c.x, c.y - apex_y)
    depth_max = 2.05
    fan = np.clip((half - np.abs(ang)) * c.s * 0.8, 0, 1) * np.clip((depth_max - rad) * c.s, 0, 1)
    fan *= np.clip((rad - 0.12) * c.s, 0, 1)
    echo = np.full_like(c.img, 0.35)  # echogenicity map, drawn like a CT with its own values
    c.img = echo
    vessels: list[tuple[float, float, float, str]] = []
    r_les = 0.0
    if p.region == "neck":
        c.paint(0.7, 0, -0.92, 2.0, 0.08)  # skin line
        c.paint(0.28, 0, -0.72, 2.0, 0.12)  # strap muscles
        for sx in (-1, 1):
            c.paint(0.62, sx * 0.3, -0.3, 0.26, 0.19)  # thyroid lobes
            c.paint(0.22, sx * 0.3, 0.3, 0.2, 0.12)  # longus colli muscles
            # smaller than any cyst, and always on both sides, so a tiny model can't mistake them
            vessels.append((sx * 0.56, -0.02, 0.075, "red"))  # common carotid artery
            vessels.append((sx * 0.64, 0.2, 0.065, "blue"))  # internal jugular vein
        c.paint(0.62, 0, -0.5, 0.2, 0.08)  # isthmus
        c.paint(0.95, 0, -0.4, 0.12, 0.05)  # tracheal ring
        c.paint(0.9, 0, 0.55, 0.3, 0.06)  # vertebral body surface
        r_les = _lesion_radius(p, 1.6)
        x0, y0 = sg * 0.3, -0.3 + float(rng.uniform(-0.04, 0.04))
    else:
        c.paint(0.7, 0, -0.92, 2.0, 0.08)
        c.paint(0.25, 0, -0.8, 2.0, 0.07)  # abdominal wall
        tex = _smooth_noise(rng, c.h, c.w, 14)
        c.paint(0.5 + 0.03 * tex, 0, -0.25, 1.2, 0.55)  # liver, both lobes
        for _ in range(5):  # portal and hepatic vein branches
            c.paint(
                0.04,
                float(rng.uniform(-0.6, 0.6)),
                float(rng.uniform(-0.5, 0.1)),
                0.03,
                0.018,
                theta=float(rng.uniform(0, 3)),
            )
        vessels.append((0.12, 0.5, 0.11, "red"))  # aorta
        vessels.append((-0.18, 0.42, 0.1, "blue"))  # IVC
        c.paint(0.95, 0, 0.82, 0.28, 0.07)  # vertebral body surface
        r_les = _lesion_radius(p, 1.6)
        x0, y0 = sg * float(rng.uniform(0.3, 0.42)), float(rng.uniform(-0.35, -0.1))
    for vx, vy, vr, _ in vessels:
        c.paint(0.03, vx, vy, vr, vr * 0.9)
    if p.finding == "cyst":
        c.paint(0.9, x0, y0, r_les * 1.1, r_les * 1.05)  # thin bright wall
        c.paint(0.02, x0, y0, r_les, r_les * 0.95)
    else:
        # Hyperechoic solid nodule with the hypoechoic halo typical of thyroid and liver nodules
        lobes = _lobes(rng, 0.14)
        c.paint(0.08, x0, y0, r_les * 1.2, r_les * 1.15, lobes=lobes)
        c.paint(0.95, x0, y0, r_les, r_les * 0.95, lobes=lobes)
    # Speckle: multiplicative, Rayleigh distributed (the magnitude of a complex Gaussian), slightly
    # correlated like a real beam's point-spread function.
    re_, im_ = rng.standard_normal((2, *echo.shape), dtype=np.float32)
    speckle = np.sqrt(re_**2 + im_**2) * 0.8
    speckle = 0.5 * speckle + 0.25 * (np.roll(speckle, 1, axis=1) + np.roll(speckle, -1, axis=1))
    img = echo * (0.3 + speckle)
    dist = np.sqrt((c.x - x0) ** 2 + (c.y - y0) ** 2)
    if p.finding == "cyst":  # posterior acoustic enhancement behind fluid
        behind = (c.y > y0) & (c.y < y0 + 4 * r_les) & (np.abs(c.x - x0) < r_les * 0.9) & (dist > r_les)
        img = np.where(behind, img * 1.7, img)
    if p.region == "neck":  # the trachea's air and the spine cast shadows
        img = np.where((c.y > -0.38) & (np.abs(c.x) < 0.1), img * 0.15, img)
        img = np.where((c.y > 0.6) & (np.abs(c.x) < 0.28), img * 0.15, img)
    else:  # so does the spine
        img = np.where((c.y > 0.86) & (np.abs(c.x) < 0.26), img * 0.12, img)
    tgc = np.exp(-0.35 * np.clip(rad - 0.2, 0, None))  # gain falls with depth
    c.img = img * tgc * float(rng.uniform(0.9, 1.15)) * fan
    for k in range(1, 9):  # depth ticks on the right edge, as scanners print them
        c.paint(0.8, 1.25, apex_y + 0.25 * k, 0.012, 0.012)
    return _Drawn((x0, y0), r_les, vessels)


def _tree(
    c: _Canvas,
    layer: ImageDraw.ImageDraw,
    x: float,
    y: float,
    angle: float,
    length: float,
    width: float,
    depth: int,
    rng: np.random.Generator,
) -> None:
    """A recursive vessel tree (angle 0 = up), drawn on an L layer of vessel opacity."""
    pts = [(x, y)]
    a = angle
    steps = 5
    for _ in range(steps):
        a += float(rng.normal(0, 0.12))
        x += math.sin(a) * length / steps
        y -= math.cos(a) * length / steps
        pts.append((x, y))
    layer.line([c.to_px(*q) for q in pts], fill=255, width=max(1, round(width * c.s)), joint="curve")
    if depth <= 0:
        return
    for da in (-0.5, 0.45):
        _tree(c, layer, x, y, a + da + float(rng.normal(0, 0.12)), length * 0.7, width * 0.7, depth - 1, rng)


def _draw_angio(p: PhantomParams, c: _Canvas, rng: np.random.Generator) -> _Drawn:
    """Digital subtraction angiography: contrast-filled vessels dark on a bright background."""
    sg = _side_sign(p.side)
    layer_img = Image.new("L", (c.w, c.h), 0)
    layer = ImageDraw.Draw(layer_img)

    def seg(pts: list[tuple[float, float]], width: float) -> None:
        layer.line([c.to_px(*q) for q in pts], fill=255, width=max(1, round(width * c.s)), joint="curve")

    def blob(x: float, y: float, r: float) -> None:
        px, py = c.to_px(x, y)
        rp = r * c.s
        layer.ellipse((px - rp, py - rp, px + rp, py + rp), fill=255)

    ghost = np.zeros_like(c.img)  # faint bone residue of the subtraction
    lesion = (0.0, 0.0)
    r = 0.0
    if p.region == "head":
        box, m = c.ellipse(0, -0.05, 0.75, 0.9)
        ghost[box] -= 0.04 * m
        box, m = c.ellipse(0, -0.05, 0.69, 0.84)
        ghost[box] += 0.04 * m
        for sx in (-1, 1):
            ica = [(sx * 0.22, 1.2), (sx * 0.25, 0.7), (sx * 0.2, 0.35), (sx * 0.24, 0.12)]
            seg(ica, 0.07)
            # Anterior cerebral artery: up towards the midline
            seg([(sx * 0.24, 0.12), (sx * 0.08, -0.05), (sx * 0.05, -0.5), (sx * 0.1, -0.75)], 0.045)
            mca_end = (sx * 0.6, 0.0)
            occluded = p.finding == "occlusion" and sx == sg
            if occluded:  # only a stump of the middle cerebral artery, nothing beyond it
                stop = (sx * 0.36, 0.09)
                seg([(sx * 0.24, 0.12), stop], 0.05)
                lesion = stop
            else:
                seg([(sx * 0.24, 0.12), (sx * 0.42, 0.08), mca_end], 0.05)
                for k in range(4):
                    _tree(
                        c, layer, mca_end[0], mca_end[1], sx * (0.2 + 0.35 * k) - sx * 0.4, 0.22, 0.03, 2, rng
                    )
            if p.finding == "aneurysm" and sx == sg:
                lesion = (sx * 0.44, 0.05)
        r = _lesion_radius(p, 1.6) if p.finding == "aneurysm" else 0.0
    elif p.region == "abdomen":
        ghost += 0.03 * c.line_mask([(0, -1.3), (0, 1.3)], width=0.3)  # spine
        seg([(0, -1.3), (0, 0.2)], 0.13)  # aorta
        for sx in (-1, 1):
            seg([(0, -0.55), (sx * 0.3, -0.52), (sx * 0.45, -0.5)], 0.045)  # renal arteries
            _tree(c, layer, sx * 0.45, -0.5, sx * 1.2, 0.15, 0.03, 2, rng)
            seg([(0, -0.9), (sx * 0.15, -1.0)], 0.02)
            occluded = p.finding == "occlusion" and sx == sg
            common = [(0, 0.2), (sx * 0.18, 0.45), (sx * 0.3, 0.62)]
            if occluded:
                seg(common[:2], 0.08)
                lesion = common[1]
            else:
                seg(common, 0.08)
                seg([(sx * 0.3, 0.62), (sx * 0.4, 0.9), (sx * 0.45, 1.3)], 0.065)  # external iliac
                seg([(sx * 0.3, 0.62), (sx * 0.2, 0.85), (sx * 0.12, 1.0)], 0.04)  # internal iliac
                _tree(c, layer, sx * 0.12, 1.0, sx * 2.8, 0.2, 0.025, 1, rng)
            if p.finding == "aneurysm" and sx == sg:
                lesion = (sx * 0.22, 0.5)
        seg([(0, -0.7), (0.05, -0.3), (0.02, 0.0)], 0.04)  # superior mesenteric artery
        _tree(c, layer, 0.02, 0.0, 2.8, 0.25, 0.03, 2, rng)
        r = _lesion_radius(p, 1.8) if p.finding == "aneurysm" else 0.0
    else:  # knees: both superficial femoral / popliteal arteries and their run-off
        for sx in (-1, 1):
            cx = sx * 0.45
            ghost[:] += 0.035 * c.line_mask([(cx, -1.3), (cx, -0.05)], width=0.18)
            ghost[:] += 0.035 * c.line_mask([(cx, 0.08), (cx, 1.3)], width=0.16)
            occluded = p.finding == "occlusion" and sx == sg
            if occluded:
                seg([(cx - sx * 0.05, -1.3), (cx - sx * 0.04, -0.35)], 0.06)
                lesion = (cx - sx * 0.04, -0.35)
                for k in range(3):  # thin collaterals only
                    _tree(c, layer, cx - sx * 0.04, -0.5 - 0.1 * k, sx * 0.6, 0.15, 0.015, 0, rng)
            else:
                seg([(cx - sx * 0.05, -1.3), (cx - sx * 0.04, -0.3), (cx, 0.1), (cx, 0.4)], 0.06)
                seg([(cx, 0.4), (cx + sx * 0.12, 0.55), (cx + sx * 0.13, 1.3)], 0.04)  # anterior tibial
                seg([(cx, 0.4), (cx - sx * 0.04, 0.7), (cx - sx * 0.06, 1.3)], 0.04)  # posterior tibial
                seg([(cx, 0.45), (cx + sx * 0.04, 0.8), (cx + sx * 0.05, 1.3)], 0.03)  # peroneal
                for yy in (-0.15, 0.05):  # geniculate branches
                    _tree(c, layer, cx, yy, sx * 1.3, 0.14, 0.02, 1, rng)
            if p.finding == "aneurysm" and sx == sg:
                lesion = (cx - sx * 0.02, 0.05)
        r = _lesion_radius(p, 1.8) if p.finding == "aneurysm" else 0.0
    if p.finding == "aneurysm":
        # the sac sits on the side of the vessel, facing away from the midline
        lx, ly = lesion
        lesion = (lx + sg * 0.6 * r, ly - 0.3 * r)
        blob(lesion[0], lesion[1], r)
    opacity = np.asarray(layer_img.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32) / 255.0
    bg = float(rng.uniform(0.72, 0.85))
    img = bg + ghost + 0.025 * _smooth_noise(rng, c.h, c.w, 20)
    img = img * (1.0 - 0.72 * opacity)
    c.img = img + 0.02 * rng.standard_normal(img.shape, dtype=np.float32)
    return _Drawn(lesion, max(r, 0.06), [])


_ARROW_RGB = {
    "yellow": (255, 221, 0),
    "red": (230, 35, 35),
    "blue": (40, 95, 255),
    "green": (40, 200, 70),
    "white": (255, 255, 255),
}


def _draw_arrow(
    draw: ImageDraw.ImageDraw,
    tip: tuple[float, float],
    direction: float,
    size: float,
    rgb: tuple[int, int, int],
) -> None:
    """An annotation arrow whose tip is at ``tip``, coming from ``direction`` (radians)."""
    dx, dy = math.cos(direction), math.sin(direction)
    tail = (tip[0] + dx * size, tip[1] + dy * size)
    head = size * 0.38
    base = (tip[0] + dx * head, tip[1] + dy * head)
    draw.line([tail, base], fill=rgb, width=max(2, round(size * 0.09)))
    nx, ny = -dy, dx
    draw.polygon(
        [
            tip,
            (base[0] + nx * head * 0.55, base[1] + ny * head * 0.55),
            (base[0] - nx * head * 0.55, base[1] - ny * head * 0.55),
        ],
        fill=rgb,
    )


def render_phantom(
    p: PhantomParams, rng: np.random.Generator, blank: bool = False
) -> tuple[Image.Image, tuple[float, float]]:
    """Draw one phantom at its stored size and mode. Returns the image and the lesion centre as
    fractions of the width and height. ``blank``: an uninformative image (flat grey with noise,
    same size and stored mode) for control experiments."""
    scale = WORK_SIDE / max(p.width, p.height)
    ww, wh = max(8, round(p.width * scale)), max(8, round(p.height * scale))
    if blank:
        arr = 0.5 + 0.03 * rng.standard_normal((wh, ww), dtype=np.float32)
        im = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8), mode="L").resize(
            (p.width, p.height)
        )
        return (im.convert("RGB") if p.stored_mode == "RGB" else im), (0.5, 0.5)
    fill = {"ultrasound": 0.98, "angiography": 1.0, "xray": 1.0}.get(p.modality, 0.92)
    c = _Canvas(ww, wh, rng, fill=fill)
    if p.modality in ("ct", "mri"):
        drawn = _draw_cross_section(p, c, rng)
    elif p.modality == "xray":
        drawn = _draw_xray(p, c, rng)
    elif p.modality == "ultrasound":
        drawn = _draw_ultrasound(p, c, rng)
    else:
        drawn = _draw_angio(p, c, rng)
    arr8 = (np.clip(c.img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    im = Image.fromarray(arr8, mode="L").resize((p.width, p.height), Image.Resampling.BILINEAR)
    lx, ly = c.to_px(*drawn.lesion)
    k, ky = p.width / ww, p.height / wh
    lesion_px = (lx * k, ly * ky)
    if p.doppler or p.arrow:
        im = im.convert("RGB")
        draw = ImageDraw.Draw(im)
        if p.doppler:
            # Colour Doppler: a box outline and flow colour inside the vessels (aliasing speckle).
            xs = [v[0] for v in drawn.vessels]
            ys = [v[1] for v in drawn.vessels]
            bx0, by0 = c.to_px(min(xs) - 0.2, min(ys) - 0.2)
            bx1, by1 = c.to_px(max(xs) + 0.2, max(ys) + 0.2)
            draw.rectangle(
                (bx0 * k, by0 * ky, bx1 * k, by1 * ky),
                outline=(200, 200, 200),
                width=max(1, round(p.width / 400)),
            )
            # The velocity colour bar that scanners print beside the image: red/yellow towards
            # the probe, blue/cyan away.
            x0, x1 = round(0.03 * p.width), round(0.055 * p.width)
            y0, y1 = round(0.08 * p.height), round(0.4 * p.height)
            for y in range(y0, y1):
                t = (y - y0) / max(1, y1 - y0 - 1)
                if t < 0.5:
                    u = 1 - 2 * t
                    rgb = (round(120 + 135 * u), round(200 * max(0.0, u - 0.5) * 2), 0)
                else:
                    u = 2 * t - 1
                    rgb = (0, round(200 * max(0.0, u - 0.5) * 2), round(120 + 135 * u))
                draw.line([(x0, y), (x1, y)], fill=rgb)
            for vx, vy, vr, colour in drawn.vessels:
                px, py = c.to_px(vx, vy)
                px, py = px * k, py * ky
                rp = vr * c.s * k * 0.85
                base = (220, 30, 30) if colour == "red" else (30, 90, 230)
                draw.ellipse((px - rp, py - rp, px + rp, py + rp), fill=base)
                for _ in range(6):  # aliasing: brighter speckles of the opposite shade
                    ox, oy = rng.uniform(-0.5, 0.5, 2) * rp
                    rr = rp * float(rng.uniform(0.15, 0.3))
                    hi = (255, 210, 60) if colour == "red" else (90, 220, 255)
                    draw.ellipse((px + ox - rr, py + oy - rr, px + ox + rr, py + oy + rr), fill=hi)
        if p.arrow:
            lesion_r_px = drawn.lesion_r * c.s * k
            direction = float(rng.uniform(-2.6, -0.5))  # from above, left or right
            tip = (
                lesion_px[0] + math.cos(direction) * (lesion_r_px + 4),
                lesion_px[1] + math.sin(direction) * (lesion_r_px + 4),
            )
            length = float(rng.uniform(0.1, 0.16)) * min(p.width, p.height)
            _draw_arrow(draw, tip, direction, length, _ARROW_RGB[p.arrow])
    if p.stored_mode == "L":
        im = im.convert("L")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    return im, (lesion_px[0] / p.width, lesion_px[1] / p.height)


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------


class PhantomOptionError(ValueError):
    """A make_phantoms option is out of range; the message names it and what is allowed."""


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


def phantom_facts(out_dir: str | Path, split: str) -> dict[str, dict[str, str]]:
    """The drawing truth of a split: ``{image ID: {modality, plane, region, finding, side, size,
    ...}}`` from ``{split}_phantom_facts.csv``. Empty strings become None-like "" values; ``size``
    is "" for findings without a size."""
    path = Path(out_dir) / f"{split}_phantom_facts.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: phantom_facts needs a dataset written by 'medcap data phantoms' "
            f"(expected {split}_phantom_facts.csv next to {split}_captions.csv)"
        )
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in FACT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; regenerate the phantoms")
        return {row["ID"]: {k: v for k, v in row.items() if k != "ID"} for row in reader}


SCORED_FACTS = ("modality", "region", "side", "finding")


def fact_accuracy(
    predictions: dict[str, str],
    truth: dict[str, dict[str, str]],
    facts: tuple[str, ...] = SCORED_FACTS,
    held_out: bool | None = None,
) -> dict[str, float]:
    """How often generated captions state each fact of their phantom correctly.

    Args:
        predictions: image ID -> generated caption (IDs missing here count as wrong).
        truth: :func:`phantom_facts` of the split.
        facts: which facts to score (any of modality, plane, region, finding, side, size).
        held_out: None scores every image; True only held-out combinations; False only the others.

    Returns:
        ``{"n": images scored, <fact>: accuracy, ..., "all": share with every scored fact right}``;
        accuracies are 0.0 when no image is scored. A fact the caption does not state (or states
        ambiguously) is wrong. Facts that an image does not have (the size of a fracture) are
        skipped for that image.
    """
    unknown = [f for f in facts if f not in ("modality", "plane", "region", "finding", "side", "size")]
    if unknown:
        raise ValueError(f"fact_accuracy: unknown facts {unknown}")
    rows = {i: t for i, t in truth.items() if held_out is None or (t.get("held_out") == "1") == held_out}
    right = Counter()
    counted = Counter()
    all_right = 0
    for image_id, t in rows.items():
        parsed = caption_facts(predictions.get(image_id, ""))
        ok_all = True
        for f in facts:
            if not t.get(f):
                continue
            counted[f] += 1
            ok = parsed[f] == t[f]
            right[f] += ok
            ok_all &= ok
        all_right += ok_all
    result: dict[str, float] = {"n": float(len(rows))}
    for f in facts:
        result[f] = right[f] / counted[f] if counted[f] else 0.0
    result["all"] = all_right / len(rows) if rows else 0.0
    return result


def _parse_pair(text: str, kind: type, name: str, count: int) -> tuple:
    try:
        parts = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{name}: expected {count} comma-separated numbers, got {text!r}"
        ) from None
    if len(parts) != count:
        raise argparse.ArgumentTypeError(f"{name}: expected {count} comma-separated numbers, got {text!r}")
    return parts


def cli(argv: list[str]) -> int:
    """``medcap data phantoms --out DIR --n N --seed S [--size-range 500,1000] [--splits 0.7,0.15,0.15]
    [--modalities ct,xray] [--blank] [--workers N] [--overwrite] [--quiet]``; returns the exit code
    (2 for a bad option or an occupied --out)."""
    ap = argparse.ArgumentParser(
        prog="medcap data phantoms",
        description="Write a synthetic radiology-like dataset (images, captions, concepts) in the ROCOv2 layout.",
    )
    ap.add_argument("--out", required=True, type=Path, help="dataset root to create")
    ap.add_argument("--n", type=int, default=300, help="total images over train/valid/test (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="random seed; same options give the same bytes")
    ap.add_argument(
        "--size-range",
        default="500,1000",
        type=lambda s: _parse_pair(s, int, "--size-range", 2),
        help="min,max pixels of each image side (default 500,1000)",
    )
    ap.add_argument(
        "--splits",
        default="0.7,0.15,0.15",
        type=lambda s: _parse_pair(s, float, "--splits", 3),
        help="train,valid,test fractions (default 0.7,0.15,0.15)",
    )
    ap.add_argument("--blank", action="store_true", help="uninformative flat images with the same captions")
    ap.add_argument(
        "--modalities",
        type=lambda text: tuple(m.strip() for m in text.split(",") if m.strip()),
        default=None,
        help=f"comma-separated subset of {','.join(MODALITIES)} (default: all)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace a phantom dataset already in --out")
    ap.add_argument("--workers", type=int, default=1, help="drawing processes (0 = one per CPU core)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        summary = make_phantoms(
            args.out,
            args.n,
            args.seed,
            size_range=args.size_range,
            splits=args.splits,
            blank=args.blank,
            modalities=args.modalities,
            overwrite=args.overwrite,
            workers=args.workers,
            progress=not args.quiet,
        )
    except (PhantomOptionError, FileExistsError) as e:
        print(f"medcap data phantoms: {e}", file=sys.stderr, flush=True)
        return 2
    note = " (reused: already there with these options)" if summary.get("reused") else ""
    print(f"wrote phantoms to {args.out}{note}")
    for split, st in summary["splits"].items():
        print(
            f"  {split:5s} {st['images']:6d} images  L {st['stored_L']}  RGB {st['stored_RGB']}  "
            f"true colour {st['true_color']}  colour marks {st['color_marks']}  held-out combinations {st['held_out']}"
        )
    return 0
