"""``medcap tune``: a thin wrapper over ``medcap.tune``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medcap.config.loader import ConfigError


def cmd_tune(argv: list[str]) -> int:
    """``medcap tune --space SPACE --study DIR [--storage URL] [--trials N] [--report]``."""
    from medcap.tune.space import shipped_spaces

    p = argparse.ArgumentParser(
        prog="medcap tune",
        description="Hyperparameter search with Optuna (TPE sampling, pruning from the validation figures): "
        "each trial is a normal medcap run in STUDY/trials/NNNN, chosen and judged by the space's objective "
        "(the validation loss, or a caption metric such as bertscore). Run the same command again to resume "
        "an interrupted study, or on several machines with one --storage to share it.",
        epilog="shipped search spaces: " + ", ".join(shipped_spaces()),
    )
    p.add_argument("--space", help="search space: a YAML file or a shipped space's name")
    p.add_argument("--study", type=Path, required=True, help="study folder (trials, report, default storage)")
    p.add_argument(
        "--storage",
        help="Optuna storage URL shared by the workers, e.g. postgresql://user:pass@host/db "
        "(default: sqlite file STUDY/study.db, for workers on this machine)",
    )
    p.add_argument("--study-name", help="name of the study in the storage (default: the study folder's name)")
    p.add_argument("--trials", type=int, help="trials of the whole study (default: the space's trials)")
    p.add_argument(
        "--max-trials-here", type=int, help="stop this worker after this many trials (others go on)"
    )
    p.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        help="seconds between a running trial's heartbeats; a trial silent for three times this is failed and "
        "retried by another worker (default 60)",
    )
    p.add_argument("--report", action="store_true", help="only write the study's report and trials table")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress output")
    args = p.parse_args(argv)
    if args.space is None:
        p.error("give --space (a shipped name: " + ", ".join(shipped_spaces()) + ", or a YAML file)")
    try:
        from medcap.tune.space import load_space
        from medcap.tune.study import open_study, tune

        space = load_space(args.space)
        if args.heartbeat < 1:
            raise ConfigError(f"--heartbeat must be at least 1 second, got {args.heartbeat}")
        if args.report:
            from medcap.layout import StudyLayout
            from medcap.tune.report import write_study_files

            layout = StudyLayout(args.study)
            study = open_study(space, layout, args.storage, args.study_name, args.heartbeat)
            print(f"wrote {write_study_files(study, layout, space)}")
            return 0
        result = tune(
            space,
            args.study,
            storage=args.storage,
            study_name=args.study_name,
            trials=args.trials,
            heartbeat=args.heartbeat,
            max_trials_here=args.max_trials_here,
            progress=not args.quiet,
        )
    except ConfigError as e:
        print(f"medcap tune: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "medcap tune: interrupted; run the same command again to resume (finished trials are kept, the "
            "interrupted one is retried from its last checkpoint)",
            file=sys.stderr,
        )
        return 130
    best = (
        f"best trial {result.best_trial}: {space.objective} {result.best_value:.4f} with "
        + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best_params.items()
        )
        if result.best_trial is not None
        else "no complete trial"
    )
    print(
        f"medcap tune: {result.counted} of {space.trials if args.trials is None else args.trials} trials finished "
        f"({result.complete} complete, {result.pruned} pruned, {result.failed} failed; {result.ran_here} run by "
        f"this worker in {result.wall_s:.0f} s); {best}\n  storage {result.storage}\n  report {result.report}"
    )
    return 0


__all__ = ["cmd_tune"]
