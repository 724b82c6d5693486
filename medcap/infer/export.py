"""Export a trained checkpoint for others to use (``medcap export``).

``medcap export --adapter RUN/checkpoints/best --out DIR [--merge]`` writes one of two folders:

* merged (``--merge``): the adapter folded into the base weights (``merge_and_unload``), saved with
  ``save_pretrained`` as safetensors together with the processor, so plain transformers loads it::

      model = AutoModelForImageTextToText.from_pretrained(DIR)   # or the family's class,
      processor = AutoProcessor.from_pretrained(DIR)             # named in the model card

* base + adapter (default): the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
  and the processor; PEFT puts it on the base model::

      base = AutoModelForImageTextToText.from_pretrained("Salesforce/blip2-opt-2.7b")
      model = PeftModel.from_pretrained(base, DIR)

  When the base is not downloadable (the built-in tiny model, a random-init model) or training
  changed base weights outside the adapter (a fully trained Q-Former, a projection), that base is
  written to ``DIR/base`` and the adapter goes on it instead. ``adapter_config.json`` then names the
  absolute path of ``DIR/base``, so ``AutoPeftModel.from_pretrained(DIR)`` works from any working
  directory; medcap also finds ``base/`` beside the adapter when the folder was moved or copied.

With ``push_to_hub`` the export is uploaded to the Hub (``medcap.infer.hub_push``: the adapter's
own base goes to ``REPO-base``, which the pushed ``adapter_config.json`` names). The repository id,
the token and the hub are checked before the model loads.

Both carry ``README.md``, a Hugging Face model card (YAML metadata: base model, library, tags,
datasets, license, pipeline tag; then the training settings and the run's evaluation metrics), and
``medcap_config.yaml``, the run's resolved config, from which ``medcap serve`` takes the prompt and
decoding defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medcap.config.loader import ConfigError
from medcap.config.run import RunConfig, read_run_config
from medcap.infer.model_card import checkpoint_summary, log_summary, model_card, read_metrics
from medcap.layout import CheckpointLayout, run_of_checkpoint


class ExportError(ValueError):
    """The checkpoint or output folder is not usable; the message says what to do."""


def _read_run_config(checkpoint: Path) -> RunConfig:
    ckpt = CheckpointLayout(checkpoint)
    if not checkpoint.is_dir():
        raise ExportError(
            f"{checkpoint} does not exist: give a checkpoint folder such as RUN/checkpoints/best"
        )
    if not ckpt.config.is_file():
        raise ExportError(
            f"{checkpoint} is not a medcap checkpoint: no config.yaml (expected RUN/checkpoints/best "
            "with config.yaml and adapter/ or trainable.safetensors)"
        )
    try:
        run_cfg = read_run_config(checkpoint)
    except ConfigError as e:
        raise ExportError(f"{ckpt.config}: {e}") from None
    if not (ckpt.adapter.is_dir() or ckpt.trainable.is_file()):
        raise ExportError(
            f"{checkpoint}: neither adapter/ nor trainable.safetensors; nothing trained to export"
        )
    return run_cfg


def _load_unquantized(checkpoint: Path, run_cfg: RunConfig) -> tuple[Any, Any]:
    """The checkpoint's model with bitsandbytes quantization turned off.

    A QLoRA adapter was trained on 4-bit weights, but merging into 4-bit weights loses precision and a
    4-bit model does not save as a plain transformers model: exports use the base in its ``precision``.
    """
    from medcap.model.build import build_model
    from medcap.model.checkpoint import load_trainable
    from medcap.model.peft_methods import AdapterSetup

    model_cfg = run_cfg.model
    if model_cfg.quantization != "none":
        print(
            f"export: the checkpoint was trained with {model_cfg.quantization} quantization; "
            "loading the base unquantized for export"
        )
        # LoftQ belongs to the 4-bit base; the trained adapter is loaded, so no init runs anyway.
        peft = model_cfg.peft
        if peft.init == "loftq":
            peft = dataclasses.replace(peft, init="default")
        model_cfg = dataclasses.replace(model_cfg, quantization="none", peft=peft)
    model, processor = build_model(model_cfg, verbose=False, adapters=AdapterSetup(checkpoint=checkpoint))
    load_trainable(model, checkpoint)
    model.eval()
    return model, processor


def export(
    adapter_dir: str | Path,
    out: str | Path,
    merge: bool = False,
    *,
    dataset: str | None = None,
    license: str | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> Path:
    """Export the checkpoint ``adapter_dir`` to ``out`` (merged weights or base + adapter); see module doc.

    The folder is written under a temporary name and renamed at the end, so a failure never leaves
    half an export; it gets the permissions of any new folder (the umask), not the temporary
    folder's 0700. ``push_to_hub`` (``owner/name``) then uploads it (``private``: a private
    repository). Everything that can be checked without the model is checked first. Returns ``out``.
    """
    from peft import PeftModel

    from medcap.model.peft_state import saving

    checkpoint = Path(adapter_dir)
    out = Path(out)
    run_cfg = _read_run_config(checkpoint)
    occupied = (out.is_dir() and any(out.iterdir())) or (out.exists() and not out.is_dir())
    if occupied and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    if push_to_hub is not None:
        from medcap.infer.hub_push import PushError, check_push_target

        try:
            check_push_target(push_to_hub)
        except PushError as e:
            raise ExportError(str(e)) from None
    model, processor = _load_unquantized(checkpoint, run_cfg)
    family = model.medcap_family
    is_peft = isinstance(model, PeftModel)
    trained_outside_adapter = CheckpointLayout(checkpoint).trainable.is_file()
    base_name = run_cfg.model.name_or_path
    private_base = base_name in family.tiny_names or run_cfg.model.random_init
    if not merge and not is_peft:
        print(
            "export: this checkpoint has no PEFT adapter (peft.method none): writing the full model, as --merge"
        )
        merge = True

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    base_dir_written = False
    rewrote_base = CheckpointLayout(checkpoint).adapter_init.is_dir()
    for note in export_notes(run_cfg, merge, rewrote_base and not (private_base or trained_outside_adapter)):
        print(f"export: {note}")
    try:
        if merge:
            merged = model.merge_and_unload() if is_peft else model
            merged.save_pretrained(str(staging))
            processor.save_pretrained(str(staging))
        elif rewrote_base and not (private_base or trained_outside_adapter):
            # The adapter must load on the original base: peft converts it against the initial adapter.
            with saving(model):
                model.save_pretrained(
                    str(staging),
                    path_initial_model_for_weight_conversion=str(CheckpointLayout(checkpoint).adapter_init),
                )
            processor.save_pretrained(str(staging))
            _set_adapter_base(staging, base_name)
        else:
            with saving(model):
                model.save_pretrained(str(staging))
            processor.save_pretrained(str(staging))
            if private_base or trained_outside_adapter:
                # The adapter alone would be useless: its base cannot be downloaded, or training
                # changed base weights (Q-Former, projection) that the adapter does not hold.
                base_model = model.unload()
                base_model.save_pretrained(str(staging / "base"))
                processor.save_pretrained(str(staging / "base"))
                base_dir_written = True
                # Absolute: resolves from any working directory (PEFT resolves it against the cwd).
                _set_adapter_base(staging, str(out.resolve() / "base"))
            else:
                _set_adapter_base(staging, base_name)
        shutil.copyfile(CheckpointLayout(checkpoint).config, staging / "medcap_config.yaml")
        run_dir = run_of_checkpoint(checkpoint.resolve())
        card_inputs = {
            "merged": merge,
            "base_dir_written": base_dir_written,
            "metrics": read_metrics(run_dir),
            "log_summary": {**log_summary(run_dir), **checkpoint_summary(checkpoint)},
            "dataset": dataset,
            "license": license,
            "name": out.name,
            **_processor_text(family, processor, run_cfg.model.prompt),
        }
        model_card(run_cfg, family, **card_inputs).save(staging / "README.md")
        _normal_permissions(staging)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if push_to_hub is not None:
        from medcap.infer.hub_push import base_repo_of, push_export

        hub_card = model_card(
            run_cfg,
            family,
            **card_inputs,
            hub_repo=push_to_hub,
            hub_base_repo=base_repo_of(push_to_hub) if base_dir_written else None,
        )
        print(f"export: pushing {out} to the hub as {push_to_hub}{' (private)' if private else ''}")
        pushed = push_export(out, push_to_hub, private=private, hub_card=str(hub_card))
        print(
            f"export: pushed to {pushed['url']}"
            + (f" (base: {pushed['base_repo']})" if "base_repo" in pushed else "")
        )
    return out


def export_notes(run_cfg: RunConfig, merge: bool, converted: bool) -> list[str]:
    """What a user of the export should know about its PEFT method (printed; empty for plain LoRA)."""
    peft = run_cfg.model.peft
    notes: list[str] = []
    if peft.method == "none":
        return notes
    if merge:
        if (
            peft.method == "adalora"
            or peft.init != "default"
            or peft.train_norms
            or peft.method
            in (
                "vera",
                "oft",
                "boft",
            )
        ):
            what = peft.method if peft.init == "default" else f"{peft.method} (init {peft.init})"
            notes.append(f"{what} merges into the base weights (peft's merge_and_unload); no adapter remains")
        return notes
    if converted:
        notes.append(
            f"init {peft.init} rewrote the adapted base weights during training; the adapter is converted "
            f"to a plain LoRA of rank {2 * peft.r} against the original base (peft's conversion), so it "
            "loads on the base named in adapter_config.json"
        )
    elif peft.init in ("pissa", "olora", "corda"):
        notes.append(
            f"init {peft.init} rewrote the adapted base weights: base/ holds that residual base, and the "
            "adapter loads on it (not on the original weights)"
        )
    if peft.method == "adalora":
        notes.append(
            f"AdaLoRA is saved at its initial rank {peft.r} with the pruned ranks zero (the outputs are "
            "those of the pruned adapter); --merge folds it into the weights"
        )
    if peft.train_norms:
        notes.append("the trained norm layers travel in the adapter (peft's modules_to_save)")
    return notes


def _processor_text(family: Any, processor: Any, prompt: str) -> dict[str, Any]:
    """For families that lay the prompt out around an image placeholder (a chat template), the exact
    text their processor takes, so the card's loading snippet reproduces what medcap generates from."""
    layout = getattr(family, "layout", None)
    if layout is None:  # BLIP-2: the processor takes the bare prompt
        return {}
    made = layout(processor, prompt)
    return {"processor_text": made.text, "nested_images": made.nested_images}


def _normal_permissions(folder: Path) -> None:
    """Give ``folder`` (made by ``tempfile.mkdtemp``, 0700) the mode a new folder gets under the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


def _set_adapter_base(folder: Path, base: str) -> None:
    """Point adapter_config.json's base_model_name_or_path at the base a user must load."""
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = base
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["ExportError", "export"]
