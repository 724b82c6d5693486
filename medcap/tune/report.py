"""A study's files: ``trials.csv`` (one row per trial), ``best.yaml`` (the best trial's run config)
and ``report.html`` (the trials table, the best settings and plots of the search: the objective by
trial, parameter importances, and the validation curves the pruner judged)."""

from __future__ import annotations

import csv
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from medcap.eval.report import _CSS, _esc, _fig_to_img, _missing, _plt
from medcap.layout import StudyLayout
from medcap.tune.space import SearchSpace
from medcap.tune.study import (
    ATTR_ERROR,
    ATTR_INTERRUPTED,
    ATTR_RETRY_OF,
    ATTR_RUN_DIR,
    ATTR_SURPLUS,
    ATTR_WORKER,
    summarize,
)


def _note(trial: Any) -> str:
    attrs = trial.user_attrs
    notes = []
    if ATTR_RETRY_OF in attrs:
        notes.append(f"retry of trial {attrs[ATTR_RETRY_OF]}")
    if attrs.get(ATTR_SURPLUS):
        notes.append("surplus: the budget was full when it was asked for (not run, not counted)")
    if attrs.get(ATTR_INTERRUPTED):
        notes.append("interrupted (retried by the next medcap tune)")
    if ATTR_ERROR in attrs:
        notes.append(f"error: {attrs[ATTR_ERROR]}")
    state = trial.state.name
    if state == "FAIL" and not notes:
        notes.append("its worker stopped answering (killed?): retried with the same settings")
    if state == "PRUNED":
        notes.append(f"pruned at step {max(trial.intermediate_values) if trial.intermediate_values else '?'}")
    return "; ".join(notes)


