"""``medcap evaluate|compare|check-submission|report``: thin wrappers over ``medcap.eval``.

``medcap evaluate`` reads predictions in the submission format (``ID,Caption``) and references (a
ROCOv2 captions CSV or a prepared ``manifest.csv``), pairs them by ID and writes
``OUT/metrics.json`` (means, bootstrap 95% intervals, protocol, models, unavailable metrics with
reasons) and ``OUT/per_caption.csv``. ``medcap compare RUN_A RUN_B`` runs a paired bootstrap on the
per-caption scores of two evaluations.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from medcap.eval.compare import compare
from medcap.eval.evaluate import PROTOCOLS, EvaluationError, evaluate, format_summary
from medcap.eval.metrics import ALL_METRICS
from medcap.eval.report import write_report
from medcap.eval.submission import inspect_submission
from medcap.layout import EvalLayout, eval_dir_for


def cmd_evaluate(argv: list[str]) -> int:
    """``medcap evaluate``: score a submission file against references."""
    ap = argparse.ArgumentParser(
        prog="medcap evaluate", description="score predictions with the ImageCLEFmedical protocol"
    )
    ap.add_argument(
        "--task",
        choices=["captions", "concepts"],
        default="captions",
        help="captions (caption prediction) or concepts (concept detection, scored as the 2025 evaluator)",
    )
    ap.add_argument("--predictions", required=True, help="submission CSV (ID,Caption or ID,CUIs)")
    ap.add_argument(
        "--references",
        required=True,
        help="captions CSV (ID,Caption), concepts CSV (ID,CUIs) or prepared manifest.csv",
    )
    ap.add_argument(
        "--manual-references",
        help="concepts: the *_concepts_manual.csv of the secondary score (default: found next to --references)",
    )
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="imageclef2024")
    ap.add_argument(
        "--bertscore-model", help="BERTScore model: hub id or local folder (default deberta-xlarge-mnli)"
    )
    ap.add_argument("--bertscore-layers", type=int, help="hidden layer for BERTScore (MiniLM: 6)")
    ap.add_argument("--bleurt-model", help="BLEURT checkpoint folder (optional)")
    ap.add_argument("--clip-model", help="CLIP-type model folder for CLIPScore / image similarity (optional)")
    ap.add_argument("--images", help="folder of <ID>.jpg images (when the references are a captions CSV)")
    ap.add_argument("--out", help="output folder (default: RUN/eval/<split> for RUN/predictions/<split>.csv)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--subset", action="store_true", help="score only the predicted IDs (default: all required)"
    )
    ap.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    args = ap.parse_args(argv)
    pred = Path(args.predictions)
    out = Path(args.out) if args.out else eval_dir_for(pred)  # RUN/predictions/test.csv -> RUN/eval/test
    if args.task == "concepts":
        from medcap.cli.concepts import evaluate_concepts_cli

        return evaluate_concepts_cli(args, out)
    try:
        summary = evaluate(
            pred,
            args.references,
            args.protocol,
            out,
            bertscore_model=args.bertscore_model,
            bertscore_layers=args.bertscore_layers,
            bleurt_model=args.bleurt_model,
            clip_model=args.clip_model,
            images_dir=args.images,
            bootstrap=args.bootstrap,
            seed=args.seed,
            subset=args.subset,
            device=args.device,
        )
    except EvaluationError as e:
        print(f"medcap evaluate: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"wrote {EvalLayout(out).metrics} and {EvalLayout(out).per_caption}")
    return 0


def cmd_compare(argv: list[str]) -> int:
    """``medcap compare RUN_A RUN_B``: which run is better, and how sure."""
    ap = argparse.ArgumentParser(
        prog="medcap compare", description="paired bootstrap comparison of two evaluations"
    )
    ap.add_argument("run_a", help="eval dir (with per_caption.csv) or run dir (with eval/<split>/)")
    ap.add_argument("run_b")
    ap.add_argument("--split", help="which eval/<split> of a run dir (default: test, or the only one)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    try:
        res = compare(args.run_a, args.run_b, args.bootstrap, args.seed, args.split)
    except EvaluationError as e:
        print(f"medcap compare: {e}", file=sys.stderr)
        return 2
    print(
        f"A = {res['a']}\nB = {res['b']}\n{res['n']} paired captions, {res['samples']} bootstrap resamples\n"
    )
    print(f"{'metric':<13} {'A':>8} {'B':>8} {'A-B':>9}  {'95% CI':>19} {'p':>7} {'P(A>B)':>7}")
    order = [m for m in ALL_METRICS if m in res["metrics"]] + [
        m for m in res["metrics"] if m not in ALL_METRICS
    ]
    for m in order:
        r = res["metrics"][m]
        print(
            f"{m:<13} {r['mean_a']:8.4f} {r['mean_b']:8.4f} {r['diff']:+9.4f}  "
            f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] {r['p_value']:7.3g} {r['prob_a_better']:7.3f}"
        )
    print()
    for w in res["warnings"]:
        print(f"warning: {w}")
    for m in order:
        print("- " + res["metrics"][m]["verdict"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_check_submission(argv: list[str]) -> int:
    """``medcap check-submission FILE [--references CSV]``: print OK or the errors; exit 0 or 1."""
    p = argparse.ArgumentParser(
        prog="medcap check-submission",
        description="Validate an ImageCLEFmedical caption submission (CSV, or zip with submission.csv) "
        "like the official checker. Errors give the row (line) number, header = row 1.",
    )
    p.add_argument("file", type=Path, help="submission.csv or the zip holding it")
    p.add_argument(
        "--references",
        type=Path,
        help="ground-truth captions CSV (ID,Caption) or a prepared manifest.csv: enables the unknown, "
        "missing and order checks",
    )
    p.add_argument("--ignore-order", action="store_true", help="do not require the ground-truth order")
    p.add_argument(
        "--task",
        choices=["captions", "concepts"],
        default="captions",
        help="captions (ID,Caption) or concepts (ID,CUIs: checked as the 2025 concept evaluator reads it)",
    )
    p.add_argument(
        "--strict", action="store_true", help="concepts: malformed or empty CUIs are errors, not warnings"
    )
    args = p.parse_args(argv)
    if args.task == "concepts":
        from medcap.cli.concepts import check_concepts_cli

        return check_concepts_cli(args)
    try:
        check = inspect_submission(args.file, args.references, check_order=not args.ignore_order)
    except (FileNotFoundError, UnicodeDecodeError, csv.Error) as e:
        print(f"medcap check-submission: cannot read the references: {e}", file=sys.stderr)
        return 1
    for w in check.warnings:
        print(f"warning: {w}")
    if check.ok:
        refs = (
            f", matching {args.references}" if args.references else " (no references given: IDs not checked)"
        )
        print(f"OK: {args.file} is a valid submission with {check.rows} captions{refs}")
        return 0
    print(f"{args.file}: {len(check.errors)} problem(s):")
    for e in check.errors:
        print(f"  {e}")
    return 1


def cmd_report(argv: list[str]) -> int:
    """``medcap report RUN_DIR``: write RUN_DIR/report.html."""
    ap = argparse.ArgumentParser(
        prog="medcap report", description="write a self-contained HTML report for a run"
    )
    ap.add_argument("run_dir", help="run directory (train.out_dir)")
    ap.add_argument("--out", help="where to write the page (default RUN_DIR/report.html)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the random examples")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.out, args.seed)
    except FileNotFoundError as e:
        print(f"medcap report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
