"""Export a trained checkpoint for others to use (``medcap export``).

``medcap export --adapter RUN/checkpoints/best --out DIR [--merge]`` writes one of two folders:

* merged (``--merge``): the adapter folded into the base weights (``merge_and_unload``), saved with
  ``save_pretrained`` as safetensors together with the processor, so plain transformers loads it::

      model = Blip2ForConditionalGeneration.from_pretrained(DIR)
      processor = Blip2Processor.from_pretrained(DIR)

* base + adapter (default): the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
  and the processor; PEFT puts it on the base model::

      base = Blip2ForConditionalGeneration.from_pretrained("Salesforce/blip2-opt-2.7b")
      model = PeftModel.from_pretrained(base, DIR)

  When the base is not downloadable (the built-in tiny model, a random-init model) or training
  changed base weights outside the adapter (a fully trained Q-Former, a projection), that base is
  written to ``DIR/base`` and the adapter goes on it instead.

Both carry ``README.md``, a Hugging Face model card (YAML metadata: base model, library, tags,
datasets, license, pipeline tag; then the training settings and the run's evaluation metrics), and
``medcap_config.yaml``, the run's resolved config, from which ``medcap serve`` takes the prompt and
decoding defaults.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

import medcap

#: Hugging Face dataset id of ROCOv2 (a parquet copy of the Zenodo release).
ROCOV2_HUB_ID = "eltorio/ROCOv2-radiology"
#: ROCOv2 is CC BY-NC-SA 4.0; weights fine-tuned on it inherit its non-commercial terms.
ROCOV2_LICENSE = "cc-by-nc-sa-4.0"
#: Licences of the base models (BLIP-2 is MIT; the tiny model is medcap's own, Apache-2.0).
BASE_LICENSES = {
    "Salesforce/blip2-opt-6.7b": "mit",
    "Salesforce/blip2-opt-2.7b": "mit",
    "Salesforce/blip2-flan-t5-xl": "mit",
}


class ExportError(ValueError):
    """The checkpoint or output folder is not usable; the message says what to do."""


def _read_run_config(checkpoint: Path) -> dict[str, Any]:
    cfg_path = checkpoint / "config.yaml"
    if not checkpoint.is_dir():
        raise ExportError(
            f"{checkpoint} does not exist: give a checkpoint folder such as RUN/checkpoints/best"
        )
    if not cfg_path.is_file():
        raise ExportError(
            f"{checkpoint} is not a medcap checkpoint: no config.yaml (expected RUN/checkpoints/best "
            "with config.yaml and adapter/ or trainable.safetensors)"
        )
    data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ExportError(f"{cfg_path}: no 'model' section; is this a medcap run config?")
    has_weights = (checkpoint / "adapter").is_dir() or (checkpoint / "trainable.safetensors").is_file()
    if not has_weights:
        raise ExportError(
            f"{checkpoint}: neither adapter/ nor trainable.safetensors; nothing trained to export"
        )
    return data


def _load_unquantized(checkpoint: Path, run_cfg: dict[str, Any]):
    """``load_checkpoint`` with bitsandbytes quantization turned off.

    A QLoRA adapter was trained on 4-bit weights, but merging into 4-bit weights loses precision and a
    4-bit model does not save as a plain transformers model: exports use the base in its ``precision``.
    The checkpoint's files are linked into a temporary folder with an edited config.yaml, so only the
    public ``load_checkpoint`` is used.
    """
    from medcap.model import load_checkpoint

    if run_cfg["model"].get("quantization", "none") in (None, "none"):
        return load_checkpoint(checkpoint)
    print(
        f"export: the checkpoint was trained with {run_cfg['model']['quantization']} quantization; "
        "loading the base unquantized for export"
    )
    with tempfile.TemporaryDirectory(prefix="medcap-export-") as tmp:
        tmp_dir = Path(tmp)
        for item in checkpoint.iterdir():
            if item.name != "config.yaml":
                (tmp_dir / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
        edited = json.loads(json.dumps(run_cfg))  # a deep copy of plain data
        edited["model"]["quantization"] = "none"
        (tmp_dir / "config.yaml").write_text(yaml.safe_dump(edited, sort_keys=False), encoding="utf-8")
        model, processor, _ = load_checkpoint(tmp_dir)
    return model, processor, run_cfg


def _run_dir(checkpoint: Path) -> Path | None:
    """RUN for RUN/checkpoints/<name>, else None."""
    checkpoint = checkpoint.resolve()
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return None


def _read_metrics(run_dir: Path | None) -> dict[str, dict[str, Any]]:
    """``{split: metrics.json contents}`` for every RUN/eval/<split>/metrics.json."""
    if run_dir is None or not (run_dir / "eval").is_dir():
        return {}
    out = {}
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        try:
            out[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            print(f"export: warning: skipping unreadable {path}: {e}", file=sys.stderr)
    return out


def _metric_rows(
    metrics: dict[str, Any], prefix: str = ""
) -> list[tuple[str, float, float | None, float | None]]:
    """Flatten a metrics.json into ``(name, value, ci_low, ci_high)`` rows.

    Numbers become rows; a mapping with ``mean`` (or ``value``/``score``) is one row, with its confidence
    interval when it holds ``ci_low``/``ci_high`` (or ``ci: [low, high]``); other mappings are walked.
    """
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            if math.isfinite(value):
                rows.append((name, float(value), None, None))
        elif isinstance(value, dict):
            central = next(
                (value[k] for k in ("mean", "value", "score") if isinstance(value.get(k), int | float)), None
            )
            if central is not None:
                low, high = value.get("ci_low"), value.get("ci_high")
                if isinstance(value.get("ci"), list | tuple) and len(value["ci"]) == 2:
                    low, high = value["ci"]
                rows.append((name, float(central), low, high))
            else:
                rows.extend(_metric_rows(value, prefix=f"{name}."))
    return rows


def _detect_dataset(run_cfg: dict[str, Any]) -> str:
    """``rocov2``, ``phantom`` or ``unknown``, from the first training ID of the prepared manifest."""
    prepared = (run_cfg.get("data") or {}).get("prepared")
    if not prepared:
        return "unknown"
    prep = Path(prepared)
    split = (run_cfg.get("data") or {}).get("train_split", "train")
    manifest = prep / split / "manifest.csv"
    info = prep / "prepare.json"
    root = None
    if info.is_file():
        try:
            root = json.loads(info.read_text(encoding="utf-8")).get("root")
        except (OSError, json.JSONDecodeError, AttributeError):
            root = None
    # Phantoms use ROCOv2-style IDs, but `medcap data phantoms` leaves phantoms.json in the root.
    if (root and (Path(root) / "phantoms.json").is_file()) or "phantom" in str(prep).lower():
        return "phantom"
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as f:
            first = next(csv.DictReader(f), None)
        if first and first.get("id", "").startswith(("ROCOv2_", "ImageCLEFmedical_Caption")):
            return "rocov2"
    return "unknown"


def _log_summary(run_dir: Path | None) -> dict[str, Any]:
    """Steps, last training loss and best validation loss from RUN/log.csv."""
    if run_dir is None or not (run_dir / "log.csv").is_file():
        return {}
    train_loss, best_val, steps = None, None, 0
    with (run_dir / "log.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or 0))
                loss = float(row["loss"]) if row.get("loss") not in (None, "") else None
            except (ValueError, KeyError):
                continue
            steps = max(steps, step)
            split = (row.get("split") or "").lower()
            if loss is None:
                continue
            if split.startswith("train"):
                train_loss = loss
            elif split.startswith(("val", "eval")) and (best_val is None or loss < best_val):
                best_val = loss
    out: dict[str, Any] = {"steps": steps}
    if train_loss is not None:
        out["last training loss"] = round(train_loss, 4)
    if best_val is not None:
        out["best validation loss"] = round(best_val, 4)
    return out


def _checkpoint_summary(checkpoint: Path) -> dict[str, Any]:
    """Numbers training stored with the checkpoint (``metrics.json``: step, best validation loss ...)."""
    path = checkpoint / "metrics.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for key, value in data.items() if isinstance(data, dict) else []:
        if isinstance(value, bool | int | float | str):
            out[f"checkpoint {key}"] = round(value, 4) if isinstance(value, float) else value
    return out


def _yaml_scalar_rows(section: dict[str, Any] | None, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in (section or {}).items():
        if isinstance(value, dict):
            rows.extend(_yaml_scalar_rows(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def model_card(
    run_cfg: dict[str, Any],
    *,
    merged: bool,
    base_dir_written: bool,
    metrics: dict[str, dict[str, Any]],
    log_summary: dict[str, Any],
    dataset: str | None = None,
    license: str | None = None,
    name: str = "medcap-model",
) -> str:
    """The README.md of an export: Hugging Face YAML metadata, how to load it, settings and metrics."""
    model_cfg = run_cfg["model"]
    base = str(model_cfg.get("name_or_path", "unknown"))
    peft_cfg = model_cfg.get("peft") or {}
    method = peft_cfg.get("method", "none")
    detected = _detect_dataset(run_cfg)
    if dataset is None:
        dataset = ROCOV2_HUB_ID if detected == "rocov2" else None
    if license is None:
        license = ROCOV2_LICENSE if detected == "rocov2" else BASE_LICENSES.get(base, "apache-2.0")
    is_public_base = (
        not (base in ("tiny", "tiny-t5") or model_cfg.get("random_init")) and not Path(base).is_dir()
    )

    meta: dict[str, Any] = {}
    if is_public_base:
        meta["base_model"] = base
    meta["library_name"] = "transformers" if merged else "peft"
    meta["pipeline_tag"] = "image-to-text"
    meta["license"] = license
    tags = ["medcap", "blip-2", "image-captioning", "radiology", "medical"]
    if method != "none":
        tags.append(method)
    if not merged and method != "none":
        tags.append(f"base_model:adapter:{base}" if is_public_base else "adapter")
    meta["tags"] = tags
    if dataset:
        meta["datasets"] = [dataset]
    rows_by_split = {split: _metric_rows(m) for split, m in metrics.items()}
    if any(rows_by_split.values()):
        results = []
        for split, rows in rows_by_split.items():
            if not rows:
                continue
            results.append(
                {
                    "task": {"type": "image-to-text", "name": "Radiology image captioning"},
                    "dataset": {"name": dataset or detected, "type": dataset or detected, "split": split},
                    "metrics": [{"type": n, "name": n, "value": round(v, 6)} for n, v, _, _ in rows],
                }
            )
        meta["model-index"] = [{"name": name, "results": results}]

    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {name}", ""]
    label = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA", "ia3": "(IA)3"}.get(method, method)
    trained = [
        part
        for part, flag in (
            ("the Q-Former", "train_qformer"),
            ("the vision tower", "train_vision"),
            ("the language projection", "train_language_projection"),
        )
        if model_cfg.get(flag)
    ]
    if model_cfg.get("full_finetune"):
        how = " fully fine-tuned"
    else:
        how = f" fine-tuned with {label}" if method != "none" else " fine-tuned"
        if trained:
            how += (" and" if method != "none" else ":") + " " + ", ".join(trained) + " trained"
    what = f"a BLIP-2 model ({base})" + how
    lines += [f"Radiology image captioning: {what}, exported by medcap {medcap.__version__}."]
    if detected == "phantom":
        lines += [
            "",
            "**Trained on medcap's synthetic phantom images, not on real radiology data.** "
            "This model demonstrates the pipeline; its captions say nothing about real images.",
        ]
    elif detected == "rocov2":
        lines += [
            "",
            "Trained on ROCOv2 (Rückert et al., Scientific Data 11, 688, 2024; "
            "doi 10.5281/zenodo.10821435), licensed CC BY-NC-SA 4.0: non-commercial use only.",
        ]
    lines += [
        "",
        "Not a medical device. Captions can be wrong or incomplete and must not be used for diagnosis.",
        "",
        "## How to load",
        "",
        "```python",
    ]
    prompt = model_cfg.get("prompt", "") or ""
    if merged:
        lines += [
            "from transformers import Blip2ForConditionalGeneration, Blip2Processor",
            "",
            'model = Blip2ForConditionalGeneration.from_pretrained("PATH_TO_THIS_FOLDER")',
            'processor = Blip2Processor.from_pretrained("PATH_TO_THIS_FOLDER")',
        ]
    else:
        base_ref = '"PATH_TO_THIS_FOLDER/base"' if base_dir_written else f'"{base}"'
        lines += [
            "from peft import PeftModel",
            "from transformers import Blip2ForConditionalGeneration, Blip2Processor",
            "",
            f"base = Blip2ForConditionalGeneration.from_pretrained({base_ref})",
            'model = PeftModel.from_pretrained(base, "PATH_TO_THIS_FOLDER")',
            'processor = Blip2Processor.from_pretrained("PATH_TO_THIS_FOLDER")',
        ]
    lines += [
        "",
        "from PIL import Image",
        'image = Image.open("image.jpg").convert("RGB")',
        f"inputs = processor(images=image, text={prompt!r}, return_tensors='pt')",
        "out = model.generate(**inputs, max_new_tokens=40)",
    ]
    if "t5" not in base.lower():
        lines += ["out = out[:, inputs['input_ids'].shape[1]:]  # OPT repeats the prompt: drop it"]
    lines += [
        "print(processor.batch_decode(out, skip_special_tokens=True)[0].strip())",
        "```",
        "",
        "Or serve it with a web page and an HTTP API:",
        "",
        "```bash",
        "medcap serve --model PATH_TO_THIS_FOLDER"
        if merged
        else (
            "medcap serve --model PATH_TO_THIS_FOLDER/base --adapter PATH_TO_THIS_FOLDER"
            if base_dir_written
            else f"medcap serve --model {base} --adapter PATH_TO_THIS_FOLDER"
        ),
        "```",
        "",
    ]
    if base_dir_written:
        lines += [
            "`base/` holds the base weights this adapter was trained on: they are not downloadable "
            "(a built-in or random-initialised model) or training changed them outside the adapter.",
            "",
        ]

    lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
    keep_model = [
        "name_or_path",
        "precision",
        "quantization",
        "prompt",
        "image_size",
        "train_qformer",
        "train_vision",
        "train_language_projection",
        "full_finetune",
    ]
    for key in keep_model:
        if key in model_cfg:
            lines.append(f"| model.{key} | {_cell(model_cfg[key])} |")
    for key, value in _yaml_scalar_rows(peft_cfg, "model.peft."):
        lines.append(f"| {key} | {_cell(value)} |")
    for section in ("train", "generate"):
        for key, value in _yaml_scalar_rows(run_cfg.get(section), f"{section}."):
            lines.append(f"| {key} | {_cell(value)} |")
    for key, value in log_summary.items():
        lines.append(f"| {key} | {_cell(value)} |")
    lines.append("")

    lines += ["## Evaluation", ""]
    if any(rows_by_split.values()):
        for split, rows in rows_by_split.items():
            if not rows:
                continue
            lines += [
                f"Split `{split}` (from `eval/{split}/metrics.json`):",
                "",
                "| metric | value | 95% CI |",
                "|---|---|---|",
            ]
            for n, v, lo, hi in rows:
                ci = (
                    f"{lo:.4f} to {hi:.4f}"
                    if isinstance(lo, int | float) and isinstance(hi, int | float)
                    else ""
                )
                lines.append(f"| {n} | {v:.4f} | {ci} |")
            lines.append("")
    else:
        lines += ["No evaluation was found next to this checkpoint (RUN/eval/<split>/metrics.json).", ""]

    lines += [
        "## Full configuration",
        "",
        "The run's resolved configuration is in `medcap_config.yaml`.",
        "",
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def export(
    adapter_dir: str | Path,
    out: str | Path,
    merge: bool = False,
    *,
    dataset: str | None = None,
    license: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export the checkpoint ``adapter_dir`` to ``out`` (merged weights or base + adapter); see module doc.

    The folder is written under a temporary name and renamed at the end, so a failure never leaves
    half an export. Returns ``out``.
    """
    from peft import PeftModel

    checkpoint = Path(adapter_dir)
    out = Path(out)
    run_cfg = _read_run_config(checkpoint)
    occupied = (out.is_dir() and any(out.iterdir())) or (out.exists() and not out.is_dir())
    if occupied and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    model, processor, run_cfg = _load_unquantized(checkpoint, run_cfg)
    is_peft = isinstance(model, PeftModel)
    trained_outside_adapter = (checkpoint / "trainable.safetensors").is_file()
    base_name = str(run_cfg["model"].get("name_or_path"))
    private_base = base_name in ("tiny", "tiny-t5") or bool(run_cfg["model"].get("random_init"))
    if not merge and not is_peft:
        print(
            "export: this checkpoint has no PEFT adapter (peft.method none): writing the full model, as --merge"
        )
        merge = True

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    base_dir_written = False
    try:
        if merge:
            merged = model.merge_and_unload() if is_peft else model
            merged.save_pretrained(str(staging))
            processor.save_pretrained(str(staging))
        else:
            model.save_pretrained(str(staging))
            processor.save_pretrained(str(staging))
            if private_base or trained_outside_adapter:
                # The adapter alone would be useless: its base cannot be downloaded, or training
                # changed base weights (Q-Former, projection) that the adapter does not hold.
                base_model = model.unload()
                base_model.save_pretrained(str(staging / "base"))
                processor.save_pretrained(str(staging / "base"))
                base_dir_written = True
                _set_adapter_base(staging, "base")
            else:
                _set_adapter_base(staging, base_name)
        shutil.copyfile(checkpoint / "config.yaml", staging / "medcap_config.yaml")
        run_dir = _run_dir(checkpoint)
        card = model_card(
            run_cfg,
            merged=merge,
            base_dir_written=base_dir_written,
            metrics=_read_metrics(run_dir),
            log_summary={**_log_summary(run_dir), **_checkpoint_summary(checkpoint)},
            dataset=dataset,
            license=license,
            name=out.name,
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _set_adapter_base(folder: Path, base: str) -> None:
    """Point adapter_config.json's base_model_name_or_path at the base a user must load."""
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = base
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
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
    return p


def cli(argv: list[str]) -> int:
    """``medcap export``."""
    args = build_parser().parse_args(argv)
    try:
        out = export(
            args.adapter,
            args.out,
            args.merge,
            dataset=args.dataset,
            license=args.license,
            overwrite=args.overwrite,
        )
    except (ExportError, FileNotFoundError) as e:
        print(f"medcap export: {e}", file=sys.stderr)
        return 2
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    kind = "base + adapter" if (out / "adapter_config.json").is_file() else "full model, plain transformers"
    print(f"exported to {out} ({kind}): {', '.join(files)}")
    return 0
