"""The concepts section of the HTML report (``medcap report``): what ``medcap evaluate --task concepts``
wrote in ``RUN/eval/<split>/`` (metrics.json, per_image.csv, per_concept.csv), drawn.

* the official scores (per-image F1 and the manual-concept F1, with their intervals);
* F1 per concept frequency band (micro F1 over the concepts whose support in the split falls in the
  band: where a model loses its score, rare concepts or common ones), as a table and a bar chart;
* the most confused concepts: the (true, predicted instead) pairs that occur most often in one
  image as a miss beside a false positive, and the concepts with the most errors;
* example images (best, worst, random by per-image F1) with their true and predicted concepts.

Concepts are named from the concept model's vocabulary (a concept run's ``vocab.json``) or the
prepared dataset's ``cui_mapping.csv``, where either has them.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from medcap.layout import ConceptCheckpointLayout, EvalLayout, PreparedLayout, RunLayout

#: Support bands (images of the split that have the concept), most frequent first.
BANDS: tuple[tuple[str, int, int | None], ...] = (
    ("100+", 100, None),
    ("20-99", 20, 99),
    ("5-19", 5, 19),
    ("1-4", 1, 4),
)
EXAMPLES = 6
CONFUSED = 12


def concept_evals(run: Path) -> dict[str, Path]:
    """The concept evaluations of a run (folders with per_image.csv), test first."""
    eval_dir = RunLayout(run).eval_dir
    if not eval_dir.is_dir():
        return {}
    found = {
        d.name: d for d in sorted(eval_dir.iterdir()) if d.is_dir() and EvalLayout(d).per_image.is_file()
    }
    return {s: found[s] for s in sorted(found, key=lambda s: (s != "test", s))}


def _names(run: Path, prepared: Path | None) -> dict[str, str]:
    from medcap.concepts.vocab import ConceptVocab, find_name_table, read_name_table

    names: dict[str, str] = {}
    if prepared is not None:
        table = find_name_table(prepared)
        if table is not None:
            names.update(read_name_table(table))
    for which in ("best", "last"):
        vocab = ConceptCheckpointLayout(RunLayout(run).checkpoints / which).vocab
        if vocab.is_file():
            names.update(ConceptVocab.load(vocab).names)
            break
    return names


def concept_prepared(run: Path) -> Path | None:
    """The prepared folder of a concept run (or a caption run), for images and names."""
    from medcap.config.concepts import read_concepts_config
    from medcap.config.loader import ConfigError
    from medcap.config.run import read_run_config

    for read in (read_run_config, read_concepts_config):
        try:
            p = Path(read(run).data.prepared)
        except (FileNotFoundError, ConfigError, OSError):
            continue
        for cand in (p, run / p, run.parent / p, run.parent.parent / p):
            if cand.is_dir():
                return cand
    return None


def band_scores(per_concept: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per support band: concepts, images with them, micro precision / recall / F1 over the band."""
    out = []
    for label, lo, hi in BANDS:
        rows = [r for r in per_concept if int(r["support"]) >= lo and (hi is None or int(r["support"]) <= hi)]
        tp = sum(int(r["tp"]) for r in rows)
        fp = sum(int(r["fp"]) for r in rows)
        fn = sum(int(r["fn"]) for r in rows)
        out.append(
            {
                "band": label,
                "concepts": len(rows),
                "support": sum(int(r["support"]) for r in rows),
                "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
                "recall": tp / (tp + fn) if tp + fn else None,
                "precision": tp / (tp + fp) if tp + fp else None,
            }
        )
    never = [r for r in per_concept if int(r["support"]) == 0]
    out.append(
        {
            "band": "not in the split",
            "concepts": len(never),
            "support": 0,
            "f1": None,
            "recall": None,
            "precision": None,
            "false_positives": sum(int(r["fp"]) for r in never),
        }
    )
    return out


def confused_pairs(per_image: list[dict[str, str]], k: int = CONFUSED) -> list[tuple[str, str, int]]:
    """``(true CUI missed, CUI predicted instead, images)`` pairs, most frequent first."""
    pairs: Counter[tuple[str, str]] = Counter()
    for r in per_image:
        truth = {c.strip().upper() for c in r["true"].split(";") if c.strip()}
        pred = {c.strip().upper() for c in r["predicted"].split(";") if c.strip()}
        for miss in truth - pred:
            for wrong in pred - truth:
                pairs[(miss, wrong)] += 1
    return [(a, b, n) for (a, b), n in pairs.most_common(k)]


