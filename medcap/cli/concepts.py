"""``medcap concepts train|predict`` and the concept side of ``medcap evaluate`` and
``medcap check-submission``: thin wrappers over ``medcap.concepts`` and ``medcap.eval.concepts``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medcap.layout import EvalLayout


def evaluate_concepts_cli(args: argparse.Namespace, out: Path) -> int:
    """``medcap evaluate --task concepts``: the 2025 concept-detection scores with bootstrap intervals."""
    from medcap.eval.concepts import evaluate_concepts, format_concept_summary
    from medcap.eval.evaluate import EvaluationError

    try:
        summary = evaluate_concepts(
            args.predictions,
            args.references,
            out,
            manual_references=args.manual_references,
            bootstrap=args.bootstrap,
            seed=args.seed,
        )
    except EvaluationError as e:
        print(f"medcap evaluate: {e}", file=sys.stderr)
        return 2
    print(format_concept_summary(summary))
    layout = EvalLayout(out)
    print(f"wrote {layout.metrics}, {layout.per_image} and {layout.per_concept}")
    return 0


def check_concepts_cli(args: argparse.Namespace) -> int:
    """``medcap check-submission --task concepts``: OK, or every problem with its row; exit 0 or 1."""
    from medcap.eval.concept_submission import inspect_concept_submission

    check = inspect_concept_submission(args.file, args.references, strict=args.strict)
    for w in check.warnings:
        print(f"warning: {w}")
    if check.ok:
        refs = (
            f", matching {args.references}" if args.references else " (no references given: IDs not checked)"
        )
        print(f"OK: {args.file} is a valid concept-detection submission with {check.rows} rows{refs}")
        return 0
    print(f"{args.file}: {len(check.errors)} problem(s):")
    for e in check.errors:
        print(f"  {e}")
    return 1


__all__ = ["check_concepts_cli", "evaluate_concepts_cli"]
