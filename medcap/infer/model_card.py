"""The README.md of an export: a Hugging Face model card (YAML metadata: base model, library, tags,
datasets, license, pipeline tag, model-index), how to load the model, the training settings and the
run's evaluation metrics."""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import medcap
from medcap.config.loader import to_dict
from medcap.config.run import RunConfig
from medcap.layout import CheckpointLayout, PreparedLayout, RunLayout
from medcap.model.family import ModelFamily

#: Hugging Face dataset id of ROCOv2 (a parquet copy of the Zenodo release).
ROCOV2_HUB_ID = "eltorio/ROCOv2-radiology"

#: ROCOv2 is CC BY-NC-SA 4.0; weights fine-tuned on it inherit its non-commercial terms.
ROCOV2_LICENSE = "cc-by-nc-sa-4.0"


def read_metrics(run_dir: Path | None) -> dict[str, dict[str, Any]]:
    """``{split: metrics.json contents}`` for every RUN/eval/<split>/metrics.json."""
    if run_dir is None:
        return {}
    out = {}
    for split, ev in RunLayout(run_dir).evals().items():
        try:
            summary = json.loads(ev.metrics.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            print(f"export: warning: skipping unreadable {ev.metrics}: {e}", file=sys.stderr)
            continue
        if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
            print(
                f"export: warning: skipping {ev.metrics}: not written by 'medcap evaluate' (no 'metrics' "
                "table); evaluate the predictions again to put them in the model card",
                file=sys.stderr,
            )
            continue
        out[split] = summary
    return out


@dataclass(frozen=True)
class MetricRow:
    """One evaluated metric of a split, as ``medcap evaluate`` wrote it."""

    name: str
    value: float
    ci95: tuple[float, float] | None
    """The bootstrap 95% interval of the mean (None for corpus-level figures, which have none)."""


def metric_rows(summary: dict[str, Any]) -> list[MetricRow]:
    """The metrics of a ``metrics.json`` written by ``medcap evaluate`` (``medcap.eval.evaluate``).

    Only metrics: each entry of ``metrics`` (the mean of the per-caption scores and its ``ci95``)
    and each corpus-level figure of ``corpus`` (corpus BLEU, no interval). The bookkeeping around
    them (pair counts, bootstrap settings, file paths) is not a metric and is left out.
    """
    rows = []
    for name, entry in (summary.get("metrics") or {}).items():
        mean = entry.get("mean") if isinstance(entry, dict) else None
        if not isinstance(mean, int | float) or isinstance(mean, bool) or not math.isfinite(mean):
            continue
        ci = entry.get("ci95")
        ci95 = (float(ci[0]), float(ci[1])) if isinstance(ci, list | tuple) and len(ci) == 2 else None
        rows.append(MetricRow(name, float(mean), ci95))
    for name, value in (summary.get("corpus") or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            rows.append(MetricRow(name, float(value), None))
    return rows


def _evaluation_lines(split: str, summary: dict[str, Any], rows: list[MetricRow]) -> list[str]:
    """The card's section for one evaluated split: how it was scored, the metric table, the models
    behind the model-based metrics and what could not be computed."""
    boot = summary.get("bootstrap") or {}
    how = f"protocol `{summary.get('protocol', '?')}`, {summary.get('n', '?')} caption pairs"
    if summary.get("subset"):
        how += f" (a subset of the {summary.get('n_references', '?')} references)"
    if boot.get("samples"):
        how += f"; 95% intervals from {boot['samples']} bootstrap resamples of the captions"
    lines = [f"Split `{split}` (from `eval/{split}/metrics.json`): {how}.", ""]
    lines += ["| metric | value | 95% CI |", "|---|---|---|"]
    for row in rows:
        ci = f"{row.ci95[0]:.4f} to {row.ci95[1]:.4f}" if row.ci95 else "(corpus level)"
        lines.append(f"| {row.name} | {row.value:.4f} | {ci} |")
    lines.append("")
    names = {r.name for r in rows}
    roles = [
        f"{role} metric `{summary[role]}`" for role in ("primary", "secondary") if summary.get(role) in names
    ]
    if roles:
        lines += [f"The protocol's {' and '.join(roles)}.", ""]
    for metric, model in (summary.get("models") or {}).items():
        lines.append(f"- {metric} computed with {model}")
    for metric, reason in (summary.get("unavailable") or {}).items():
        lines.append(f"- {metric} not computed: {reason}")
    if summary.get("models") or summary.get("unavailable"):
        lines.append("")
    return lines


def _detect_dataset(run_cfg: RunConfig) -> str:
    """``rocov2``, ``phantom`` or ``unknown``, from the first training ID of the prepared manifest."""
    prep = PreparedLayout(run_cfg.data.prepared)
    manifest = prep.manifest(run_cfg.data.train_split)
    info = prep.summary
    root = None
    if info.is_file():
        try:
            root = json.loads(info.read_text(encoding="utf-8")).get("root")
        except (OSError, json.JSONDecodeError, AttributeError):
            root = None
    # Phantoms use ROCOv2-style IDs, but `medcap data phantoms` leaves phantoms.json in the root.
    if (root and (Path(root) / "phantoms.json").is_file()) or "phantom" in str(prep.root).lower():
        return "phantom"
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as f:
            first = next(csv.DictReader(f), None)
        if first and first.get("id", "").startswith(("ROCOv2_", "ImageCLEFmedical_Caption")):
            return "rocov2"
    return "unknown"


def log_summary(run_dir: Path | None) -> dict[str, Any]:
    """Steps, last training loss and best validation loss from RUN/log.csv."""
    if run_dir is None or not RunLayout(run_dir).log.is_file():
        return {}
    train_loss, best_val, steps = None, None, 0
    with RunLayout(run_dir).log.open(newline="", encoding="utf-8") as f:
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


def checkpoint_summary(checkpoint: Path) -> dict[str, Any]:
    """Numbers training stored with the checkpoint (``metrics.json``: step, best validation loss ...)."""
    path = CheckpointLayout(checkpoint).metrics
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
    run_cfg: RunConfig,
    family: ModelFamily,
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
    model_cfg = to_dict(run_cfg.model)
    base = run_cfg.model.name_or_path
    peft_cfg = model_cfg["peft"]
    method = run_cfg.model.peft.method
    detected = _detect_dataset(run_cfg)
    if dataset is None:
        dataset = ROCOV2_HUB_ID if detected == "rocov2" else None
    if license is None:
        license = ROCOV2_LICENSE if detected == "rocov2" else family.base_licenses.get(base, "apache-2.0")
    is_public_base = not (base in family.tiny_names or run_cfg.model.random_init) and not Path(base).is_dir()
    model_class, processor_class = family.export_classes

    meta: dict[str, Any] = {}
    if is_public_base:
        meta["base_model"] = base
    meta["library_name"] = "transformers" if merged else "peft"
    meta["pipeline_tag"] = "image-to-text"
    meta["license"] = license
    tags = ["medcap", family.name, "image-captioning", "radiology", "medical"]
    if method != "none":
        tags.append(method)
    if not merged and method != "none":
        tags.append(f"base_model:adapter:{base}" if is_public_base else "adapter")
    meta["tags"] = tags
    if dataset:
        meta["datasets"] = [dataset]
    rows_by_split = {split: metric_rows(m) for split, m in metrics.items()}
    if any(rows_by_split.values()):
        results = []
        for split, rows in rows_by_split.items():
            if not rows:
                continue
            results.append(
                {
                    "task": {"type": "image-to-text", "name": "Radiology image captioning"},
                    "dataset": {"name": dataset or detected, "type": dataset or detected, "split": split},
                    "metrics": [{"type": r.name, "name": r.name, "value": round(r.value, 6)} for r in rows],
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
    what = f"a {family.name} model ({base})" + how
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
    prompt = run_cfg.model.prompt
    if merged:
        lines += [
            f"from transformers import {model_class}, {processor_class}",
            "",
            f'model = {model_class}.from_pretrained("PATH_TO_THIS_FOLDER")',
            f'processor = {processor_class}.from_pretrained("PATH_TO_THIS_FOLDER")',
        ]
    else:
        base_ref = '"PATH_TO_THIS_FOLDER/base"' if base_dir_written else f'"{base}"'
        lines += [
            "from peft import PeftModel",
            f"from transformers import {model_class}, {processor_class}",
            "",
            f"base = {model_class}.from_pretrained({base_ref})",
            'model = PeftModel.from_pretrained(base, "PATH_TO_THIS_FOLDER")',
            f'processor = {processor_class}.from_pretrained("PATH_TO_THIS_FOLDER")',
        ]
    lines += [
        "",
        "from PIL import Image",
        'image = Image.open("image.jpg").convert("RGB")',
        f"inputs = processor(images=image, text={prompt!r}, return_tensors='pt')",
        "out = model.generate(**inputs, max_new_tokens=40)",
    ]
    if family.decoder_only:
        lines += [
            "out = out[:, inputs['input_ids'].shape[1]:]  # a decoder-only model repeats the prompt: drop it"
        ]
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
        for key, value in _yaml_scalar_rows(to_dict(getattr(run_cfg, section)), f"{section}."):
            lines.append(f"| {key} | {_cell(value)} |")
    for key, value in log_summary.items():
        lines.append(f"| {key} | {_cell(value)} |")
    lines.append("")

    lines += ["## Evaluation", ""]
    if any(rows_by_split.values()):
        for split, rows in rows_by_split.items():
            if rows:
                lines += _evaluation_lines(split, metrics[split], rows)
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


__all__ = ["ROCOV2_HUB_ID", "ROCOV2_LICENSE", "MetricRow", "metric_rows", "model_card"]
