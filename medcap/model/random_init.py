"""Random weights, fast: full-size architectures for dry runs, memory checks and benchmarks, and
the tiny models of tests and the demo, without the hub and without transformers' slow init."""

from __future__ import annotations

from typing import Any

import torch

#: Random numbers drawn once per dtype by ``random_fill`` (4M: 0.2 s to draw).
POOL_SIZE = 1 << 22


@torch.no_grad()
def random_fill(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill every parameter cheaply and reproducibly: random weights, zero biases, unit norms.

    The default initialisation of BLIP2-OPT-6.7B took 96 s here, and even drawing 7.75B fresh normal
    numbers takes minutes on a small CPU. Random weights for dry runs, memory checks and benchmarks
    only need the right shapes and sane scales, so the weights are cut from a pool of
    ``POOL_SIZE`` normal(0, std) numbers at random offsets: a memory copy, seconds for 7.75B. The
    tiny models (well under the pool size per tensor) get fully independent values. One generator
    seeded with ``seed`` makes the result reproducible.
    """
    # All threads: the time goes to the kernel handing out fresh zeroed pages (page faults: 16 GB
    # for the 6.7B model), and two threads fault in parallel. Measured on the 2-core box, idle: 6.7B
    # build 27.4 s with one fill thread, 18.8 s with two (the default init: 96 s).
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pools: dict[torch.dtype, torch.Tensor] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied weights (OPT's lm_head is its embedding)
            continue
        seen.add(id(param))
        leaf = name.rsplit(".", 1)[-1]
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, torch.nn.LayerNorm) or type(owner).__name__.endswith("LayerNorm"):
            param.fill_(1.0 if leaf == "weight" else 0.0)
        elif "RMSNorm" in type(owner).__name__ and hasattr(model, "_init_weights"):
            # The model's own rule: most RMSNorms scale by their weight (ones), Gemma's by
            # 1 + weight (zeros). A random scale would silence the layer.
            model._init_weights(owner)
        elif leaf == "bias":
            param.zero_()
        elif param.numel() <= POOL_SIZE // 4:
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        else:
            if param.dtype not in pools:
                pool = torch.randn(POOL_SIZE, generator=gen).mul_(std).to(param.dtype)
                pools[param.dtype] = torch.cat([pool, pool])  # any window up to POOL_SIZE is contiguous
            pool = pools[param.dtype]
            flat = param.view(-1)
            for begin in range(0, flat.numel(), POOL_SIZE):
                piece = flat[begin : begin + POOL_SIZE]
                offset = int(torch.randint(0, POOL_SIZE, (1,), generator=gen))
                piece.copy_(pool[offset : offset + piece.numel()])


def materialize_random(
    model_class: type, config: Any, dtype: torch.dtype, seed: int, fp32_prefixes: tuple[str, ...]
):
    """Build ``model_class(config)`` without the default initialisation.

    Parameters are created on the meta device (no memory, no init work), then allocated once in
    ``dtype`` (``fp32_prefixes`` in fp32) and filled by ``random_fill``. Buffers (position ids) are
    built normally.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    for module_name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{pname}" if module_name else pname
            want = torch.float32 if full.startswith(fp32_prefixes) else dtype
            new = torch.nn.Parameter(torch.empty(param.shape, dtype=want), requires_grad=param.requires_grad)
            module._parameters[pname] = new
    # Tying was done on meta tensors; redo it on the real ones.
    model.tie_weights()
    random_fill(model, seed, std=getattr(config, "initializer_range", 0.02))
    model.config.dtype = dtype
    return model


def meta_model(model_class: type, config: Any, dtype: torch.dtype, fp32_prefixes: tuple[str, ...]):
    """``model_class(config)`` with every parameter on the meta device in the dtype a build gives it:
    shapes only (parameter counts, planning), no memory and no initialisation work."""
    with torch.device("meta"):
        model = model_class(config)
    for name, param in model.named_parameters():
        want = torch.float32 if name.startswith(fp32_prefixes) else dtype
        if param.dtype != want:
            param.data = param.data.to(want)
    return model


__all__ = ["POOL_SIZE", "materialize_random", "meta_model", "random_fill"]
