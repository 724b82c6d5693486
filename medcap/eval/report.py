"""One self-contained HTML page per run: metrics, curves, data statistics, example captions.

``medcap report RUN_DIR`` writes ``RUN_DIR/report.html``. Everything is inside the file (plots as
base64 PNG, image thumbnails as base64 JPEG), so it can be mailed or attached as it is. It reads:

* ``RUN/eval/<split>/metrics.json`` and ``per_caption.csv`` (``medcap evaluate``): metric table
  with 95% intervals; best, worst and random test captions by BERTScore;
* ``RUN/log.csv`` (``medcap train``): training and validation loss curves, learning rate;
* ``RUN/config.yaml``: the run's settings and ``data.prepared``, where
  ``PREP/<split>/stats.json`` and ``PREP/<split>/manifest.csv`` give the data statistics and the
  image of each caption.

Any part may be missing: its section then says what is missing and how to produce it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medcap.config.loader import ConfigError
from medcap.config.run import RunConfig, read_run_config
from medcap.data.tables import CsvError, read_csv_dicts
from medcap.layout import EvalLayout, PreparedLayout, RunLayout

log = logging.getLogger("medcap.report")

#: How many example captions the best / worst / random grids show.
EXAMPLES_PER_GRID = 6
THUMBNAIL_PX = 224

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 0;
       background: #f4f5f7; color: #1d2330; }
header { background: #1f3a5f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 24px; }
header p { margin: 0; opacity: .85; font-size: 13px; }
main { max-width: 1200px; margin: 0 auto; padding: 8px 24px 40px; }
section { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08);
          padding: 16px 22px; margin: 18px 0; }
h2 { font-size: 19px; margin: 4px 0 12px; color: #1f3a5f; }
h3 { font-size: 15px; margin: 16px 0 8px; }
table { border-collapse: collapse; font-size: 13.5px; margin: 6px 0 10px; }
th, td { border-bottom: 1px solid #e3e6eb; padding: 5px 12px; text-align: left; }
th { background: #f0f3f7; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.primary td { font-weight: 700; background: #eef6ee; }
.missing { color: #8a5a00; background: #fff7e6; border-left: 4px solid #f0a500; padding: 8px 12px;
           font-size: 13.5px; }
.note { color: #555; font-size: 12.5px; margin: 3px 0; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plots img { max-width: 100%; border: 1px solid #e3e6eb; border-radius: 4px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px; }
.card { display: flex; gap: 10px; border: 1px solid #e3e6eb; border-radius: 6px; padding: 8px;
        background: #fcfcfd; font-size: 12.5px; }
.card img, .card .noimg { width: 112px; height: 112px; object-fit: contain; background: #000;
        border-radius: 4px; flex: none; }
.card .noimg { background: #ddd; color: #666; display: flex; align-items: center;
        justify-content: center; text-align: center; font-size: 11px; }
.card .id { color: #666; font-size: 11px; word-break: break-all; }
.card .score { font-weight: 700; }
.card .ref { margin: 3px 0; } .card .pred { margin: 3px 0; color: #1f3a5f; }
.card b { font-weight: 600; }
.kv td:first-child { color: #555; }
"""


# ----------------------------------------------------------------------------------------------
# Reading the run


def _read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a run's CSV file through the one CSV reader (``CsvError`` names file and line)."""
    return [row for _, row in read_csv_dicts(path)[1]]


def _float(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None  # NaN -> None


def _load_config(run: Path) -> RunConfig | str:
    """The run's typed config, or why it cannot be shown (the report still shows the rest)."""
    try:
        return read_run_config(run)
    except FileNotFoundError:
        return f"{RunLayout(run).config} not found."
    except (ConfigError, OSError) as e:
        return f"{RunLayout(run).config} is unreadable: {e}"


def _prepared_dir(run: Path, config: RunConfig | str) -> Path | None:
    if isinstance(config, str):
        return None
    p = Path(config.data.prepared)
    # Relative paths were relative to where training ran; try that, then around the run dir.
    for cand in (p, run / p, run.parent / p, run.parent.parent / p):
        if cand.is_dir():
            return cand
    return p


# ----------------------------------------------------------------------------------------------
# Small HTML helpers


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _missing(text: str) -> str:
    return f'<p class="missing">{_esc(text)}</p>'


def _fig_to_img(fig: Any, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _thumbnail(path: str | None) -> str:
    if not path:
        return '<div class="noimg">no image path</div>'
    from medcap.data.images import ImageReadError, read_image

    try:
        im = read_image(path, min_size=THUMBNAIL_PX)  # the model's reader; JPEGs decode at a reduced size
        im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82)
    except (ImageReadError, OSError, ValueError) as e:
        return f'<div class="noimg">image unreadable: {_esc(getattr(e, "reason", type(e).__name__))}</div>'
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_esc(Path(path).name)}" src="data:image/jpeg;base64,{data}">'


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------
# Sections