def trial_rows(study: Any, space: SearchSpace) -> list[dict[str, Any]]:
    """The trials table: number, state, objective, each searched setting, steps, time, run folder."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            space.objective: t.value if t.value is not None else last,
        }
        for p in space.params:
            row[p.name] = t.params.get(p.name)
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        row.update(
            best_step=t.user_attrs.get("best_step"),
            steps=t.user_attrs.get("step") or (max(t.intermediate_values) if t.intermediate_values else None),
            seconds=round(duration, 1) if duration is not None else None,
            worker=t.user_attrs.get(ATTR_WORKER, ""),
            run_dir=t.user_attrs.get(ATTR_RUN_DIR, ""),
            note=_note(t),
        )
        rows.append(row)
    return rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_study_files(study: Any, layout: StudyLayout, space: SearchSpace) -> Path:
    """Write trials.csv, best.yaml and report.html into the study folder; returns the report."""
    import io

    rows = trial_rows(study, space)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _atomic_write(layout.trials_table, buf.getvalue())
    result = summarize(study, layout, "")
    if result.best_run:
        best_cfg = Path(result.best_run) / "config.yaml"
        if best_cfg.is_file():
            tmp = layout.best_config.with_name(f".best.{os.getpid()}.tmp")
            shutil.copyfile(best_cfg, tmp)
            tmp.replace(layout.best_config)
    _atomic_write(layout.report, render_report(study, layout, space, rows, result))
    return layout.report


def render_report(
    study: Any, layout: StudyLayout, space: SearchSpace, rows: list[dict[str, Any]], result: Any
) -> str:
    body = [
        _section_summary(space, result, layout),
        _section_plots(study, space),
        _section_table(space, rows, result.best_trial),
    ]
    title = f"medcap tune: {layout.root.resolve().name}"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{_esc(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>{_esc(title)}</h1><p>{_esc(layout.root.resolve())} &middot; search space "
        f"{_esc(space.source)} &middot; generated {stamp}</p></header>"
        "<main>" + "\n".join(body) + "</main></body></html>\n"
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def _section_summary(space: SearchSpace, result: Any, layout: StudyLayout) -> str:
    out = ["<section><h2>Best settings</h2>"]
    out.append(
        f"<p class='note'>Objective: <b>{_esc(space.objective)}</b> ({space.direction}d) on the validation "
        f"{'split' if space.objective == 'loss' else 'subset captioned at each validation'}; "
        f"{result.counted} of {space.trials} trials finished ({result.complete} complete, {result.pruned} "
        f"pruned, {result.failed} failed); pruner {_esc(space.pruner.kind)}; base config {_esc(space.config)}.</p>"
    )
    if result.best_trial is None:
        out.append(_missing("No trial has completed yet."))
        out.append("</section>")
        return "\n".join(out)
    out.append(
        f"<p>Best: trial <b>{result.best_trial}</b>, {_esc(space.objective)} <b>{result.best_value:.4f}</b>, "
        f"run folder {_esc(result.best_run)}</p>"
    )
    out.append("<table class='kv'>")
    out += [f"<tr><td>{_esc(k)}</td><td>{_esc(_fmt(v))}</td></tr>" for k, v in result.best_params.items()]
    out.append("</table>")
    out.append(
        f"<p class='note'>Train it again (longer, or on all data): <code>medcap train --config "
        f"{_esc(layout.best_config)} --train.out_dir runs/best</code></p>"
    )
    out.append("</section>")
    return "\n".join(out)


def _section_plots(study: Any, space: SearchSpace) -> str:
    from optuna.trial import TrialState

    out = ["<section><h2>The search</h2>"]
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if not complete and not pruned:
        out.append(_missing("No finished trial yet: nothing to plot."))
        out.append("</section>")
        return "\n".join(out)
    plt = _plt()
    plots = []
    # 1. The objective by trial, with the best so far.
    fig, ax = plt.subplots(figsize=(6.2, 3.6), dpi=100)
    if complete:
        ax.scatter(
            [t.number for t in complete],
            [t.value for t in complete],
            color="#4c72b0",
            label="complete",
            zorder=3,
        )
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
            color="#dd8452",
            marker="x",
            label="pruned (last figure)",
            zorder=3,
        )
    best, xs, ys = None, [], []
    for t in sorted(complete, key=lambda t: t.number):
        if best is None or (t.value < best if space.direction == "minimize" else t.value > best):
            best = t.value
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="#c44e52", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(space.objective)
    ax.set_title("Objective by trial")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plots.append(_fig_to_img(fig, "objective by trial"))
    # 2. Parameter importances (fANOVA over the complete trials).
    importances = _importances(study)
    if importances:
        fig, ax = plt.subplots(figsize=(6.2, 0.5 + 0.45 * len(importances)), dpi=100)
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="#55a868")
        ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
        ax.set_title("Parameter importances")
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        plots.append(_fig_to_img(fig, "parameter importances"))
    # 3. The validation curves the pruner judged.
    curves = [t for t in trials if t.intermediate_values]
    if curves:
        fig, ax = plt.subplots(figsize=(6.2, 3.6), dpi=100)
        for t in curves:
            steps = sorted(t.intermediate_values)
            style = {"color": "#dd8452", "ls": "--", "lw": 1} if t.state == TrialState.PRUNED else {"lw": 1.5}
            ax.plot(steps, [t.intermediate_values[s] for s in steps], **style)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(space.objective)
        ax.set_title("Validation figure of each trial (dashed: pruned)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        plots.append(_fig_to_img(fig, "validation curves"))
    out.append("<div class='plots'>" + "".join(plots) + "</div>")
    if not importances:
        out.append(
            "<p class='note'>Parameter importances need at least two complete trials with different settings.</p>"
        )
    out.append("</section>")
    return "\n".join(out)


def _importances(study: Any) -> dict[str, float]:
    import warnings

    import optuna
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(
                optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
                )
            )
    except (RuntimeError, ValueError):
        return {}  # e.g. every complete trial has the same settings


def _section_table(space: SearchSpace, rows: list[dict[str, Any]], best_trial: int | None) -> str:
    out = ["<section><h2>Trials</h2>"]
    if not rows:
        out.append(_missing("No trials yet."))
        out.append("</section>")
        return "\n".join(out)
    columns = [c for c in rows[0] if c not in ("worker",)]
    out.append("<table><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr>")
    for r in rows:
        cls = " class='primary'" if r["number"] == best_trial else ""
        cells = []
        for c in columns:
            num = isinstance(r[c], int | float) and not isinstance(r[c], bool)
            cells.append(f"<td{' class=num' if num else ''}>{_esc(_fmt(r[c]))}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    out.append(
        "<p class='note'>Each trial is a normal medcap run folder (run_dir): its log.csv, samples.jsonl "
        "and checkpoints, and <code>medcap report RUN</code> for its own page.</p>"
    )
    out.append("</section>")
    return "\n".join(out)


__all__ = ["render_report", "trial_rows", "write_study_files"]
