"""What the phantoms show: the facts (modality, plane, region, finding, side, size), their CUIs,
the held-out combinations, the captions composed from the facts, and how a caption's facts are read
back and scored against the drawing truth."""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class PhantomOptionError(ValueError):
    """A make_phantoms option is out of range; the message names it and what is allowed."""


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