def _section_metrics(evals: dict[str, Path]) -> str:
    out = ["<section><h2>Metrics</h2>"]
    if not evals:
        out.append(
            _missing(
                "No evaluation found (RUN/eval/<split>/metrics.json). Run "
                "'medcap evaluate --predictions RUN/predictions/test.csv --references PREP/test/manifest.csv'."
            )
        )
        out.append("</section>")
        return "\n".join(out)
    for split, d in evals.items():
        mpath = EvalLayout(d).metrics
        out.append(f"<h3>Split: {_esc(split)}</h3>")
        if not mpath.is_file():
            out.append(_missing(f"{mpath} is missing (only per_caption.csv was found)."))
            continue
        try:
            s = json.loads(mpath.read_text(encoding="utf-8"))
        except ValueError as e:
            out.append(_missing(f"{mpath} is not valid JSON: {e}"))
            continue
        if not isinstance(s, dict) or not isinstance(s.get("metrics") or {}, dict):
            out.append(_missing(f"{mpath} is not a metrics summary (written by 'medcap evaluate')."))
            continue
        out.append(
            f'<p class="note">Protocol <b>{_esc(s.get("protocol"))}</b>, {_esc(s.get("n"))} caption pairs'
            + (" (a subset of the references)" if s.get("subset") else "")
            + f"; 95% intervals from {_esc((s.get('bootstrap') or {}).get('samples', '?'))} bootstrap resamples.</p>"
        )
        out.append("<table><tr><th>metric</th><th>mean</th><th>95% CI</th><th></th></tr>")
        unreadable = []
        for m, e in (s.get("metrics") or {}).items():
            role = "primary" if m == s.get("primary") else "secondary" if m == s.get("secondary") else ""
            e = e if isinstance(e, dict) else {"mean": e}
            mean = _float(e.get("mean"))
            ci = e.get("ci95")
            bounds = [_float(c) for c in ci] if isinstance(ci, list | tuple) and len(ci) == 2 else []
            ci_txt = f"{bounds[0]:.4f} – {bounds[1]:.4f}" if bounds and None not in bounds else "–"
            if mean is None:
                unreadable.append(m)
            cls = ' class="primary"' if role == "primary" else ""
            out.append(
                f"<tr{cls}><td>{_esc(m)}</td><td class='num'>{'–' if mean is None else f'{mean:.4f}'}</td>"
                f"<td class='num'>{ci_txt}</td><td>{role}</td></tr>"
            )
        out.append("</table>")
        if unreadable:
            out.append(_missing(f"{mpath}: no numeric mean for {', '.join(map(str, unreadable))}."))
        unavailable = s.get("unavailable") or {}
        if unavailable:
            out.append("<p class='note'><b>Not computed:</b></p><ul class='note'>")
            out += [f"<li>{_esc(m)}: {_esc(r)}</li>" for m, r in unavailable.items()]
            out.append("</ul>")
        for m, desc in (s.get("models") or {}).items():
            out.append(f"<p class='note'>{_esc(m)} model: {_esc(desc)}</p>")
        for note in s.get("notes") or []:
            out.append(f"<p class='note'>{_esc(note)}</p>")
    out.append("</section>")
    return "\n".join(out)


