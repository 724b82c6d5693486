"""``medcap compare``: which of two evaluated runs is better, by a paired bootstrap over the same
images (each metric's difference with its 95% interval and a p-value)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medcap.data.tables import CsvError, read_csv_dicts
from medcap.eval.evaluate import EvaluationError, _ci, bootstrap_means
from medcap.layout import EvalLayout, RunLayout


def find_per_caption(path: str | Path, split: str | None = None) -> Path:
    """``per_caption.csv`` of an eval dir, a run dir (``eval/<split>/``) or the file itself."""
    p = Path(path)
    if p.is_file():
        return p
    if EvalLayout(p).per_caption.is_file():
        return EvalLayout(p).per_caption
    run = RunLayout(p)
    if run.eval_dir.is_dir():
        if split:
            cand = run.eval(split).per_caption
            if cand.is_file():
                return cand
            raise EvaluationError(f"{cand} does not exist: run 'medcap evaluate' for split {split!r} first")
        found = sorted(run.eval_dir.glob("*/" + EvalLayout(".").per_caption.name))
        if run.eval("test").per_caption.is_file():
            return run.eval("test").per_caption
        if len(found) == 1:
            return found[0]
        if found:
            raise EvaluationError(
                f"{p} has several evaluations ({', '.join(f.parent.name for f in found)}): choose one with --split"
            )
    raise EvaluationError(
        f"{p}: no per_caption.csv found (give an eval dir, a run dir with eval/<split>/, or the CSV itself)"
    )


def read_per_caption(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """IDs and per-metric score arrays of a ``per_caption.csv``."""
    try:
        header, rows = read_csv_dicts(path)
    except CsvError as e:
        raise EvaluationError(str(e)) from None
    cols = [c for c in header if c not in ("id", "reference", "prediction")]
    ids: list[str] = []
    values: dict[str, list[float]] = {c: [] for c in cols}
    for rowno, rec in rows:
        ids.append(rec.get("id", ""))
        for c in cols:
            try:
                values[c].append(float(rec[c]))
            except (TypeError, ValueError) as e:
                raise EvaluationError(f"{path}, row {rowno}, column {c}: not a number: {rec[c]!r}") from e
    return ids, {c: np.asarray(v) for c, v in values.items()}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of mean(a) - mean(b): difference, 95% CI, two-sided p, P(A better)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    boot = bootstrap_means(d[:, None], samples, seed)[:, 0]
    diff = float(d.mean())
    # p-value: how often a resampled difference, centred on zero, is at least as far from zero.
    p = float((np.sum(np.abs(boot - diff) >= abs(diff)) + 1) / (samples + 1))
    lo, hi = _ci(boot)
    return {
        "mean_a": float(np.mean(a)),
        "mean_b": float(np.mean(b)),
        "diff": diff,
        "ci95": [lo, hi],
        "p_value": min(1.0, p),
        "prob_a_better": float(np.mean(boot > 0)),
    }


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 + 1e-12 else f"p={p:.3g}"


def verdict(metric: str, r: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """One plain sentence about a ``paired_bootstrap`` result."""
    lo, hi = r["ci95"]
    if lo > 0 or hi < 0:
        better, worse = (name_a, name_b) if r["diff"] > 0 else (name_b, name_a)
        sure = r["prob_a_better"] if r["diff"] > 0 else 1 - r["prob_a_better"]
        return (
            f"{better} is better than {worse} on {metric} by {abs(r['diff']):.4f} "
            f"(95% CI of the difference {lo:+.4f} to {hi:+.4f}, {_p(r['p_value'])}; "
            f"{better} came out ahead in {100 * sure:.1f}% of resamples)"
        )
    return (
        f"no clear difference on {metric}: {r['diff']:+.4f} (95% CI {lo:+.4f} to {hi:+.4f} includes 0, "
        f"{_p(r['p_value'])}; {name_a} ahead in {100 * r['prob_a_better']:.1f}% of resamples)"
    )


def compare(
    run_a: str | Path, run_b: str | Path, samples: int = 1000, seed: int = 0, split: str | None = None
) -> dict[str, Any]:
    """Paired bootstrap comparison of two evaluations, metric by metric, on their shared IDs."""
    pa, pb = find_per_caption(run_a, split), find_per_caption(run_b, split)
    ids_a, va = read_per_caption(pa)
    ids_b, vb = read_per_caption(pb)
    if set(ids_a) != set(ids_b):
        only_a = [i for i in ids_a if i not in set(ids_b)]
        only_b = [i for i in ids_b if i not in set(ids_a)]
        raise EvaluationError(
            f"{pa} and {pb} score different captions ({len(only_a)} only in A, e.g. {only_a[:3]}; "
            f"{len(only_b)} only in B, e.g. {only_b[:3]}): evaluate both on the same references"
        )
    order_b = {i: k for k, i in enumerate(ids_b)}
    perm = np.array([order_b[i] for i in ids_a], dtype=int)
    metrics = [m for m in va if m in vb]
    if not metrics:
        raise EvaluationError(f"{pa} and {pb} have no metric column in common")
    warnings: list[str] = []
    sa, sb = _summary_next_to(pa), _summary_next_to(pb)
    if sa and sb:
        if sa.get("protocol") != sb.get("protocol"):
            warnings.append(
                f"the two evaluations used different protocols ({sa.get('protocol')} vs {sb.get('protocol')}): "
                "shared metric names may not mean the same thing"
            )
        for m, desc in (sa.get("models") or {}).items():
            other = (sb.get("models") or {}).get(m)
            if other is not None and other != desc:
                warnings.append(f"{m} was computed with different settings: {desc!r} vs {other!r}")
    results: dict[str, Any] = {}
    for m in metrics:
        r = paired_bootstrap(va[m], vb[m][perm], samples, seed)
        r["verdict"] = verdict(m, r)
        results[m] = r
    return {
        "a": str(pa),
        "b": str(pb),
        "n": len(ids_a),
        "samples": samples,
        "metrics": results,
        "warnings": warnings,
    }


def _summary_next_to(per_caption: Path) -> dict[str, Any] | None:
    path = EvalLayout(per_caption.parent).metrics
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
