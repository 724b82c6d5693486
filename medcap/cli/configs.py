"""``medcap configs``: the shipped run configs, by name, with what each is for."""

from __future__ import annotations

import argparse
import sys

from medcap.config.loader import ConfigError
from medcap.config.recipes import accelerate_config, accelerate_configs, describe, shipped_configs


def cmd_configs(argv: list[str]) -> int:
    """``medcap configs [--path] [--accelerate [NAME]]``: list the shipped configs (``--config NAME``
    finds one by name), or the shipped accelerate configs (``--accelerate NAME`` prints one's path, for
    ``accelerate launch --config_file $(medcap configs --accelerate fsdp2) ...``)."""
    p = argparse.ArgumentParser(
        prog="medcap configs",
        description="List the run configs shipped with medcap. Use one with --config NAME (medcap train, "
        "plan, features, run); copy one with --path to edit it.",
    )
    p.add_argument("--path", action="store_true", help="also print where each file is")
    p.add_argument(
        "--accelerate",
        nargs="?",
        const="",
        metavar="NAME",
        help="list the shipped accelerate configs (DDP, FSDP2, DeepSpeed ZeRO-2/3) with when to use each; "
        "with NAME, print that file's path (for accelerate launch --config_file)",
    )
    args = p.parse_args(argv)
    if args.accelerate:
        try:
            print(accelerate_config(args.accelerate))
        except ConfigError as e:
            print(f"medcap configs: {e}", file=sys.stderr)
            return 2
        return 0
    configs = accelerate_configs() if args.accelerate is not None else shipped_configs()
    width = max(len(n) for n in configs)
    for name, path in configs.items():
        line = f"{name:<{width}}  {describe(path)}"
        print(line + (f"\n{'':<{width}}  {path}" if args.path else ""))
    return 0
