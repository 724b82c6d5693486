"""``medcap train`` and ``medcap features``: thin wrappers over ``medcap.train``."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from medcap.config.help import settings_help
from medcap.config.loader import ConfigError, to_dict
from medcap.config.run import RunConfig, load_run_config
from medcap.train.errors import TrainingError


def cmd_train(argv: list[str]) -> int:
    """``medcap train --config CONFIG [--dry-run] [--resume RUN] [--section.key VALUE ...]``."""
    p = argparse.ArgumentParser(
        prog="medcap train",
        description="Fine-tune a captioning model on prepared manifests. Any setting below can be overridden "
        "with --section.key VALUE (e.g. --train.lr 1e-4 --model.peft.r 8); a mistyped one is answered "
        "with the closest settings.",
        epilog="settings (section.key, type, help, default):\n\n" + settings_help(RunConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--config",
        help="run config: a YAML file or the name of a shipped config ('medcap configs' lists them)",
    )
    p.add_argument(
        "--resume", type=Path, metavar="RUN", help="continue the run in RUN from its last checkpoint"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="a few steps with random weights of the same architecture on phantom or the first rows of data",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = p.parse_known_args(argv)
    try:
        from medcap.layout import config_file

        overrides = list(rest)
        path = args.config
        if args.resume is not None:
            saved = config_file(args.resume)
            if path is None:
                if not saved.is_file():
                    raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run directory?")
                path = saved
            overrides += ["--train.resume", "true", "--train.out_dir", str(args.resume)]
        cfg = load_run_config(path, overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.dry_run:
            from medcap.train.dry_run import dry_run

            try:
                result = dry_run(cfg)
            except Exception as e:  # a dry run exists to surface any failure, with its reason
                if not isinstance(e, ConfigError | TrainingError | FileNotFoundError):
                    traceback.print_exc()
                print(f"DRY RUN FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                return 1
            print(
                f"dry run: {result['step']} steps, {result['seconds_per_step']:.2f} s/step, "
                f"peak memory {result['peak_memory_gb']:.2f} GB, validation loss {result['last_valid_loss']:.4f}"
            )
            print("DRY RUN PASSED: the config builds, trains, validates, captions and checkpoints")
            return 0
        from medcap.train.recipe import fit

        fit(cfg)
        return 0
    except ConfigError as e:
        print(f"medcap train: config error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, FileNotFoundError) as e:
        print(f"medcap train: error: {e}", file=sys.stderr)
        return 1


def cmd_features(argv: list[str]) -> int:
    """``medcap features (--config CONFIG | --checkpoint DIR) --out DIR [--split train valid]``."""
    from medcap.data.manifest import read_manifest
    from medcap.train.query_cache import FeatureCacheError, cache_query_embeddings, check_cacheable

    p = argparse.ArgumentParser(
        prog="medcap features",
        description="Compute the frozen vision side's query embeddings (BLIP-2: Q-Former outputs) once per "
        "image and store them memory-mapped in fp16, so LoRA training on the language model can skip the "
        "vision tower: train with --train.query_cache DIR. Settings can be overridden with --section.key VALUE.",
        allow_abbrev=False,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--config", help="run config: a YAML file or a shipped config's name (model and data sections)"
    )
    src.add_argument("--checkpoint", type=Path, help="a checkpoint folder (config.yaml + weights)")
    p.add_argument("--out", type=Path, required=True, help="cache folder (index.json + {split}.f16)")
    p.add_argument(
        "--split", nargs="+", help="splits to cache (default: the config's train and valid splits)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made for other weights")
    args, rest = p.parse_known_args(argv)
    try:
        if args.checkpoint is not None:
            if rest:
                raise ConfigError(f"overrides {rest} cannot be combined with --checkpoint")
            from medcap.model.checkpoint import load_checkpoint

            model, processor, run_cfg = load_checkpoint(args.checkpoint)
        else:
            from medcap.model.build import build_model

            run_cfg = load_run_config(args.config, rest)
            check_cacheable(run_cfg.model, run_cfg.data, run_cfg.train)
            from medcap.model.peft_methods import AdapterSetup

            # Only the image side's output is cached: the language model's adapters need no init here.
            model, processor = build_model(run_cfg.model, adapters=AdapterSetup(compute_init=False))
        check_cacheable(
            run_cfg.model, run_cfg.data, run_cfg.train, getattr(model, "medcap_lora_modules", None)
        )
        splits = args.split or [run_cfg.data.train_split, run_cfg.data.valid_split]
        rows = {s: read_manifest(run_cfg.data.manifest(s)) for s in splits}
        index = cache_query_embeddings(
            model,
            processor,
            run_cfg.model,
            rows,
            args.out,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
        )
    except (FeatureCacheError, ConfigError, FileNotFoundError) as e:
        print(f"medcap features: {e}", file=sys.stderr)
        return 2
    total = sum(info["shape"][0] for info in index["splits"].values())
    size = sum((args.out / info["file"]).stat().st_size for info in index["splits"].values())
    counts = ", ".join(f"{s}: {i['shape'][0]}" for s, i in index["splits"].items())
    print(
        f"cached {total} images ({counts}), "
        f"{size / 1e6:.1f} MB in {args.out} (hash {index['hash']}); train with --train.query_cache {args.out}"
    )
    return 0


__all__ = ["cmd_features", "cmd_train"]
