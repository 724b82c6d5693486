"""What a PEFT method needs saved and restored besides its adapter weights, and what it needs from
the training loop.

* Inits that rewrite the base (pissa, olora, corda): the initial adapter (A0, B0) goes into every
  checkpoint as ``adapter_init/`` (peft's adapter format, ``init_lora_weights: true``); loading
  restores the residual base W - scale * B0 A0 from it instead of computing the init again (no SVD,
  no data), and an unmerged export hands it to peft's conversion to a plain LoRA.
* AdaLoRA: the orthogonality penalty (peft adds it only in ``AdaLoraModel.forward``, which a
  ``PeftModel`` without a task type never calls), ``update_and_allocate`` after every optimizer
  step, and the rank allocator's running statistics in the training state, so a resumed run
  allocates exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_model_of(model: Any) -> Any | None:
    """The PeftModel inside DDP (or the model itself), or None when there is no adapter."""
    from peft import PeftModel

    inner = getattr(model, "module", model)
    return inner if isinstance(inner, PeftModel) else None


def _adalora_model(model: Any) -> Any | None:
    from peft import AdaLoraModel

    peft_model = peft_model_of(model)
    if peft_model is None or not isinstance(peft_model.base_model, AdaLoraModel):
        return None
    return peft_model.base_model


# ------------------------------------------------------------------------------------------------
# saving and loading
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def saving(model: Any) -> Iterator[None]:
    """While an adapter is saved (checkpoint or export):

    * ``init_lora_weights`` is true: the saved weights are trained ones, and peft loading the folder
      itself must not compute PiSSA, CorDA or LoftQ again over them;
    * AdaLoRA's ``rank_pattern`` is cleared: peft would save the matrices cut to the pattern, but a
      resumed run needs them whole (the pruned ranks are zero, so the outputs are the same).
    """
    peft_model = peft_model_of(model)
    config = peft_model.peft_config.get("default") if peft_model is not None else None
    saved: dict[str, Any] = {}
    if config is not None:
        for name, value in (("init_lora_weights", True), ("rank_pattern", None)):
            if hasattr(config, name) and (name != "rank_pattern" or _adalora_model(model) is not None):
                saved[name] = getattr(config, name)
                setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def write_adapter_init(model: Any, directory: Path) -> bool:
    """Write ``directory`` (CKPT/adapter_init/) when the model's init rewrote the base; returns whether."""
    from safetensors.torch import save_file

    state = getattr(peft_model_of(model), "medcap_adapter_init", None)
    if not state:
        return False
    config = copy.deepcopy(peft_model_of(model).peft_config["default"])
    config.init_lora_weights = True  # what peft's conversion demands of an initial adapter
    config.corda_config = None
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS))
    return True


def read_adapter_init(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{directory}: no {ADAPTER_WEIGHTS} (the initial adapter of a pissa/olora/corda run)"
        )
    return load_file(str(weights))


@torch.no_grad()
def restore_base(model: Any, initial: dict[str, torch.Tensor]) -> int:
    """Turn the adapted layers' base weights W into the residual W - scale * B0 A0 that the init left
    (``initial`` holds A0, B0 as peft saves them). The expression is the one of peft's pissa_init,
    olora_init and corda_init (scale * B0 first, then @ A0, in fp32, cast back), so the residual is
    the same as the one training started from. Returns the number of layers restored."""
    from peft.tuners.lora import LoraLayer

    peft_model = peft_model_of(model)
    done = 0
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
            continue
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if a_key not in initial or b_key not in initial:
            raise ValueError(f"the initial adapter has no {a_key}: it was written for another model config")
        base = layer.get_base_layer()
        weight = base.weight
        a0 = initial[a_key].to(weight.device, torch.float32)
        b0 = initial[b_key].to(weight.device, torch.float32)
        residual = weight.data.to(torch.float32) - layer.scaling["default"] * b0 @ a0
        base.weight.data = residual.to(weight.dtype)
        done += 1
    peft_model.medcap_adapter_init = dict(initial)
    return done


# ------------------------------------------------------------------------------------------------
# training: AdaLoRA
# ------------------------------------------------------------------------------------------------


def orthogonal_penalty(model: Any) -> torch.Tensor | None:
    """AdaLoRA's regulariser, orth_reg_weight x the mean over its P (lora_A) and Q (lora_B) matrices of
    ||P P^T - I||_F and ||Q^T Q - I||_F; None for other methods.

    peft computes it only inside ``AdaLoraModel.forward`` on ``outputs.loss``; medcap's PeftModel has no
    task type, so its forward goes straight to the transformers model, and medcap sums its own token
    loss from the logits. This is the same formula, added once per optimizer step
    (tests/model/test_peft_methods.py checks it against peft's forward)."""
    adalora = _adalora_model(model)
    if adalora is None:
        return None
    name = adalora.trainable_adapter_name
    weight = adalora.peft_config[name].orth_reg_weight
    total: Any = 0
    count = 0
    for n, p in adalora.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    if not count:
        return None
    return weight * (total / count)


def after_optimizer_step(model: Any, step: int) -> None:
    """AdaLoRA: update the importance scores and the rank budget (after ``optimizer.step()``, before
    ``zero_grad()``: it reads the gradients). ``step`` is the optimizer step just taken, from 0."""
    adalora = _adalora_model(model)
    if adalora is not None:
        adalora.update_and_allocate(step)


def training_state(model: Any) -> dict[str, Any]:
    """What a resumed run needs besides weights and optimizer: AdaLoRA's rank allocator statistics
    and its current rank pattern (empty for other methods)."""
    adalora = _adalora_model(model)
    if adalora is None:
        return {}
    alloc = adalora.rankallocator
    config = adalora.peft_config[adalora.trainable_adapter_name]
    return {
        "adalora": {
            "ipt": {k: v.detach().cpu() for k, v in alloc.ipt.items()},
            "exp_avg_ipt": {k: v.detach().cpu() for k, v in alloc.exp_avg_ipt.items()},
            "exp_avg_unc": {k: v.detach().cpu() for k, v in alloc.exp_avg_unc.items()},
            "rank_pattern": config.rank_pattern,
        }
    }


def load_training_state(model: Any, state: dict[str, Any] | None) -> None:
    """Put back what ``training_state`` saved."""
    adalora = _adalora_model(model)
    if adalora is None or not state or "adalora" not in state:
        return
    saved = state["adalora"]
    device = next(p.device for p in adalora.parameters())
    alloc = adalora.rankallocator
    for attr in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(alloc, attr, {k: v.to(device) for k, v in saved[attr].items()})
    adalora.peft_config[adalora.trainable_adapter_name].rank_pattern = saved["rank_pattern"]


__all__ = [
    "after_optimizer_step",
    "load_training_state",
    "orthogonal_penalty",
    "peft_model_of",
    "read_adapter_init",
    "restore_base",
    "saving",
    "training_state",
    "write_adapter_init",
]
