"""The ``medcap`` command: maps each subcommand to a plain function in its stage module.

Each target is ``module:function`` taking the remaining arguments (``list[str]``) and returning an
exit code. Modules are imported only when their subcommand runs, so ``medcap --help`` and
``medcap data stats`` start without importing torch.
"""

from __future__ import annotations

import importlib
import sys

# (subcommand words) -> (target, one-line help). A plain table, read top to bottom.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("run",): (
        "medcap.pipeline:cli",
        "the main job: phantoms -> prepare -> train -> predict -> evaluate -> report",
    ),
    ("data", "phantoms"): ("medcap.phantoms:cli", "write the synthetic phantom dataset in the ROCOv2 layout"),
    ("data", "prepare"): ("medcap.data:cli_prepare", "check a ROCOv2-layout dataset and write manifests"),
    ("data", "stats"): ("medcap.data:cli_stats", "summarise prepared manifests, with plots"),
    ("data", "download"): ("medcap.download:cli", "download ROCOv2 from Zenodo (resumable, checksummed)"),
    ("train",): ("medcap.train:cli", "fine-tune a model (LoRA, QLoRA, ...) on prepared manifests"),
    ("caption",): ("medcap.generate:cli_caption", "caption image files or folders (JPEG, PNG, TIFF, DICOM)"),
    ("predict",): ("medcap.generate:cli_predict", "caption a prepared split and write a submission file"),
    ("check-submission",): ("medcap.submission:cli", "validate a submission file like the official checker"),
    ("evaluate",): ("medcap.evaluate:cli_evaluate", "score predictions with the ImageCLEFmedical protocol"),
    ("compare",): ("medcap.evaluate:cli_compare", "paired bootstrap comparison of two evaluated runs"),
    ("report",): ("medcap.report:cli", "write a self-contained HTML report for a run"),
    ("export",): ("medcap.export:cli", "export an adapter (merged or base + adapter) with a model card"),
    ("serve",): ("medcap.serve:cli", "serve captions over HTTP with a web page"),
    ("plan",): ("medcap.plan:cli", "will this config fit my GPU? memory and epoch-time planner"),
    ("features",): ("medcap.features:cli", "precompute frozen query embeddings for faster LoRA training"),
}


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
            func = getattr(importlib.import_module(module_name), func_name)
            return int(func(argv[n:]) or 0)
    print(f"medcap: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