def section_concepts(run: Path, seed: int = 0) -> str:
    """The report's concepts section (or, without a concept evaluation, how to make one)."""
    from medcap.eval.report import _esc, _fig_to_img, _missing, _plt, _read_csv, _thumbnail

    out = ["<section><h2>Concepts</h2>"]
    evals = concept_evals(run)
    if not evals:
        out.append(
            _missing(
                "No concept evaluation (RUN/eval/<split>/per_image.csv): run 'medcap concepts predict' and "
                "'medcap evaluate --task concepts --predictions RUN/predictions/<split>.csv --references ...'."
            )
        )
        return "\n".join(out + ["</section>"])
    split, folder = next(iter(evals.items()))
    layout = EvalLayout(folder)
    prepared = concept_prepared(run)
    names = _names(run, prepared)

    def name(cui: str) -> str:
        return f"{names[cui]} ({cui})" if cui in names else cui

    if layout.metrics.is_file():
        m = json.loads(layout.metrics.read_text(encoding="utf-8")).get("metrics", {})
        cells = []
        for key, label in (("f1", "F1 (primary)"), ("f1_manual", "F1, manual concepts (secondary)")):
            if key in m:
                ci = m[key].get("ci95")
                ci_txt = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
                cells.append(
                    f"<tr><td>{label}</td><td>{m[key]['mean']:.4f}{ci_txt}</td><td>{m[key]['n']}</td></tr>"
                )
        out.append(
            f"<p class='note'>Split {_esc(split)}: the ImageCLEFmedical 2025 concept-detection scores.</p>"
            "<table><tr><th>score</th><th>mean [95% CI]</th><th>images scored</th></tr>"
            + "".join(cells)
            + "</table>"
        )
    per_concept = _read_csv(layout.per_concept) if layout.per_concept.is_file() else []
    if per_concept:
        bands = band_scores(per_concept)
        rows = "".join(
            f"<tr><td>{b['band']}</td><td>{b['concepts']}</td><td>{b['support']}</td>"
            + "".join(
                f"<td>{b[k]:.3f}</td>" if b[k] is not None else "<td>-</td>"
                for k in ("precision", "recall", "f1")
            )
            + "</tr>"
            for b in bands
        )
        out.append(
            "<h3>F1 per concept frequency band</h3><p class='note'>Band: images of the split that have the "
            "concept; micro scores over the band's concepts. 'not in the split': concepts only predicted "
            f"({bands[-1].get('false_positives', 0)} false positives).</p>"
            "<table><tr><th>band</th><th>concepts</th><th>images</th><th>precision</th><th>recall</th>"
            f"<th>F1</th></tr>{rows}</table>"
        )
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.5, 2.6))
        shown = [b for b in bands if b["f1"] is not None]
        ax.bar([b["band"] for b in shown], [b["f1"] for b in shown], color="#4a7bb7")
        ax.set_ylim(0, 1)
        ax.set_ylabel("micro F1")
        ax.set_xlabel("images with the concept")
        out.append(_fig_to_img(fig, "F1 per concept frequency band"))
        worst = sorted(per_concept, key=lambda r: -(int(r["fp"]) + int(r["fn"])))[:CONFUSED]
        out.append(
            "<h3>Concepts with the most errors</h3><table><tr><th>concept</th><th>images</th><th>missed</th>"
            "<th>false positives</th><th>F1</th></tr>"
            + "".join(
                f"<tr><td>{_esc(name(r['cui']))}</td><td>{r['support']}</td><td>{r['fn']}</td><td>{r['fp']}</td>"
                f"<td>{float(r['f1']):.3f}</td></tr>"
                for r in worst
            )
            + "</table>"
        )
    per_image = _read_csv(layout.per_image)
    pairs = confused_pairs(per_image)
    if pairs:
        out.append(
            "<h3>Most confused concepts</h3><p class='note'>A true concept missed in an image where another "
            "was predicted that the image does not have, counted over images.</p><table><tr><th>true (missed)"
            "</th><th>predicted instead</th><th>images</th></tr>"
            + "".join(
                f"<tr><td>{_esc(name(a))}</td><td>{_esc(name(b))}</td><td>{n}</td></tr>" for a, b, n in pairs
            )
            + "</table>"
        )
    images: dict[str, str] = {}
    manifest = PreparedLayout(prepared).manifest(split) if prepared is not None else None
    if manifest is not None and manifest.is_file():
        images = {r.get("id", ""): r.get("image", "") for r in _read_csv(manifest)}
    scored = [r for r in per_image if r.get("f1")]
    scored.sort(key=lambda r: float(r["f1"]), reverse=True)
    best, worst = scored[:EXAMPLES], list(reversed(scored[-EXAMPLES:])) if len(scored) > EXAMPLES else []
    shown = {r["id"] for r in best + worst}
    rest = [r for r in scored if r["id"] not in shown]
    rand = random.Random(seed).sample(rest, min(EXAMPLES, len(rest)))

    def card(r: dict[str, str]) -> str:
        def words(field: str) -> str:
            return "; ".join(name(c) for c in r[field].split(";") if c)

        return (
            f"<div class='card'>{_thumbnail(images.get(r['id']))}<div><div class='id'>{_esc(r['id'])}</div>"
            f"<div class='score'>F1 {float(r['f1']):.3f}</div>"
            f"<div class='ref'><b>True:</b> {_esc(words('true'))}</div>"
            f"<div class='pred'><b>Predicted:</b> {_esc(words('predicted'))}</div></div></div>"
        )

    for title, group in (("Best", best), ("Worst", worst), ("Random", rand)):
        if group:
            out.append(
                f"<h3>Examples: {title.lower()}</h3><div class='grid'>" + "".join(map(card, group)) + "</div>"
            )
    out.append("</section>")
    return "\n".join(out)


__all__ = ["BANDS", "band_scores", "concept_evals", "confused_pairs", "section_concepts"]
