"""A checkpoint's model files: what ``save_trainable`` writes and ``load_checkpoint`` rebuilds a model from."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch

from medcap.config.run import RunConfig, read_run_config
from medcap.layout import CheckpointLayout
from medcap.model.adapters import count_parameters, unwrap

#: Random-init models up to this many parameters store their base weights in a checkpoint
#: (base.safetensors); larger ones are rebuilt from ``init_seed`` and checked by a fingerprint.
BASE_WEIGHTS_LIMIT = 50_000_000


def _adapter_param_names(model) -> set[str]:
    """Names of the PEFT adapter's own parameters (what ``adapter/`` holds), by the tuner's prefix."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return set()
    prefix = model.base_model.prefix  # "lora_" (LoRA, DoRA's lora_magnitude_vector) or "ia3_"
    return {n for n, _ in model.named_parameters() if prefix in n}


def _fingerprint(model) -> str:
    """A cheap hash of a few base tensors (the family's choice), to check a rebuilt random-init base
    is the same."""
    h = hashlib.sha256()
    for tensor in model.medcap_family.fingerprint_tensors(unwrap(model)):
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_trainable(model, directory: str | Path) -> list[str]:
    """Write what ``load_checkpoint`` needs besides ``config.yaml`` (the caller writes that).

    * ``adapter/``: the PEFT adapter (``save_pretrained``), loadable by PEFT itself for export;
    * ``trainable.safetensors``: every other parameter with ``requires_grad`` (fully trained
      Q-Former, vision tower, projection; everything for a full fine-tune), by module name;
    * for random-init and tiny models (whose base weights are not on any hub): ``base.safetensors``
      with the base weights when small, else ``base_fingerprint.txt`` (rebuilt from ``init_seed``).

    Files are written to temporary names and renamed, so a crash never leaves half a file.
    Returns the names written.
    """
    from peft import PeftModel
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = getattr(model, "medcap_config", None)
    written: list[str] = []
    adapter_names = _adapter_param_names(model)
    if isinstance(model, PeftModel):
        tmp = directory / "adapter.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(str(tmp))
        final = directory / "adapter"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        written.append("adapter")
    rest = {
        _plain_name(n): p.detach().cpu().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad and n not in adapter_names
    }
    if rest:
        _atomic_save(save_file, rest, directory / "trainable.safetensors")
        written.append("trainable.safetensors")
    if cfg is not None and (cfg.random_init or cfg.name_or_path in model.medcap_family.tiny_names):
        inner = unwrap(model)
        _, total = count_parameters(inner)
        if total <= BASE_WEIGHTS_LIMIT and cfg.quantization == "none":
            # Frozen base weights only: trained ones are in trainable.safetensors already.
            base = {
                _plain_name(n): p.detach().cpu().contiguous()
                for n, p in model.named_parameters()
                if n not in adapter_names and not p.requires_grad
            }
            if base:
                _atomic_save(save_file, base, directory / "base.safetensors")
                written.append("base.safetensors")
        else:
            (directory / "base_fingerprint.txt").write_text(_fingerprint(model) + "\n", encoding="utf-8")
            written.append("base_fingerprint.txt")
    # A folder saved into again (checkpoints/last) must not keep files of another configuration.
    for stale in set(CheckpointLayout.MODEL_FILES) - set(written):
        path = directory / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return written


def _plain_name(name: str) -> str:
    """Parameter names without PEFT's wrapper prefix and base_layer hops, so they match either way."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _atomic_save(save_file, tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a damaged or cut-short file is a ``ValueError`` that names
    it (safetensors raises its own error type, which callers would let through as a traceback)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a complete safetensors file ({e}); it was probably cut short (a full disk or an "
            "interrupted copy): copy the checkpoint again, or use another one"
        ) from None


def _copy_into(model, path: Path) -> None:
    """Copy the tensors of a safetensors file into the parameters of the same (plain) names."""
    state = load_tensors(path)
    params = {_plain_name(n): p for n, p in model.named_parameters()}
    missing = [k for k in state if k not in params]
    if missing:
        raise ValueError(
            f"{path}: parameters this model does not have: {missing[:5]}; was the checkpoint written "
            "for another model config?"
        )
    with torch.no_grad():
        for k, v in state.items():
            if params[k].shape != v.shape:
                raise ValueError(
                    f"{path}: {k} has shape {tuple(v.shape)}, the model {tuple(params[k].shape)}"
                )
            params[k].copy_(v.to(params[k].dtype))


def load_trainable(model, directory: str | Path) -> None:
    """Load a checkpoint's model files into a model built from the same config (resume, inference).

    Order: random-init base weights (``base.safetensors``, or a ``base_fingerprint.txt`` check), the
    PEFT adapter (``adapter/``), then the other trained parameters (``trainable.safetensors``).
    """
    from peft import PeftModel, set_peft_model_state_dict

    directory = Path(directory)
    if (directory / "base.safetensors").is_file():
        _copy_into(model, directory / "base.safetensors")
    fingerprint = directory / "base_fingerprint.txt"
    if fingerprint.is_file():
        want = fingerprint.read_text(encoding="utf-8").strip()
        got = _fingerprint(model)
        if want != got:
            raise ValueError(
                f"{fingerprint}: the rebuilt random base differs from the trained one ({got} != {want}); "
                "the init code, init_seed or torch version changed, so this adapter was trained on other weights"
            )
    adapter = directory / "adapter"
    if adapter.is_dir():
        if not isinstance(model, PeftModel):
            raise ValueError(
                f"{adapter} holds a PEFT adapter but the model config builds none (peft.method none)"
            )
        weights = adapter / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{adapter}: no adapter_model.safetensors")
        result = set_peft_model_state_dict(model, load_tensors(weights))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{adapter}: weights that fit no module of this model: {unexpected[:5]}")
    elif isinstance(model, PeftModel):
        raise FileNotFoundError(
            f"{directory}: the config builds a PEFT adapter but there is no adapter/ folder"
        )
    if (directory / "trainable.safetensors").is_file():
        _copy_into(model, directory / "trainable.safetensors")


def load_checkpoint(directory: str | Path, verbose: bool = False) -> tuple[Any, Any, RunConfig]:
    """Rebuild a trained model from a checkpoint folder: ``(model, processor, run_config)``.

    Reads ``config.yaml`` (the resolved ``RunConfig``), builds the base model from its ``model``
    section, then ``load_trainable``. The model is in eval mode.
    """
    from medcap.model.build import build_model

    run_cfg = read_run_config(directory)
    model, processor = build_model(run_cfg.model, verbose=verbose)
    load_trainable(model, directory)
    model.eval()
    return model, processor, run_cfg


__all__ = ["BASE_WEIGHTS_LIMIT", "load_checkpoint", "load_trainable", "save_trainable"]
