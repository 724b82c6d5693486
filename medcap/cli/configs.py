"""``medcap configs``: the shipped run configs, by name, with what each is for."""

from __future__ import annotations

import argparse

from medcap.config.recipes import describe, shipped_configs


def cmd_configs(argv: list[str]) -> int:
    """``medcap configs [--path]``: list the shipped configs (``--config NAME`` finds one by name)."""
    p = argparse.ArgumentParser(
        prog="medcap configs",
        description="List the run configs shipped with medcap. Use one with --config NAME (medcap train, "
        "plan, features, run); copy one with --path to edit it.",
    )
    p.add_argument("--path", action="store_true", help="also print where each file is")
    args = p.parse_args(argv)
    configs = shipped_configs()
    width = max(len(n) for n in configs)
    for name, path in configs.items():
        line = f"{name:<{width}}  {describe(path)}"
        print(line + (f"\n{'':<{width}}  {path}" if args.path else ""))
    return 0
