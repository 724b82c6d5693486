"""``medcap data stats``: summarise prepared manifests as tables and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medcap.data.manifest import MODALITIES, read_manifest
from medcap.data.rocov2 import LayoutError


def _fmt_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [
        [("-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)) for v in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _policies(meta: dict[str, Any]) -> str:
    """The colour policy asked for, and what ``auto`` chose per split."""
    chosen = meta.get("color_policy")
    per_split = meta.get("color_policies") or {}
    if chosen == "auto" and per_split:
        return "auto (" + ", ".join(f"{k}: {v}" for k, v in per_split.items()) + ")"
    return str(chosen)


def summarize_prepared(prep: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """A readable summary of a prepared folder, and the per-split stats it was built from."""
    prep = Path(prep)
    meta_path = prep / "prepare.json"
    if not meta_path.is_file():
        raise LayoutError(
            f"{prep} is not a prepared folder: {meta_path} is missing (run 'medcap data prepare' first)"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    stats: dict[str, dict[str, Any]] = {}
    for name in meta.get("splits", {}):
        sp = prep / name / "stats.json"
        if sp.is_file():
            stats[name] = json.loads(sp.read_text(encoding="utf-8"))
    out = [
        f"Prepared data in {prep.resolve()}",
        f"  from {meta.get('root') or 'a folder of images + captions CSV'}; colour policy {_policies(meta)}",
        "",
        "Counts per split (rows in = kept + skipped):",
    ]
    rows = [
        [n, s["rows_in"], s["kept"], s["skipped"], "yes" if s["reconciled"] else "NO", s.get("id_scheme", "")]
        for n, s in stats.items()
    ]
    if len(stats) > 1:
        rows.append(
            ["total", *(sum(s[k] for s in stats.values()) for k in ("rows_in", "kept", "skipped")), "", ""]
        )
    out.append(_fmt_table(["split", "rows in", "kept", "skipped", "reconciled", "IDs"], rows))
    warnings = [w for s in stats.values() for w in s.get("warnings", [])]
    if warnings:
        out += ["", *(f"WARNING: {w}" for w in warnings)]
    out += ["", "Skipped, by reason:"]
    for n, s in stats.items():
        reasons = ", ".join(f"{k} {v:,}" for k, v in s["skipped_by_reason"].items()) or "none"
        out.append(f"  {n}: {reasons}")
    if any(s.get("notes_by_kind") for s in stats.values()):
        out += ["", "Kept with a note (see notes.csv):"]
        for n, s in stats.items():
            if s.get("notes_by_kind"):
                out.append(f"  {n}: " + ", ".join(f"{k} {v:,}" for k, v in s["notes_by_kind"].items()))
    out += ["", "Images each colour policy would keep (among images passing every other check):"]
    out.append(
        _fmt_table(
            ["split", "stored-rgb", "true-color", "all", "grey as RGB", "colour marks only"],
            [
                [
                    n,
                    s["policy_counts"]["stored-rgb"],
                    s["policy_counts"]["true-color"],
                    s["policy_counts"]["all"],
                    s["color"]["grey_stored_as_rgb"] if s["color_check"]["checked"] else None,
                    s["color"]["grey_with_color_marks"] if s["color_check"]["checked"] else None,
                ]
                for n, s in stats.items()
            ],
        )
    )
    if not all(s["color_check"]["checked"] for s in stats.values()):
        out.append("  ('-': colour not measured; prepare with --check-color to measure it)")
    out += ["", "Modality of kept images (from concepts_manual):"]
    mods = [m for m in MODALITIES if any(s["modality"].get(m) for s in stats.values())] or MODALITIES
    out.append(
        _fmt_table(
            ["split", *mods], [[n, *(s["modality"].get(m, 0) for m in mods)] for n, s in stats.items()]
        )
    )
    out += ["", "Caption length in words (kept):"]
    qs = ["min", "p10", "p25", "p50", "p75", "p90", "p99", "max", "mean"]
    out.append(
        _fmt_table(
            ["split", *qs],
            [[n, *(_num(s["caption_words"].get(q)) for q in qs)] for n, s in stats.items()],
        )
    )
    return "\n".join(out), stats


def _num(v: float | None) -> str | None:
    if v is None:
        return None
    return f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}"


def write_plots(prep: Path, stats: dict[str, dict[str, Any]]) -> list[Path]:
    """Caption-length histogram and modality bars as PNG files in ``prep/plots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = Path(prep) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    lengths: dict[str, list[int]] = {}
    for name in stats:
        mpath = Path(prep) / name / "manifest.csv"
        if mpath.is_file():
            lengths[name] = [len(r.caption.split()) for r in read_manifest(mpath)]
    all_len = [x for v in lengths.values() for x in v]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if all_len:
        cap = max(10, int(np.percentile(all_len, 99)))
        bins = np.arange(0, cap + 3, max(1, math.ceil(cap / 60)))
        for name, v in lengths.items():
            clipped = np.minimum(np.asarray(v), bins[-1] - 1)
            # Share of each split's captions, so splits of different sizes compare directly.
            weights = np.full(len(v), 100.0 / max(1, len(v)))
            ax.hist(
                clipped,
                bins=bins,
                weights=weights,
                histtype="step",
                linewidth=1.6,
                label=f"{name} (n={len(v):,}, median {np.median(v):.0f})",
            )
        ax.set_xlim(0, bins[-1])
        ax.legend()
        ax.set_xlabel(
            f"caption length in words (cleaned caption); the last bin holds all of {bins[-2]} or more"
        )
    else:
        ax.text(0.5, 0.5, "no kept captions", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("caption length in words")
    ax.set_ylabel("% of the split's captions")
    ax.set_title("Caption length")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = plots / "caption_length_hist.png"
    fig.savefig(p)
    plt.close(fig)
    written.append(p)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    names = list(stats)
    x = np.arange(len(MODALITIES))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        vals = [stats[name]["modality"].get(m, 0) for m in MODALITIES]
        bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(x, MODALITIES, rotation=15)
    ax.set_ylabel("kept images")
    ax.set_title("Modality (from concepts_manual)")
    if names:
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = plots / "modality_bars.png"
    fig.savefig(p)
    plt.close(fig)
    written.append(p)
    return written
