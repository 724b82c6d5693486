"""``medcap caption|predict|export``: thin wrappers over ``medcap.infer``."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from medcap.config.generate import GenerateConfig
from medcap.config.loader import ConfigError
from medcap.infer.export import ExportError, export
from medcap.infer.generate import Captioner, load_captioner


def _add_model_args(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="base model: hub id, local folder (e.g. a merged export) or 'tiny'")
    g.add_argument("--checkpoint", type=Path, help=checkpoint_help)
    g.add_argument("--adapter", type=Path, help="PEFT adapter folder to put on --model")
    g.add_argument(
        "--prompt", default=None, help="text the captions follow (default: the checkpoint's, else none)"
    )
    g.add_argument(
        "--concepts",
        type=Path,
        help="concept model ('medcap concepts train' run) for a checkpoint trained with data.prompt_with: "
        "each image's predicted modality or concepts go into its prompt",
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None, help="weights of --model")


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (defaults: the checkpoint's generate settings, else greedy)")
    g.add_argument("--num-beams", type=int, help="beam search width (1 = greedy)")
    g.add_argument(
        "--do-sample", action=argparse.BooleanOptionalAction, default=None, help="nucleus sampling"
    )
    g.add_argument("--top-p", type=float, help="sampling: nucleus probability mass (0-1]")
    g.add_argument("--top-k", type=int, help="sampling: keep the k most likely tokens (0 = off)")
    g.add_argument("--temperature", type=float, help="sampling: temperature (> 0)")
    g.add_argument("--seed", type=int, help="sampling: random seed")
    g.add_argument("--min-new-tokens", type=int, help="fewest tokens per caption")
    g.add_argument("--max-new-tokens", type=int, help="most tokens per caption")
    g.add_argument("--repetition-penalty", type=float, help="penalty for repeated tokens (1 = off)")
    g.add_argument("--no-repeat-ngram-size", type=int, help="forbid repeating n-grams of this size (0 = off)")
    g.add_argument("--length-penalty", type=float, help="beam search length normalisation exponent")
    g.add_argument("--batch-size", type=int, help="images per generate() call")


_DECODING_FIELDS = (
    "num_beams",
    "do_sample",
    "top_p",
    "top_k",
    "temperature",
    "seed",
    "min_new_tokens",
    "max_new_tokens",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
    "batch_size",
)


def _decoding_from_args(base: GenerateConfig, args: argparse.Namespace) -> GenerateConfig:
    chosen = {k: getattr(args, k) for k in _DECODING_FIELDS if getattr(args, k, None) is not None}
    merged = {**asdict(base), **chosen}
    return GenerateConfig(**merged)  # validated here: a bad option stops before the model loads


def _check_model_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.checkpoint is not None and (args.model is not None or args.adapter is not None):
        p.error("give --checkpoint, or --model with an optional --adapter, not both")
    if args.checkpoint is None and args.model is None and args.adapter is None:
        p.error("give --model NAME_OR_PATH (e.g. a hub id, a folder, or 'tiny') or --checkpoint DIR")


def _load_or_exit(prog: str, args: argparse.Namespace) -> Captioner | None:
    t0 = time.perf_counter()
    try:
        cap = load_captioner(
            model=args.model,
            checkpoint=args.checkpoint,
            adapter=args.adapter,
            device=args.device,
            precision=args.precision,
            prompt=args.prompt,
            concepts=args.concepts,
        )
    except (FileNotFoundError, ValueError, OSError) as e:
        from medcap.model.hub import HubUnreachableError

        hint = ""
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError | HubUnreachableError):
            hint = " (no model hub can be reached offline: give a local folder, a checkpoint or 'tiny')"
        print(f"{prog}: cannot load the model: {e}{hint}", file=sys.stderr)
        return None
    source = cap.info.get("checkpoint") or cap.info.get("base")
    adapter = (
        f" + adapter {cap.info['adapter']}"
        if cap.info.get("adapter") and not cap.info.get("checkpoint")
        else ""
    )
    print(
        f"{prog}: model {source}{adapter} ({cap.family.name}) on {cap.info['device']}, "
        f"loaded in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return cap


def _load_with_decoding(prog: str, args: argparse.Namespace) -> tuple[Captioner, GenerateConfig] | None:
    """The model (or None after printing why) and the decoding options on top of its own settings."""
    cap = _load_or_exit(prog, args)
    if cap is None:
        return None
    try:
        return cap, _decoding_from_args(cap.gen, args)
    except ConfigError as e:
        print(f"{prog}: decoding options: {e}", file=sys.stderr)
        return None


def cmd_caption(argv: list[str]) -> int:
    """``medcap caption PATH... [--model M | --checkpoint DIR] [--adapter DIR] [--out CSV]``.

    Exit code 0 when every image was captioned, 1 when some were skipped (they are listed) or none
    were found, 2 for bad arguments or a model that cannot be loaded.
    """
    from tqdm import tqdm

    from medcap.data.images import DEFAULT_MAX_PIXELS
    from medcap.infer.caption import caption_files, collect_image_files, write_captions_csv

    p = argparse.ArgumentParser(
        prog="medcap caption",
        description="Caption image files or folders (JPEG, PNG, TIFF, DICOM; folders are searched "
        "recursively). Unreadable files are reported and skipped; the rest are captioned.",
        epilog="Captions go to stdout as FILE<TAB>CAPTION lines (and to --out as CSV); progress, skipped "
        "files and the summary go to stderr. Exit code: 0 all captioned, 1 some skipped or none found, "
        "2 bad arguments or a model that cannot be loaded.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="image files and/or folders")
    p.add_argument("--out", type=Path, help="also write a CSV (file,caption) here")
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image (width x height)"
    )
    _add_model_args(p, "training checkpoint or run folder (its best checkpoint)")
    _add_decoding_args(p)
    args = p.parse_args(argv)
    _check_model_args(p, args)
    try:
        _decoding_from_args(GenerateConfig(), args)  # bad options stop here, before the model loads
    except ConfigError as e:
        p.error(str(e))

    missing = [p for p in args.paths if not p.exists()]
    if missing:  # said before the model loads (minutes for a large one)
        for p in missing:
            print(f"medcap caption: {p} does not exist", file=sys.stderr)
        if len(missing) == len(args.paths):
            return 1
    candidates, ignored = collect_image_files([p for p in args.paths if p.exists()])
    for f in ignored[:20]:
        print(
            f"ignored {f}: not an image file (suffix {f.suffix or 'none'}, no DICOM marker)", file=sys.stderr
        )
    if len(ignored) > 20:
        print(f"... and {len(ignored) - 20} more non-image files ignored", file=sys.stderr)
    if not candidates:
        print("medcap caption: no image files found in " + ", ".join(map(str, args.paths)), file=sys.stderr)
        return 1

    loaded = _load_with_decoding("medcap caption", args)
    if loaded is None:
        return 2
    cap, gen = loaded
    print(f"medcap caption: decoding {gen.describe()}", file=sys.stderr)
    result = caption_files(
        cap,
        candidates,
        gen=gen,
        max_pixels=args.max_pixels,
        # tqdm.write keeps the progress bar (on stderr) intact around each line.
        on_caption=lambda f, text: tqdm.write(f"{f}\t{text}", file=sys.stdout),
        on_skip=lambda f, reason: tqdm.write(f"skipped {reason}", file=sys.stderr),
    )
    if args.out is not None:
        write_captions_csv(args.out, result.captions)
    rate = len(result.captions) / result.seconds if result.seconds > 0 else 0.0
    summary = (
        f"medcap caption: {len(candidates)} images in = {len(result.captions)} captioned + "
        f"{len(result.skipped)} skipped ({rate:.2f} images/s)"
    )
    if ignored:
        summary += f"; {len(ignored)} non-image files in folders ignored"
    if args.out is not None:
        summary += f"; captions written to {args.out}"
    print(summary, file=sys.stderr)
    return 1 if result.skipped or missing else 0


def cmd_predict(argv: list[str]) -> int:
    """``medcap predict --checkpoint RUN --split test [--prepared DIR] [--out FILE]``."""
    from medcap.config.data import DataConfig
    from medcap.config.run import read_run_config
    from medcap.infer.predict import PredictError, predict, prepared_of_run, process_device
    from medcap.layout import RunLayout, resolve_checkpoint

    p = argparse.ArgumentParser(
        prog="medcap predict",
        description="Caption a prepared split and write an ImageCLEFmedical submission file.",
        epilog="Writes RUN/predictions/SPLIT.csv (ID,Caption in manifest order), SPLIT.zip (submission.csv "
        "inside, what the challenge site takes) and SPLIT.meta.json, then checks the CSV. An image that "
        "cannot be read gets an empty caption and a warning, so the file still has every ID.",
    )
    p.add_argument("--split", default="test", help="split to caption (default test)")
    p.add_argument(
        "--prepared", type=Path, help="prepared data folder (default: the checkpoint's data.prepared)"
    )
    p.add_argument("--out", type=Path, help="submission CSV (default RUN/predictions/<split>.csv)")
    p.add_argument(
        "--limit", type=int, help="caption only the first N images (a quick look; not a submission)"
    )
    _add_model_args(p, "training checkpoint, or run folder (its best checkpoint)")
    _add_decoding_args(p)
    args = p.parse_args(argv)
    _check_model_args(p, args)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be at least 1, got {args.limit}")
    try:
        _decoding_from_args(GenerateConfig(), args)  # bad options stop here, before the model loads
    except ConfigError as e:
        p.error(str(e))
    if args.checkpoint is None and (args.prepared is None or args.out is None):
        p.error(
            "with --model, give --prepared DIR and --out FILE (a checkpoint knows its data and run folder)"
        )

    run_cfg, ckpt, run_dir = None, None, None
    if args.checkpoint is not None:
        try:
            ckpt, run_dir = resolve_checkpoint(args.checkpoint)
            run_cfg = read_run_config(ckpt)
        except (FileNotFoundError, ConfigError) as e:
            print(f"medcap predict: {e}", file=sys.stderr)
            return 2
    prepared = args.prepared or prepared_of_run(run_cfg, ckpt, args.split)
    manifest = DataConfig(prepared=prepared).manifest(args.split)
    if not manifest.is_file():
        where = "" if args.prepared else f" (data.prepared of {ckpt / 'config.yaml'}; pass --prepared DIR)"
        print(
            f"medcap predict: {manifest} does not exist: run 'medcap data prepare ROOT --out DIR' first{where}",
            file=sys.stderr,
        )
        return 2
    out = args.out or RunLayout(run_dir or ckpt).predictions(args.split)

    # Under `accelerate launch`, each process captions on its own device (GPU k, or the CPU).
    args.device = process_device(args.device)
    loaded = _load_with_decoding("medcap predict", args)
    if loaded is None:
        return 2
    cap, gen = loaded
    print(f"medcap predict: images of {manifest}; decoding {gen.describe()}", file=sys.stderr)
    try:
        result = predict(cap, manifest, out, gen=gen, limit=args.limit, split=args.split)
    except PredictError as e:
        print(f"medcap predict: {e}", file=sys.stderr)
        return 2
    if not result.main:  # the main process wrote, checks and reports the one submission
        return 0
    rate = round(result.images / result.seconds, 3) if result.seconds > 0 else None
    by = f" by {result.processes} processes" if result.processes > 1 else ""
    print(
        f"medcap predict: {result.images} images captioned{by} in {result.seconds:.1f} s ({rate} images/s); "
        f"submission {result.submission} and {result.zip}",
        file=sys.stderr,
    )
    if result.unreadable:
        print(
            f"medcap predict: WARNING {len(result.unreadable)} images could not be read and have empty captions: "
            + ", ".join(result.unreadable[:10]),
            file=sys.stderr,
        )
    if result.errors:  # a bug, not a user mistake: write_submission produced an invalid file
        print(
            "medcap predict: the written submission fails its check:\n  " + "\n  ".join(result.errors),
            file=sys.stderr,
        )
        return 1
    print(f"medcap predict: submission check OK ({result.images} IDs in reference order)", file=sys.stderr)
    return 0


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medcap export",
        description="Export a training checkpoint: merged weights for plain transformers, or base + PEFT adapter.",
    )
    p.add_argument("--adapter", required=True, help="checkpoint folder, e.g. runs/demo/run/checkpoints/best")
    p.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    p.add_argument(
        "--merge", action="store_true", help="fold the adapter into the weights (plain transformers)"
    )
    p.add_argument("--dataset", default=None, help="dataset id for the model card (default: detected)")
    p.add_argument(
        "--license", default=None, help="licence id for the model card (default: from data and base)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="also upload the export to the Hugging Face Hub as REPO (owner/name; needs a token: "
        "`hf auth login` or HF_TOKEN). An adapter with its own base/ pushes that base as REPO-base",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repository")
    return p


def cmd_export(argv: list[str]) -> int:
    """``medcap export --adapter CKPT --out DIR [--merge] [--push-to-hub REPO [--private]]``: exit code
    2 for a bad checkpoint, output folder or push target (all checked before the model loads), 1 when
    the upload fails after the export was written."""
    p = _export_parser()
    args = p.parse_args(argv)
    if args.private and not args.push_to_hub:
        p.error("--private is for --push-to-hub REPO")
    try:
        out = export(
            args.adapter,
            args.out,
            args.merge,
            dataset=args.dataset,
            license=args.license,
            overwrite=args.overwrite,
            push_to_hub=args.push_to_hub,
            private=args.private,
        )
    except (ExportError, FileNotFoundError) as e:
        print(f"medcap export: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the hub refused the upload (huggingface_hub's HTTP errors are OSErrors)
        from medcap.data.images import plain_message

        print(f"medcap export: the upload to the hub failed: {plain_message(e)}", file=sys.stderr)
        return 1
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    kind = "base + adapter" if (out / "adapter_config.json").is_file() else "full model, plain transformers"
    print(f"exported to {out} ({kind}): {', '.join(files)}")
    return 0
