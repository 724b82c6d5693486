"""Sharded training through accelerate: FSDP (FSDP2, ``fully_shard``) and DeepSpeed ZeRO-2 / ZeRO-3.

``accelerate launch --config_file <medcap/config/recipes/accelerate/*.yaml> -m medcap train ...``
picks the strategy; ``fit()`` asks this module what changes when parameters, gradients or optimizer
state are split over the processes:

* **setup** (``prepare_model``): FSDP wraps every class transformers lists in ``_no_split_modules``
  that the model has (BLIP-2 names classes of both language models, so accelerate's own lookup fails
  on either), unless the accelerate config names the classes itself. After ``accelerator.prepare``
  (``after_prepare``), ``generate`` and the query cache's forward are registered as FSDP forward
  methods, so they gather the root's shards as ``forward`` does; every process then generates in
  lockstep (``caption_images(synced=True)``).
* **saving** (``gather_trainable``, ``save_sharded``): the model files of a checkpoint (``adapter/``,
  ``trainable.safetensors``: what ``medcap predict`` and ``export`` load) are gathered to the main
  process, which is cheap for adapters; the optimizer state and the trainable parameters are also
  written sharded (``CKPT/sharded/``: torch.distributed.checkpoint, each process its own shard; for
  DeepSpeed the engine's own checkpoint without frozen weights), so no process ever holds the whole
  optimizer state, and a resume loads each shard back where it belongs (``load_sharded``).
* **the CPU**: accelerate 1.15 turns FSDP on only for GPU-type setups; on the CPU (gloo) a launch
  with an FSDP config would silently fall back to plain data parallel. ``enable_fsdp_on_cpu`` sets
  accelerate's state to FSDP with the plugin of the launch environment, so the same accelerate and
  torch code paths run on gloo (how the tests run FSDP with two CPU processes). DeepSpeed runs on CUDA
  GPUs and, through its CPU accelerator, on gloo (how the tests run ZeRO-2 and ZeRO-3 on the CPU).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

Strategy = Literal["single", "ddp", "fsdp", "deepspeed"]


def strategy(accelerator: Any) -> Strategy:
    """How the processes share the model: one process, DDP (full copies), FSDP or DeepSpeed."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "single" if accelerator.num_processes == 1 else "ddp"


def is_sharded(accelerator: Any) -> bool:
    """Parameters (FSDP, ZeRO-3) or optimizer state (ZeRO-2) split over the processes."""
    return strategy(accelerator) in ("fsdp", "deepspeed")


def zero_stage(accelerator: Any) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else None


def params_sharded(accelerator: Any) -> bool:
    """Whether every forward gathers parameters from all processes (FSDP, ZeRO-3), so that generation
    must run in lockstep."""
    kind = strategy(accelerator)
    return kind == "fsdp" or (kind == "deepspeed" and zero_stage(accelerator) == 3)


@contextmanager
def whole_model_build(accelerator: Any) -> Iterator[None]:
    """Build the model whole in each process, also under DeepSpeed ZeRO-3: accelerate registers its
    DeepSpeed config with transformers whatever ``zero3_init_flag`` says, and transformers then
    constructs every model inside ``deepspeed.zero.Init`` (parameters partitioned as they are made),
    which medcap's own build steps (random init from the meta device, PEFT wrapping, parameter counts,
    dtype choices) cannot work on. Built whole, the model is partitioned when accelerate prepares it,
    as for FSDP."""
    if strategy(accelerator) != "deepspeed" or zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    plugin = accelerator.state.deepspeed_plugin
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # generate's synced_gpus and saving read it again


@contextmanager
def own_parameters_gathered(accelerator: Any, model: Any) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3, the top model's own parameters whole for a ``generate`` call.

    ZeRO-3 gathers a module's parameters around its forward; ``generate`` reads the top model's own
    (BLIP-2's and InstructBLIP's ``query_tokens``) outside any forward. A run whose forward reaches
    them keeps them gathered (small parameters stay resident after their first use), but a run on the
    query cache never calls that forward, and its first validation caption failed on the empty
    partition. A no-op under every other strategy."""
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    inner = getattr(model, "get_base_model", lambda: model)()
    with deepspeed.zero.GatheredParameters(list(inner.parameters(recurse=False))):
        yield


def enable_fsdp_on_cpu(accelerator: Any) -> None:
    """Make an FSDP launch on CPU processes (gloo) use FSDP (see the module docstring)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wanted and accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launch's FSDP_* env
        # Both shared states: every AcceleratorState() (accelerate makes new ones, e.g. for each
        # prepared optimizer) copies PartialState's fields over its own.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP


def prepare_model(
    accelerator: Any, model: Any, batch_size: int, grad_accum: int, max_grad_norm: float | None = None
) -> None:
    """Settings the strategy needs before ``accelerator.prepare`` (see the module docstring)."""
    kind = strategy(accelerator)
    if kind == "fsdp":
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            from medcap.train.errors import TrainingError

            raise TrainingError(
                "medcap trains with FSDP2 (fsdp_version: 2 in the accelerate config, as the shipped "
                "medcap/config/recipes/accelerate/fsdp2.yaml); FSDP1 wraps parameters in a way the "
                "checkpoint and generation code here does not handle"
            )
        if not plugin.transformer_cls_names_to_wrap:
            present = {type(m).__name__ for m in model.modules()}
            names = [n for n in (getattr(model, "_no_split_modules", None) or []) if n in present]
            inner = getattr(model, "get_base_model", lambda: model)()
            names += [
                n
                for n in (getattr(inner, "_no_split_modules", None) or [])
                if n in present and n not in names
            ]
            plugin.transformer_cls_names_to_wrap = names
    elif kind == "deepspeed":
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != accelerator.num_processes:
            from medcap.train.errors import TrainingError

            # accelerate 1.15 gives DeepSpeed on CPU processes no backend: each would train alone.
            raise TrainingError(
                f"DeepSpeed was launched with {launched} processes but accelerate sees "
                f"{accelerator.num_processes} ({accelerator.device}): DeepSpeed with several processes "
                "needs GPUs; on CPUs use configs/accelerate fsdp2 (several processes) or one DeepSpeed process"
            )
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # fit() feeds its own batches (no prepared DataLoader to read these from) and accumulates
        # gradients itself: DeepSpeed steps at the same boundaries when told the same counts.
        ds["train_micro_batch_size_per_gpu"] = batch_size
        ds["gradient_accumulation_steps"] = grad_accum
        ds["train_batch_size"] = batch_size * grad_accum * accelerator.num_processes
        # DeepSpeed clips inside its own step (accelerate's clip_grad_norm_ does nothing there).
        ds["gradient_clipping"] = float(max_grad_norm or 0.0)
        offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
        if offload.get("device", "none") != "none":
            # fit() makes its own optimizer (train.optimizer); with the optimizer state offloaded to
            # the CPU, DeepSpeed otherwise insists on its own CPU Adam.
            ds["zero_force_ds_cpu_optimizer"] = False


def after_prepare(accelerator: Any, model: Any, query_cache: Any = None) -> Any:
    """Register the forward-like methods of an FSDP2 model: ``generate``, and the query cache's
    forward (``medcap.train.query_cache.forward_from_cache`` runs the model's parts, not its
    ``forward``, so FSDP would not gather the root's shards for it). Returns what fit() should use as
    its query cache: the module itself, or a stand-in that calls the registered method."""
    if strategy(accelerator) != "fsdp":
        return query_cache
    import types

    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(model, "generate")
    if query_cache is None:
        return None

    def forward_from_cache(self: Any, batch: dict[str, Any]) -> Any:
        return query_cache.forward_from_cache(self, batch)

    model.medcap_forward_from_cache = types.MethodType(forward_from_cache, model)
    register_fsdp_forward_method(model, "medcap_forward_from_cache")
    return _RegisteredCacheForward()


class _RegisteredCacheForward:
    """fit()'s query cache under FSDP: the forward goes through the method FSDP knows about."""

    @staticmethod
    def forward_from_cache(model: Any, batch: dict[str, Any]) -> Any:
        return model.medcap_forward_from_cache(batch)


def loss_scale(accelerator: Any, grad_accum: int) -> float:
    """DeepSpeed divides every micro-batch's loss by its gradient-accumulation steps; fit() already
    normalises by the tokens of the whole step, so it undoes that."""
    return float(grad_accum) if strategy(accelerator) == "deepspeed" else 1.0


def gather_trainable(accelerator: Any, model: Any, with_frozen: bool) -> dict[str, Any] | None:
    """The full trainable parameters (and the frozen ones when ``with_frozen``: small random-init
    bases saved in the checkpoint) on the main process, as plain CPU tensors under
    ``model.named_parameters()``'s names; None elsewhere. Collective: every process calls it."""
    kind = strategy(accelerator)
    # By the inner model's names: DeepSpeed's engine prefixes its own with "module.", its state not.
    inner = accelerator.unwrap_model(model)
    trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            model,
            options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=not with_frozen
            ),
        )
    elif kind == "deepspeed":
        # ZeRO-3 gathers the 16-bit weights here (stage3_gather_16bit_weights_on_model_save: true).
        state = accelerator.get_state_dict(model, unwrap=False)
    else:
        raise ValueError(f"gather_trainable is for sharded strategies, not {kind}")
    if not accelerator.is_main_process:
        return None
    keep = {k: v for k, v in (state or {}).items() if with_frozen or k in trainable}
    missing = trainable - set(keep)
    if missing:
        raise RuntimeError(f"the gathered state lacks trainable parameters, e.g. {sorted(missing)[:3]}")
    return keep


def save_sharded(accelerator: Any, model: Any, optimizer: Any, folder: Path) -> None:
    """Each process writes its shard of the trainable parameters and optimizer state to ``folder``
    (collective). FSDP: torch.distributed.checkpoint; DeepSpeed: the engine's checkpoint."""
    kind = strategy(accelerator)
    if kind == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
    elif kind == "deepspeed":
        model.save_checkpoint(str(folder), tag="medcap", exclude_frozen_parameters=True)
    else:
        raise ValueError(f"save_sharded is for sharded strategies, not {kind}")


def load_sharded(accelerator: Any, model: Any, optimizer: Any, folder: Path) -> None:
    """Load what ``save_sharded`` wrote into the prepared (sharded) model and optimizer."""
    kind = strategy(accelerator)
    if not folder.is_dir():
        from medcap.train.errors import TrainingError

        raise TrainingError(
            f"cannot resume from {folder.parent}: no {folder.name}/ there (it was not written by a sharded "
            "run: resume it with the strategy it was trained with)"
        )
    if kind == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        options = StateDictOptions(ignore_frozen_params=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
    elif kind == "deepspeed":
        model.load_checkpoint(
            str(folder),
            tag="medcap",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    else:
        raise ValueError(f"load_sharded is for sharded strategies, not {kind}")


__all__ = [
    "after_prepare",
    "enable_fsdp_on_cpu",
    "gather_trainable",
    "is_sharded",
    "load_sharded",
    "loss_scale",
    "params_sharded",
    "prepare_model",
    "save_sharded",
    "strategy",
    "zero_stage",
]