def _section_curves(run: Path) -> str:
    out = ["<section><h2>Training</h2>"]
    log = RunLayout(run).log
    if not log.is_file():
        out.append(_missing(f"{log} not found: no training curves (written by 'medcap train')."))
        out.append("</section>")
        return "\n".join(out)
    try:
        rows = _read_csv(log)
    except CsvError as e:
        out.append(_missing(f"{e}"))
        out.append("</section>")
        return "\n".join(out)
    train = [
        (s, v)
        for r in rows
        if r.get("split") == "train"
        for s, v in [(_float(r.get("step")), _float(r.get("loss")))]
        if s is not None and v is not None
    ]
    valid = [
        (s, v)
        for r in rows
        if r.get("split") == "valid"
        for s, v in [(_float(r.get("step")), _float(r.get("loss")))]
        if s is not None and v is not None
    ]
    lr = [
        (s, v)
        for r in rows
        if r.get("split") == "train"
        for s, v in [(_float(r.get("step")), _float(r.get("lr")))]
        if s is not None and v is not None
    ]
    if not train and not valid:
        out.append(_missing(f"{log} has no train or valid rows with a step and a finite loss."))
        out.append("</section>")
        return "\n".join(out)
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if lr else 1, figsize=(11 if lr else 7, 3.6), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train", color="#4c72b0", lw=1.4)
    if valid:
        ax.plot(*zip(*valid, strict=True), label="validation", color="#dd8452", lw=2, marker="o", ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if lr:
        ax2 = axes[0][1]
        ax2.plot(*zip(*lr, strict=True), color="#55a868")
        ax2.set_xlabel("optimizer step")
        ax2.set_title("Learning rate")
        ax2.grid(alpha=0.3)
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    out.append(f"<div class='plots'>{_fig_to_img(fig, 'training and validation loss')}</div>")
    facts = []
    if train:
        facts.append(
            f"{len(train)} logged training steps, last loss {train[-1][1]:.4f} at step {train[-1][0]:.0f}"
        )
    if valid:
        best = min(valid, key=lambda t: t[1])
        facts.append(
            f"{len(valid)} validations, last loss {valid[-1][1]:.4f}, best {best[1]:.4f} at step {best[0]:.0f}"
        )
    else:
        facts.append("no validation rows in log.csv")
    out += [f"<p class='note'>{_esc(f)}</p>" for f in facts]
    out.append("</section>")
    return "\n".join(out)


def _section_config(config: RunConfig | str, run: Path) -> str:
    if isinstance(config, str):
        return "<section><h2>Run settings</h2>" + _missing(config) + "</section>"
    m, t, peft = config.model, config.train, config.model.peft
    rows = [
        ("model.name_or_path", m.name_or_path),
        ("model.family", m.family),
        ("model.random_init", m.random_init),
        ("model.precision", m.precision),
        ("model.quantization", m.quantization),
        ("model.peft", f"method={peft.method}, r={peft.r}, alpha={peft.alpha}, targets={peft.targets}"),
        ("train.max_steps", t.max_steps),
        ("train.epochs", t.epochs),
        ("train.lr", t.lr),
        ("train.batch_size", t.batch_size),
        ("train.grad_accum", t.grad_accum),
        ("train.mixed_precision", t.mixed_precision),
        ("train.seed", t.seed),
        ("data.prepared", config.data.prepared),
    ]
    body = (
        "<table class='kv'>"
        + "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows if v is not None)
        + "</table>"
    )
    return (
        f"<section><h2>Run settings</h2>{body}<p class='note'>Full settings: "
        f"{_esc(RunLayout(run).config)}</p></section>"
    )


def _section_data(prep: Path | None, per_caption: dict[str, list[dict[str, str]]]) -> str:
    out = ["<section><h2>Data</h2>"]
    if prep is None:
        out.append(_missing("RUN/config.yaml is missing or unreadable: no data statistics."))
    elif not prep.is_dir():
        out.append(_missing(f"prepared data folder {prep} (from config.yaml) not found: no data statistics."))
    stats: dict[str, dict[str, Any]] = {}
    manifests: dict[str, list[dict[str, str]]] = {}
    if prep is not None and prep.is_dir():
        layout = PreparedLayout(prep)
        for split in ("train", "valid", "test"):
            sp = layout.stats(split)
            if sp.is_file():
                try:
                    stats[split] = json.loads(sp.read_text(encoding="utf-8"))
                except ValueError:
                    out.append(_missing(f"{sp} is not valid JSON."))
            mp = layout.manifest(split)
            if mp.is_file():
                try:
                    manifests[split] = _read_csv(mp)
                except CsvError as e:
                    out.append(_missing(str(e)))
        if not stats:
            out.append(_missing(f"no {prep}/<split>/stats.json found (written by 'medcap data prepare')."))
    if stats:
        out.append(
            "<table><tr><th>split</th><th>rows in</th><th>kept</th><th>skipped</th><th>colour policy</th>"
            "<th>caption words (median / p90 / max)</th></tr>"
        )
        for split, s in stats.items():
            w = s.get("caption_words") or {}
            words = " / ".join(
                f"{w[k]:.0f}" if isinstance(w.get(k), int | float) else "–" for k in ("p50", "p90", "max")
            )
            out.append(
                f"<tr><td>{_esc(split)}</td><td class='num'>{_esc(s.get('rows_in', '–'))}</td>"
                f"<td class='num'>{_esc(s.get('kept', '–'))}</td><td class='num'>{_esc(s.get('skipped', '–'))}</td>"
                f"<td>{_esc(s.get('color_policy', '–'))}</td><td class='num'>{words}</td></tr>"
            )
        out.append("</table>")
        reasons = {
            split: s.get("skipped_by_reason") for split, s in stats.items() if s.get("skipped_by_reason")
        }
        for split, r in reasons.items():
            out.append(
                f"<p class='note'>{_esc(split)} skipped: "
                + _esc(", ".join(f"{k} {v}" for k, v in r.items()))
                + "</p>"
            )
    plots = []
    plt = None
    if manifests:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=100)
        lengths = {k: [len((r.get("caption") or "").split()) for r in rows] for k, rows in manifests.items()}
        bins = _length_bins([x for v in lengths.values() for x in v])
        for split, values in lengths.items():
            if values:
                ax.hist(
                    [min(x, bins[-1] - 1) for x in values],
                    bins=bins,
                    alpha=0.55,
                    label=f"{split} ({len(values)})",
                )
        ax.set_xlabel("words per caption")
        ax.set_ylabel("captions")
        ax.set_title("Caption length (references)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        plots.append(_fig_to_img(fig, "caption length histogram"))
    modality_splits = {k: s["modality"] for k, s in stats.items() if isinstance(s.get("modality"), dict)}
    if modality_splits:
        plt = plt or _plt()
        names = [
            m
            for m in next(iter(modality_splits.values()))
            if any(v.get(m, 0) for v in modality_splits.values())
        ]
        if names:
            fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=100)
            width = 0.8 / len(modality_splits)
            for k, (split, counts) in enumerate(modality_splits.items()):
                ax.bar(
                    [i + k * width for i in range(len(names))],
                    [counts.get(m, 0) for m in names],
                    width,
                    label=split,
                )
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20)
            ax.set_ylabel("images")
            ax.set_title("Modality")
            ax.legend()
            ax.grid(alpha=0.3, axis="y")
            fig.tight_layout()
            plots.append(_fig_to_img(fig, "modality bars"))
    for split, rows in per_caption.items():
        plt = plt or _plt()
        ref_len = [len((r.get("reference") or "").split()) for r in rows]
        pred_len = [len((r.get("prediction") or "").split()) for r in rows]
        if ref_len:
            fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=100)
            bins = _length_bins(ref_len + pred_len)
            ax.hist(
                [min(x, bins[-1] - 1) for x in ref_len],
                bins=bins,
                alpha=0.55,
                label="reference",
                color="#4c72b0",
            )
            ax.hist(
                [min(x, bins[-1] - 1) for x in pred_len],
                bins=bins,
                alpha=0.55,
                label="prediction",
                color="#dd8452",
            )
            ax.set_xlabel("words per caption")
            ax.set_ylabel("captions")
            ax.set_title(f"Predicted vs reference length ({split})")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            plots.append(_fig_to_img(fig, f"prediction length {split}"))
    if plots:
        out.append("<div class='plots'>" + "".join(plots) + "</div>")
    out.append("</section>")
    return "\n".join(out)


