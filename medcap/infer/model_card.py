"""The README.md of an export: a Hugging Face model card built with huggingface_hub's ``ModelCard``,
``ModelCardData`` and ``EvalResult`` (metadata: base model, library, tags, datasets, license, pipeline
tag, model-index with the evaluated metrics only), how to load the model, the training settings and
the run's evaluation metrics with their bootstrap 95% intervals."""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class CardPlace:
    """Where the card's model lives, for its loading instructions."""

    model: str = "PATH_TO_THIS_FOLDER"
    """The folder (or hub repository) of this export."""
    base: str | None = None
    """The base a user loads the adapter on: a hub id, the export's ``base/`` folder, or the hub
    repository it was pushed to; None for a merged export."""


def _card_data(
    run_cfg: RunConfig,
    family: ModelFamily,
    *,
    merged: bool,
    dataset: str | None,
    detected: str,
    license: str,
    name: str,
    hub_base: str | None,
    rows_by_split: dict[str, list[MetricRow]],
) -> Any:
    """The card's metadata as huggingface_hub's ``ModelCardData``, its metrics as ``EvalResult``s."""
    from huggingface_hub import EvalResult, ModelCardData

    method = run_cfg.model.peft.method
    tags = ["medcap", family.name, "image-captioning", "radiology", "medical"]
    if method != "none":
        tags.append(method)
    if not merged and method != "none":
        tags.append(f"base_model:adapter:{hub_base}" if hub_base else "adapter")
    results = [
        EvalResult(
            task_type="image-to-text",
            task_name="Radiology image captioning",
            dataset_type=dataset or detected,
            dataset_name=dataset or detected,
            dataset_split=split,
            metric_type=row.name,
            metric_name=row.name,
            metric_value=round(row.value, 6),
        )
        for split, rows in rows_by_split.items()
        for row in rows
    ]
    return ModelCardData(
        base_model=hub_base,
        library_name="transformers" if merged else "peft",
        pipeline_tag="image-to-text",
        license=license,
        tags=tags,
        datasets=[dataset] if dataset else None,
        model_name=name,
        eval_results=results or None,
    )


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
    hub_repo: str | None = None,
    hub_base_repo: str | None = None,
    processor_text: str | None = None,
    nested_images: bool = False,
) -> Any:
    """The README.md of an export as a ``huggingface_hub.ModelCard``: metadata (``ModelCardData``,
    metrics as ``EvalResult``s), how to load it, the settings and the metrics with their intervals.

    ``hub_repo``: the card of the copy pushed there (loading instructions name the repository);
    ``hub_base_repo``: where the export's ``base/`` was pushed, when it has one. ``processor_text``:
    the exact text the processor takes with each image (the image placeholder and the prompt through
    the family's chat template), for families whose processor does not take the bare prompt;
    ``nested_images``: that processor takes one list of images per text."""
    from huggingface_hub import ModelCard

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
    rows_by_split = {split: metric_rows(m) for split, m in metrics.items()}
    rows_by_split = {split: rows for split, rows in rows_by_split.items() if rows}
    if base_dir_written:
        hub_base = hub_base_repo  # the export's own base, where it was pushed
    else:
        hub_base = base if is_public_base else None
    place = CardPlace(
        model=hub_repo or "PATH_TO_THIS_FOLDER",
        base=None if merged else (hub_base_repo or "PATH_TO_THIS_FOLDER/base") if base_dir_written else base,
    )
    data = _card_data(
        run_cfg,
        family,
        merged=merged,
        dataset=dataset,
        detected=detected,
        license=license,
        name=name,
        hub_base=hub_base,
        rows_by_split=rows_by_split,
    )

    lines = [f"# {name}", ""]
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
            f'model = {model_class}.from_pretrained("{place.model}")',
            f'processor = {processor_class}.from_pretrained("{place.model}")',
        ]
    else:
        lines += [
            "from peft import PeftModel",
            f"from transformers import {model_class}, {processor_class}",
            "",
            f'base = {model_class}.from_pretrained("{place.base}")',
            f'model = PeftModel.from_pretrained(base, "{place.model}")',
            f'processor = {processor_class}.from_pretrained("{place.model}")',
        ]
    lines += [
        "",
        "from PIL import Image",
        'image = Image.open("image.jpg").convert("RGB")',
        (
            f"inputs = processor(images=image, text={prompt!r}, return_tensors='pt')"
            if processor_text is None
            else f"inputs = processor(images={'[[image]]' if nested_images else '[image]'}, "
            f"text=[{processor_text!r}], add_special_tokens=False, return_tensors='pt')"
        ),
        "out = model.generate(**inputs, max_new_tokens=40)",
    ]
    if family.decoder_only:
        lines += [
            "out = out[:, inputs['input_ids'].shape[1]:]  # a decoder-only model repeats the prompt: drop it"
        ]
    lines += ["print(processor.batch_decode(out, skip_special_tokens=True)[0].strip())", "```", ""]
    if not merged:
        where = (
            "the Hub"
            if hub_repo
            else "this folder's own `base/` (its absolute path)"
            if base_dir_written
            else "the Hub"
        )
        lines += [
            f"The adapter's `adapter_config.json` names its base ({where}), so PEFT's own loader also works "
            f'in one line: `from peft import AutoPeftModel; model = AutoPeftModel.from_pretrained("{place.model}")`.',
            "",
        ]
    folder = "DIR" if hub_repo else "PATH_TO_THIS_FOLDER"
    serve = (
        f"medcap serve --model {folder}"
        if merged
        else f"medcap serve --adapter {folder}"  # the adapter names its base; medcap finds base/ beside it
    )
    lines += ["Or serve it with a web page, an HTTP API and an OpenAI-compatible API:", "", "```bash"]
    if hub_repo:
        lines.append(f"hf download {hub_repo} --local-dir DIR")
    lines += [serve, "```", ""]
    if base_dir_written:
        lines += [
            (
                f"The base weights this adapter was trained on are in `{hub_base_repo}`"
                if hub_base_repo
                else "`base/` holds the base weights this adapter was trained on"
            )
            + ": they are not downloadable from their source (a built-in or random-initialised model) or "
            "training changed them outside the adapter.",
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
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


__all__ = ["ROCOV2_HUB_ID", "ROCOV2_LICENSE", "CardPlace", "MetricRow", "metric_rows", "model_card"]
