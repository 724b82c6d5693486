"""Drawing a phantom: CT and MR sections, X-rays, ultrasound sectors and angiograms, procedurally
(numpy + Pillow), with the lesion where the facts say and annotation arrows on some."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medcap.data.phantoms.design import SIZE_TABLE, PhantomParams

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
