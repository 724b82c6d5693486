"""``medcap run``: the main job on the built-in defaults (``medcap.pipeline.run_demo``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medcap.config.loader import ConfigError


def cmd_run(argv: list[str]) -> int:
    """``medcap run [--out DIR] [--config NAME_OR_YAML] [--n N] [--seed S] [--section.key VALUE ...]``."""
    p = argparse.ArgumentParser(
        prog="medcap run",
        description="The main job: phantoms -> prepare -> train -> predict -> evaluate -> report.",
        allow_abbrev=False,
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument(
        "--config",
        default="demo",
        help="training config: a YAML file or a shipped config's name (default demo)",
    )
    p.add_argument("--n", type=int, default=1000, help="number of phantom images (all splits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", default="imageclef2024", choices=["imageclef2024", "imageclef2025", "coco"])
    args, overrides = p.parse_known_args(argv)
    from medcap.pipeline import run_demo

    try:
        report = run_demo(args.out, args.config, args.n, args.seed, overrides, args.protocol)
    except ConfigError as e:
        print(f"medcap run: config error: {e}", file=sys.stderr)
        return 2
    print(f"\nDone. Open {report} in a browser.")
    return 0