def _length_bins(values: list[int]) -> list[int]:
    """Shared integer bins up to the 99th percentile (longer captions go in the last bin)."""
    if not values:
        return [0, 1]
    top = sorted(values)[min(len(values) - 1, int(0.99 * len(values)))] + 1
    step = max(1, -(-top // 40))
    return list(range(0, top + step + 1, step))


def _card(row: dict[str, str], metric: str, image: str | None) -> str:
    score = _float(row.get(metric))
    score_txt = f"{metric} {score:.4f}" if score is not None else ""
    return (
        f"<div class='card'>{_thumbnail(image)}<div><div class='id'>{_esc(row.get('id', ''))}</div>"
        f"<div class='score'>{_esc(score_txt)}</div>"
        f"<div class='ref'><b>Reference:</b> {_esc(row.get('reference', ''))}</div>"
        f"<div class='pred'><b>Predicted:</b> {_esc(row.get('prediction', ''))}</div></div></div>"
    )


def _section_examples(per_caption: dict[str, list[dict[str, str]]], prep: Path | None, seed: int) -> str:
    out = ["<section><h2>Example captions</h2>"]
    if not per_caption:
        out.append(
            _missing("No per_caption.csv (RUN/eval/<split>/): no examples to show. Run 'medcap evaluate'.")
        )
        out.append("</section>")
        return "\n".join(out)
    split = "test" if "test" in per_caption else next(iter(per_caption))
    rows = per_caption[split]
    images: dict[str, str] = {}
    manifest = PreparedLayout(prep).manifest(split) if prep is not None else None
    if manifest is not None and manifest.is_file():
        try:
            images = {r.get("id", ""): r.get("image", "") for r in _read_csv(manifest)}
        except CsvError as e:
            out.append(_missing(f"{e}: captions are shown without images."))
    else:
        out.append(
            _missing(
                f"{manifest or 'PREP/<split>/manifest.csv'} not found: captions are shown without images."
            )
        )
    columns = [c for c in (rows[0].keys() if rows else []) if c not in ("id", "reference", "prediction")]
    metric = "bertscore" if "bertscore" in columns else (columns[0] if columns else "")
    if metric != "bertscore":
        out.append(
            _missing(
                f"per_caption.csv has no bertscore column; examples are ranked by {metric or 'nothing'}."
            )
        )
    scored = [r for r in rows if _float(r.get(metric)) is not None] if metric else list(rows)
    scored.sort(key=lambda r: _float(r.get(metric)) or 0.0, reverse=True)
    k = EXAMPLES_PER_GRID
    best = scored[:k]
    worst = list(reversed(scored[-k:])) if len(scored) > k else []
    shown = {r["id"] for r in best + worst}
    rest = [r for r in scored if r["id"] not in shown]
    rand = random.Random(seed).sample(rest, min(k, len(rest)))
    out.append(f"<p class='note'>Split {_esc(split)}, {len(rows)} captions, ranked by {_esc(metric)}.</p>")
    for title, group in (("Best", best), ("Worst", worst), ("Random", rand)):
        if not group:
            continue
        out.append(f"<h3>{title}</h3><div class='grid'>")
        out += [_card(r, metric, images.get(r.get("id", ""))) for r in group]
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Entry points


def _section(title: str, build: Callable[..., str], *args: Any) -> str:
    """One section, or what went wrong drawing it: a run's files are edited by hand and by other
    versions, and one odd value must not cost the whole report."""
    try:
        return build(*args)
    except Exception as e:  # noqa: BLE001 - reported on the page and in the log, the rest is drawn
        log.warning("report: the %s section failed: %s", title, e, exc_info=True)
        return (
            f"<section><h2>{_esc(title)}</h2>"
            + _missing(f"This section could not be drawn from the run's files: {type(e).__name__}: {e}")
            + "</section>"
        )


def _find_evals(run: Path) -> dict[str, Path]:
    """The evaluated splits of a run, test first."""
    eval_dir = RunLayout(run).eval_dir
    found: dict[str, Path] = {}
    if eval_dir.is_dir():
        for d in sorted(eval_dir.iterdir()):
            ev = EvalLayout(d)
            if d.is_dir() and (ev.per_caption.is_file() or ev.metrics.is_file()):
                found[d.name] = d
    order = sorted(found, key=lambda s: (s != "test", s))
    return {s: found[s] for s in order}


def write_report(run_dir: str | Path, out: str | Path | None = None, seed: int = 0) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) and return its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    config = _load_config(run)
    prep = _prepared_dir(run, config)
    evals = _find_evals(run)
    per_caption: dict[str, list[dict[str, str]]] = {}
    unreadable: list[str] = []
    for s, d in evals.items():
        if EvalLayout(d).per_caption.is_file():
            try:
                per_caption[s] = _read_csv(EvalLayout(d).per_caption)
            except CsvError as e:
                unreadable.append(str(e))
    body = [
        "".join(f"<section>{_missing(m)}</section>" for m in unreadable),
        _section("Metrics", _section_metrics, evals),
        _section("Training", _section_curves, run),
        _section("Example captions", _section_examples, per_caption, prep, seed),
        _section("Data", _section_data, prep, per_caption),
        _section("Run settings", _section_config, config, run),
    ]
    title = f"medcap report: {run.resolve().name}"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{_esc(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>{_esc(title)}</h1><p>{_esc(run.resolve())} &middot; generated {stamp}</p></header>"
        "<main>" + "\n".join(body) + "</main></body></html>\n"
    )
    target = Path(out) if out else RunLayout(run).report
    target.write_text(page, encoding="utf-8")
    return target
