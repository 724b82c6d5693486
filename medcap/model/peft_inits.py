"""The data-driven LoRA inits (EVA, CorDA): statistics of the adapted layers' inputs on a bounded
number of training batches, computed by peft (``get_eva_state_dict``, ``preprocess_corda``) and
cached in RUN/peft_init/ next to the key they were computed for."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from medcap.config.loader import ConfigError
from medcap.model.family import ModelFamily
from medcap.model.peft_methods import (
    EVA_MAX_PASSES,
    AdapterSetup,
    cache_key,
    cached,
    layer_rows,
    model_inputs,
    write_key,
)
from medcap.model.quantize import keep_4bit_training_layout

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig


def _batches(
    cfg: ModelConfig, processor: Any, setup: AdapterSetup, per_batch: int | None
) -> list[dict[str, Any]]:
    if setup.calibration is None or processor is None:
        raise ConfigError(
            f"model.peft.init {cfg.peft.init} takes statistics from training batches: build the model through "
            "medcap.train.recipe.fit (medcap train), which passes them, or load a checkpoint"
        )
    batches = setup.calibration(processor, per_batch)
    if not batches:
        raise ConfigError(
            f"model.peft.init {cfg.peft.init}: the training split gave no batches to take statistics from; "
            "check data.prepared's train split, or use init default, pissa or olora (they need no data)"
        )
    return batches


def _device(model: Any) -> torch.device:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def eva_init(
    peft_model: Any,
    cfg: ModelConfig,
    family: ModelFamily,
    processor: Any,
    setup: AdapterSetup,
    matched: list[str],
) -> None:
    """EVA: A from the SVD of each adapted layer's inputs (peft's ``get_eva_state_dict``, cycling over
    the batches until every layer's components have converged), ranks redistributed by explained
    variance; then peft's ``initialize_lora_eva_weights``."""
    from peft import get_eva_state_dict, initialize_lora_eva_weights

    key = cache_key(cfg, matched, setup)
    path = cached(setup, "eva.pt", key)
    if path is not None:
        print(f"peft init eva: reusing the statistics in {path}")
        state = torch.load(path, map_location=_device(peft_model), weights_only=True)
    else:
        batches = _batches(cfg, processor, setup, per_batch=None)
        calls = 0

        def forward(model: Any, batch: dict[str, Any]) -> Any:
            nonlocal calls
            calls += 1
            if calls > EVA_MAX_PASSES * len(batches) + 1:
                raise ConfigError(
                    f"model.peft.init eva: the layers' SVD did not converge in {EVA_MAX_PASSES} passes over "
                    f"{len(batches)} batches; raise model.peft.init_batches or lower model.peft.eva_tau"
                )
            return model(**model_inputs(batch, family.decoder_only))

        print(
            f"peft init eva: SVD of the adapted layers' inputs on {len(batches)} training batches "
            f"(cycled until they converge, at most {EVA_MAX_PASSES} passes)"
        )
        # A fork of the random state: a run that finds the statistics cached draws the same numbers after.
        with torch.random.fork_rng(), keep_4bit_training_layout(peft_model):
            state = get_eva_state_dict(
                peft_model,
                dataloader=batches,
                forward_fn=forward,
                prepare_model_inputs_fn=None,
                prepare_layer_inputs_fn=layer_rows,
                # Every process reads the same batches (the init must be identical on all of them).
                gather_distributed_inputs=False,
                show_progress_bar=setup.show_progress,
            )
        if setup.cache_dir is not None:
            setup.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = setup.cache_dir / f".eva.pt.{os.getpid()}"
            torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
            tmp.replace(setup.cache_dir / "eva.pt")
            write_key(setup, "eva.pt", key)
    initialize_lora_eva_weights(peft_model, eva_state_dict=dict(state), show_progress_bar=False)


def corda_statistics(
    model: Any,
    config: Any,
    cfg: ModelConfig,
    family: ModelFamily,
    processor: Any,
    setup: AdapterSetup,
    matched: list[str],
) -> None:
    """CorDA: the covariance of each adapted layer's inputs and its context-oriented SVD (peft's
    ``preprocess_corda``), before the adapter is created; peft writes the SVD to the cache file.

    peft's hook takes one example per forward (it squeezes the batch dimension), so the calibration
    examples run one at a time, unpadded."""
    from peft.tuners.lora.corda import preprocess_corda
    from tqdm.auto import tqdm

    key = cache_key(cfg, matched, setup)
    path = cached(setup, "corda.pt", key)
    if setup.cache_dir is not None:
        setup.cache_dir.mkdir(parents=True, exist_ok=True)
        config.corda_config.cache_file = str(setup.cache_dir / "corda.pt")
    if path is not None:
        print(f"peft init corda: reusing the decomposition in {path}")
        preprocess_corda(model, config)
    else:
        examples = _batches(cfg, processor, setup, per_batch=1)
        device = _device(model)

        def run_model() -> None:
            for batch in tqdm(
                examples, desc="corda: layer-input covariance", disable=not setup.show_progress
            ):
                inputs = model_inputs(batch, family.decoder_only)
                model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()})

        print(
            f"peft init corda: covariance of the adapted layers' inputs on {len(examples)} training examples"
        )
        # As for EVA: a cached rerun draws the same numbers after, and a 4-bit base stays trainable.
        with torch.random.fork_rng(), keep_4bit_training_layout(model):
            preprocess_corda(model, config, run_model=run_model)
        if setup.cache_dir is not None:
            write_key(setup, "corda.pt", key)
    config.corda_config.cache_file = (
        None  # the path is this machine's; the saved adapter config must not carry it
    )


__all__ = ["corda_statistics", "eva_init"]
