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


def cmd_concepts_train(argv: list[str]) -> int:
    """``medcap concepts train --config CONFIG [--resume RUN] [--section.key VALUE ...]``."""
    from medcap.concepts.features import ConceptError
    from medcap.config.concepts import ConceptRunConfig, load_concepts_config
    from medcap.config.help import settings_help
    from medcap.config.loader import ConfigError
    from medcap.layout import config_file

    p = argparse.ArgumentParser(
        prog="medcap concepts train",
        description="Train a multi-label concept (CUI) classifier on the frozen vision side of a captioning "
        "model: a linear or small MLP head on its query embeddings (from 'medcap features' with "
        "--train.query_cache DIR, or computed from the images), class-balanced loss, thresholds tuned on "
        "validation for the official per-image F1. Any setting can be overridden with --section.key VALUE.",
        epilog="settings (section.key, type, help, default):\n\n" + settings_help(ConceptRunConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--config", help="concept config: a YAML file or a shipped config's name (concepts-demo)")
    p.add_argument(
        "--resume", type=Path, metavar="RUN", help="continue the run in RUN from its last checkpoint"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = p.parse_known_args(argv)
    try:
        path = args.config
        if args.resume is not None:
            if path is None:
                if not config_file(args.resume).is_file():
                    raise ConfigError(
                        f"--resume {args.resume}: no config.yaml there; is it a concept run folder?"
                    )
                path = config_file(args.resume)
            rest = [*rest, "--train.resume", "true", "--train.out_dir", str(args.resume)]
        cfg = load_concepts_config(path, rest)
        if args.print_config:
            import yaml

            from medcap.config.loader import to_dict

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        from medcap.concepts.train import fit_concepts

        fit_concepts(cfg)
        return 0
    except ConfigError as e:
        print(f"medcap concepts train: config error: {e}", file=sys.stderr)
        return 2
    except (ConceptError, FileNotFoundError) as e:
        print(f"medcap concepts train: error: {e}", file=sys.stderr)
        return 1


def cmd_concepts_predict(argv: list[str]) -> int:
    """``medcap concepts predict --checkpoint CRUN --split test [--prepared DIR] [--out FILE]``."""
    from medcap.concepts.features import ConceptError
    from medcap.concepts.predict import predict_concepts
    from medcap.config.concepts import read_concepts_config
    from medcap.config.data import DataConfig
    from medcap.config.loader import ConfigError
    from medcap.infer.predict import prepared_of_run
    from medcap.layout import RunLayout, resolve_concept_checkpoint, run_of_checkpoint

    p = argparse.ArgumentParser(
        prog="medcap concepts predict",
        description="Predict the concepts of a prepared split and write the ImageCLEFmedical concept-detection "
        "submission (ID,CUIs with CUIs joined by ';'), its zip and SPLIT.meta.json, then check it.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="concept checkpoint, or concept run folder")
    p.add_argument("--split", default="test", help="split to predict (default test)")
    p.add_argument(
        "--prepared", type=Path, help="prepared data folder (default: the checkpoint's data.prepared)"
    )
    p.add_argument("--out", type=Path, help="submission CSV (default CRUN/predictions/<split>.csv)")
    p.add_argument("--query-cache", type=Path, help="read the split's features from this query cache")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--limit", type=int, help="only the first N images (a quick look; not a submission)")
    args = p.parse_args(argv)
    try:
        ckpt = resolve_concept_checkpoint(args.checkpoint)
        cfg = read_concepts_config(ckpt)
    except (FileNotFoundError, ConfigError) as e:
        print(f"medcap concepts predict: {e}", file=sys.stderr)
        return 2
    prepared = args.prepared or prepared_of_run(cfg, ckpt, args.split)  # type: ignore[arg-type]
    manifest = DataConfig(prepared=prepared).manifest(args.split)
    if not manifest.is_file():
        print(f"medcap concepts predict: {manifest} does not exist; pass --prepared DIR", file=sys.stderr)
        return 2
    run_dir = run_of_checkpoint(ckpt) or ckpt
    out = args.out or RunLayout(run_dir).predictions(args.split)
    try:
        result = predict_concepts(
            ckpt,
            manifest,
            out,
            split=args.split,
            query_cache=args.query_cache,
            device=args.device,
            batch_size=args.batch_size,
            limit=args.limit,
        )
    except ConceptError as e:
        print(f"medcap concepts predict: {e}", file=sys.stderr)
        return 2
    print(
        f"medcap concepts predict: {result.images} images in {result.seconds:.1f} s; submission {result.submission} "
        f"and {result.zip}",
        file=sys.stderr,
    )
    if result.unreadable:
        print(
            f"medcap concepts predict: WARNING {len(result.unreadable)} images could not be read and have no "
            "concepts: " + ", ".join(result.unreadable[:10]),
            file=sys.stderr,
        )
    if result.errors:
        print(
            "medcap concepts predict: the written submission fails its check:\n  "
            + "\n  ".join(result.errors),
            file=sys.stderr,
        )
        return 1
    return 0


__all__ = ["check_concepts_cli", "cmd_concepts_predict", "cmd_concepts_train", "evaluate_concepts_cli"]
