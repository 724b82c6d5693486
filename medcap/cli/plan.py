"""``medcap plan``: will this config fit a GPU?"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medcap.plan.gpus import GPUS
from medcap.plan.planner import plan


def cmd_plan(argv: list[str]) -> int:
    """``medcap plan --config CONFIG --gpu t4|v100-16|v100-32|a10|a100-40|a100-80|h100 [--gpus N]``, or
    ``medcap plan --all-configs --gpu t4,v100-16,a100-80,h100`` for one table of every shipped config."""
    from medcap.config.loader import ConfigError
    from medcap.config.run import load_run_config

    p = argparse.ArgumentParser(
        prog="medcap plan",
        description="Will this config fit a GPU? Memory per GPU (weights, adapters, gradients, optimizer, "
        "activations, overhead), the largest micro-batch that fits and the time of an epoch. Builds the "
        "model on the meta device: no weights, no download. Any setting can be overridden with "
        "--section.key VALUE.",
    )
    p.add_argument("--config", help="run config: a YAML file or a shipped config's name (medcap configs)")
    p.add_argument(
        "--gpu",
        required=True,
        help=f"GPU type ({', '.join(sorted(GPUS))}; 'cpu': this machine's RAM); with --all-configs a "
        "comma-separated list",
    )
    p.add_argument(
        "--all-configs",
        action="store_true",
        help="plan every shipped config (medcap configs) on each --gpu and print one table",
    )
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (data parallel); default 1")
    p.add_argument("--batch-size", type=int, help="micro-batch per GPU (default: train.batch_size)")
    p.add_argument(
        "--utilisation",
        type=float,
        help="achieved fraction of the peak rate for the epoch time (default 0.40; x0.6 for 4-bit, x0.25 "
        "for 8-bit weights)",
    )
    p.add_argument("--json", type=Path, help="also write the plan as JSON here")
    args, rest = p.parse_known_args(argv)
    gpus = [g.strip() for g in args.gpu.split(",") if g.strip()]
    unknown = [g for g in gpus if g not in GPUS]
    if unknown or not gpus or (len(gpus) > 1 and not args.all_configs):
        p.error(
            f"argument --gpu: invalid choice: {', '.join(map(repr, unknown)) or repr(args.gpu)} (choose from "
            f"{', '.join(sorted(GPUS))}; several, comma-separated, only with --all-configs)"
        )
    if args.all_configs:
        return _all_configs(gpus, rest, args.json)
    try:
        cfg = load_run_config(args.config, rest)
        if args.batch_size is not None and args.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.utilisation is not None and not 0 < args.utilisation <= 1:
            raise ConfigError(f"--utilisation must be in (0, 1], got {args.utilisation}")
        result = plan(
            cfg,
            gpus[0],
            args.gpus,
            args.batch_size,
            args.utilisation,
            config_name=str(args.config) if args.config else "defaults",
        )
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"medcap plan: {e}", file=sys.stderr)
        return 2
    print(result.report())
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=1, default=str), encoding="utf-8")
    return 0


def _all_configs(gpus: list[str], overrides: list[str], json_path: Path | None) -> int:
    """One table: every shipped config on each GPU."""
    from medcap.config.loader import ConfigError
    from medcap.config.recipes import shipped_configs
    from medcap.config.run import load_run_config
    from medcap.plan.table import format_table, plan_table

    try:
        configs = {name: load_run_config(path, overrides) for name, path in shipped_configs().items()}
        rows = plan_table(configs, gpus)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"medcap plan: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, gpus))
    if json_path:
        data = {r.config: {g: (p.to_dict() if p else None) for g, p in r.plans.items()} for r in rows}
        json_path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    return 0
