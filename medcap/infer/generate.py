"""Captioning with a model: batched generation, and loading a model to caption with.

* ``caption_images(model, processor, images, gen, prompt)``: captions for PIL images, in batches of
  ``gen.batch_size``. Inputs and decoding are the model family's (``family.generation_inputs``:
  image tokens inserted by the processor, left padding for decoder-only models; ``family.decode``:
  the repeated prompt sliced off, FACTS 3). With greedy or beam decoding a batch gives the same
  captions as one image at a time.
* ``load_captioner``: a base model (hub id, local folder, ``tiny``) with an optional PEFT adapter, or
  a training checkpoint (``model.checkpoint.load_checkpoint``), with the decoding defaults and prompt
  it was trained with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from medcap.config.generate import GenerateConfig
from medcap.config.run import RunConfig
from medcap.model.families import family_of
from medcap.model.family import ModelFamily

T = TypeVar("T")


def _chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _generate_batches(
    model: Any,
    processor: Any,
    images: list[Any],
    gen: GenerateConfig,
    prompt: str,
    family: ModelFamily,
    synced: bool = False,
) -> Iterator[tuple[Any, int]]:
    """``(generate() output, prompt length)`` per batch of ``gen.batch_size`` images."""
    import torch

    dtype, device = family.pixel_dtype_device(model)
    tokenizer = processor.tokenizer
    stop = family.stop_token_ids(model, processor)
    kwargs = gen.generate_kwargs()
    kwargs["eos_token_id"] = stop if len(stop) > 1 else stop[0]
    kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    if synced:
        # Sharded weights (FSDP, ZeRO-3): every process keeps stepping until all are done, since
        # each forward gathers parameter shards from all of them.
        kwargs["synced_gpus"] = True
    for number, batch in enumerate(_chunks(images, gen.batch_size)):
        batch = [im if getattr(im, "mode", "RGB") == "RGB" else im.convert("RGB") for im in batch]
        inputs = family.generation_inputs(processor, batch, prompt)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        rng = contextlib.nullcontext()
        if gen.do_sample:
            cuda = [device] if device.type == "cuda" else []
            rng = torch.random.fork_rng(devices=cuda)  # seeding must not disturb the caller's RNG
        with rng, torch.inference_mode():
            if gen.do_sample:
                torch.manual_seed(gen.seed + number)
            output = model.generate(**inputs, **kwargs)
        yield output, inputs["input_ids"].shape[1]


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Generate in eval mode (no dropout), then give the model back in the mode it came in."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def caption_images(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    gen: GenerateConfig | None = None,
    prompt: str | Sequence[str] = "",
    family: ModelFamily | None = None,
    synced: bool = False,
) -> list[str]:
    """Caption PIL images with ``model``: one caption per image, in order.

    ``prompt`` may be one per image (``data.prompt_with``: the image's modality or concepts in it):
    images with the same prompt are captioned together, in batches of ``gen.batch_size``.

    Images go in batches of ``gen.batch_size``; the prompt (the text the captions were trained to
    follow, ``model.prompt`` of the run) is given to every image and is not part of the returned
    caption. ``family`` defaults to the model's (``medcap.model.families.family_of``). Greedy and beam decoding give the same captions
    batched as one image at a time; sampling is seeded per batch (``gen.seed`` + batch number), so it
    is reproducible for a given batch size. The model is put in eval mode for the call and back.
    ``synced``: the model's weights are sharded over processes (FSDP, DeepSpeed ZeRO-3) and every
    process calls this with the same number of images (``generate(synced_gpus=True)``).
    """
    gen = gen or GenerateConfig()
    images = list(images)
    if not images:
        return []
    family = family or family_of(model)
    if not isinstance(prompt, str):
        prompts = list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one per image")
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        out: list[str] = [""] * len(images)
        for p, idx in groups.items():
            for i, text in zip(
                idx, caption_images(model, processor, [images[i] for i in idx], gen, p, family), strict=True
            ):
                out[i] = text
        return out
    captions: list[str] = []
    with _eval_mode(model):
        for output, prompt_len in _generate_batches(model, processor, images, gen, prompt, family, synced):
            texts = family.decode(processor, output, prompt_len)
            captions.extend(" ".join(t.split()) for t in texts)
    return captions


def generate_token_ids(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    gen: GenerateConfig | None = None,
    prompt: str = "",
    family: ModelFamily | None = None,
) -> list[list[int]]:
    """The generated token ids per image (prompt removed, padding and end token dropped).

    What ``caption_images`` decodes; for checks on the decoding options and for benchmarks.
    """
    gen = gen or GenerateConfig()
    family = family or family_of(model)
    stop = set(family.stop_token_ids(model, processor))
    pad = processor.tokenizer.pad_token_id
    out: list[list[int]] = []
    with _eval_mode(model):
        for output, prompt_len in _generate_batches(model, processor, list(images), gen, prompt, family):
            output = family.generated_ids(output, prompt_len)
            for row in output.tolist():
                ids: list[int] = []
                for i in row:
                    if i in stop:
                        break
                    if i != pad:
                        ids.append(i)
                out.append(ids)
    return out


def model_image_reader(
    family: ModelFamily,
    processor: Any,
    max_pixels: int | None = None,
    *,
    max_decoded_bytes: int | None = None,
) -> Callable[..., Any]:
    """``read(source, name=None)``: the one image reader as training decoded (draft mode at the model's
    input side), refusing an image beyond the family's limits (Qwen-VL: aspect ratios over 200:1) with
    an ``ImageReadError`` of kind ``beyond_model`` that names the limit, so predict, caption and the
    service skip or refuse that one image instead of failing its whole batch."""
    from medcap.data.images import DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_PIXELS, ImageReadError, read_image

    side = family.image_side(processor)
    limit = max_pixels or DEFAULT_MAX_PIXELS
    decoded_limit = max_decoded_bytes or DEFAULT_MAX_DECODED_BYTES

    def read(source: Any, name: str | None = None) -> Any:
        image = read_image(source, name, max_pixels=limit, min_size=side, max_decoded_bytes=decoded_limit)
        try:
            family.check_images(processor, [image])
        except ValueError as e:
            raise ImageReadError(name or str(source), str(e), kind="beyond_model") from None
        return image

    return read


@dataclass
class Captioner:
    """A model ready to caption, with what it was trained with."""

    model: Any
    processor: Any
    family: ModelFamily
    prompt: str = ""
    """The text captions follow (the run's ``model.prompt``)."""
    gen: GenerateConfig = field(default_factory=GenerateConfig)
    """Decoding defaults: the checkpoint's ``generate`` section, else GenerateConfig()."""
    run_cfg: RunConfig | None = None
    """The checkpoint's resolved run config (``config.yaml``), if loaded from one."""
    checkpoint: Path | None = None
    run_dir: Path | None = None
    """The training run folder that holds the checkpoint (``RUN``), if any."""
    info: dict[str, Any] = field(default_factory=dict)
    """base, adapter, checkpoint: what ``GET /v1/model`` and the prediction metadata show."""
    guide: Any = None
    """A ``medcap.concepts.guide.ConceptGuide`` for a model trained with ``data.prompt_with``: each
    image's predicted modality or concepts go into its prompt."""

    def caption(self, images: Sequence[Any], gen: GenerateConfig | None = None) -> list[str]:
        """``caption_images`` with this model's prompt (guided per image where it has a guide) and
        decoding defaults."""
        prompt = self.guide.prompts(images, self.prompt) if self.guide is not None else self.prompt
        return caption_images(self.model, self.processor, images, gen or self.gen, prompt, self.family)

    @property
    def image_side(self) -> int | None:
        """The model's input side: images are read with ``read_image(min_size=...)`` to no less."""
        return self.family.image_side(self.processor)

    def image_reader(self, max_pixels: int | None = None) -> Callable[..., Any]:
        """This model's ``model_image_reader``: decode as training did, refuse what the family cannot take."""
        return model_image_reader(self.family, self.processor, max_pixels)


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_captioner(
    *,
    model: str | None = None,
    checkpoint: str | Path | None = None,
    adapter: str | Path | None = None,
    device: str | None = None,
    precision: str | None = None,
    prompt: str | None = None,
    concepts: str | Path | None = None,
    verbose: bool = False,
) -> Captioner:
    """Load a model to caption with: a training checkpoint, or a base model plus optional adapter.

    ``concepts``: a concept model (``medcap concepts train`` run) that puts each image's modality or
    concepts into its prompt, for a checkpoint trained with ``data.prompt_with`` (which needs one).

    * ``checkpoint``: a checkpoint folder or a run folder (best, else last), rebuilt by
      ``load_checkpoint`` with the prompt and decoding settings of its config;
    * ``model``: a hub id, a local folder (e.g. a merged export) or ``tiny``; ``adapter`` a PEFT
      adapter folder put on it. With only ``adapter``, the base is the one its adapter_config.json names.

    ``device`` defaults to CUDA when available; ``precision`` (fp32, fp16, bf16) applies to ``model``.
    """
    from medcap.config.model import ModelConfig, PeftSettings
    from medcap.layout import CheckpointLayout, resolve_checkpoint
    from medcap.model.build import build_model
    from medcap.model.checkpoint import load_checkpoint

    if checkpoint is not None and (model is not None or adapter is not None):
        raise ValueError("give either a checkpoint, or a model with an optional adapter, not both")
    device = device or _default_device()
    if checkpoint is not None:
        ckpt, run_dir = resolve_checkpoint(checkpoint)
        net, processor, run_cfg = load_checkpoint(ckpt, verbose=verbose)
        adapter_dir = CheckpointLayout(ckpt).adapter
        cap = Captioner(
            model=net,
            processor=processor,
            family=family_of(net),
            prompt=run_cfg.model.prompt if prompt is None else prompt,
            gen=run_cfg.generate,
            run_cfg=run_cfg,
            checkpoint=ckpt,
            run_dir=run_dir,
            info={
                "base": run_cfg.model.name_or_path,
                "adapter": str(adapter_dir) if adapter_dir.is_dir() else None,
                "checkpoint": str(ckpt),
            },
        )
    else:
        adapter_dir = Path(adapter) if adapter is not None else None
        if adapter_dir is not None:
            if not (adapter_dir / "adapter_config.json").is_file():
                raise FileNotFoundError(
                    f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json); for a training "
                    "checkpoint use --checkpoint"
                )
            if model is None:
                model = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
                    "base_model_name_or_path"
                )
                if not model:
                    raise ValueError(f"{adapter_dir}/adapter_config.json names no base model; pass --model")
                # `medcap export` ships a base that cannot be downloaded (tiny, random-init) in
                # ADAPTER/base and names its absolute path (older exports: "base", relative to the
                # adapter). A moved or copied export still has it beside the adapter: use that.
                if not Path(model).is_absolute() and (adapter_dir / model / "config.json").is_file():
                    model = str(adapter_dir / model)
                elif not Path(model).exists() and (adapter_dir / "base" / "config.json").is_file():
                    model = str(adapter_dir / "base")
        if model is None:
            raise ValueError("give --model NAME_OR_PATH (or 'tiny'), or --checkpoint DIR")
        with _quiet_logger("medcap.config.model"):
            # A model built only to caption trains nothing; the config warns about that: noise here.
            cfg = ModelConfig(
                name_or_path=model, precision=precision or "fp32", peft=PeftSettings(method="none")
            )
        net, processor = build_model(cfg, verbose=verbose)
        if adapter_dir is not None:
            from peft import PeftModel
            from safetensors import SafetensorError

            try:
                net = PeftModel.from_pretrained(net, str(adapter_dir))
            except SafetensorError as e:
                raise ValueError(
                    f"{adapter_dir}: the adapter weights are not a complete safetensors file ({e}); copy the "
                    "adapter folder again"
                ) from None
            net.eval()
        # An export carries its run's settings (medcap_config.yaml): caption with the prompt and
        # decoding defaults it was trained with, as `medcap serve` does.
        exported, cfg_path = medcap_config_near(adapter_dir, model if Path(model).is_dir() else None)
        cap = Captioner(
            model=net,
            processor=processor,
            family=family_of(net),
            prompt=((exported.get("model") or {}).get("prompt") or "") if prompt is None else prompt,
            gen=export_generate_defaults(exported, str(cfg_path)) if cfg_path else GenerateConfig(),
            info={"base": model, "adapter": str(adapter_dir) if adapter_dir else None, "checkpoint": None},
        )
    quantized = getattr(cap.model, "is_loaded_in_8bit", False) or getattr(
        cap.model, "is_loaded_in_4bit", False
    )
    if not quantized:  # bitsandbytes models are placed at load time and cannot be moved
        cap.model.to(device)
    cap.info["device"] = str(device)
    from medcap.concepts.guide import guide_for_run

    cap.guide = guide_for_run(concepts, cap.run_cfg, (cap.model, cap.processor), device)
    if cap.guide is not None:
        cap.info["concepts"] = str(cap.guide.predictor.concepts.checkpoint)
        cap.info["prompt_with"] = cap.guide.how
    return cap


def medcap_config_near(*folders: str | Path | None) -> tuple[dict[str, Any], Path | None]:
    """The run config an export carries (``medcap_config.yaml``, written by ``medcap export``).

    Read as plain data on purpose: an export may come from another medcap version, and serving it
    needs only its prompt and decoding settings (unknown settings are dropped with a warning).
    """
    import yaml

    for folder in folders:
        path = Path(folder) / "medcap_config.yaml" if folder is not None else None
        if path is not None and path.is_file():
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if isinstance(data, dict):
                return data, path
    return {}, None


def export_generate_defaults(run_cfg: dict[str, Any], where: str) -> GenerateConfig:
    """The decoding defaults of an export's run config (``medcap_config_near``); ``where`` names it in messages."""
    from medcap.config.loader import ConfigError, from_dict

    section = dict(run_cfg.get("generate") or {})
    known = {f.name for f in dataclasses.fields(GenerateConfig)}
    dropped = sorted(set(section) - known)
    if dropped:
        logging.getLogger("medcap").warning(
            "%s: generate settings this version does not know, ignored: %s", where, ", ".join(dropped)
        )
    try:
        return from_dict(GenerateConfig, {k: v for k, v in section.items() if k in known})
    except ConfigError as e:
        raise ValueError(f"{where}: generate: {e}") from None


def prefetched(
    items: Sequence[T], batch_size: int, load: Callable[[T], Any]
) -> Iterator[list[tuple[T, Any]]]:
    """Batches of ``(item, load(item) or the exception)``; the next batch loads while this one runs.

    Decoding JPEGs and DICOMs overlaps with generation (Pillow and numpy release the GIL).
    """

    def load_all(chunk: list[T]) -> list[tuple[T, Any]]:
        out = []
        for item in chunk:
            try:
                out.append((item, load(item)))
            except Exception as e:  # noqa: BLE001 - reported per item by the caller
                out.append((item, e))
        return out

    chunks = list(_chunks(items, batch_size))
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medcap-read") as pool:
        future = pool.submit(load_all, chunks[0])
        for k in range(len(chunks)):
            result = future.result()
            if k + 1 < len(chunks):
                future = pool.submit(load_all, chunks[k + 1])
            yield result


__all__ = [
    "Captioner",
    "caption_images",
    "generate_token_ids",
    "load_captioner",
    "model_image_reader",
    "prefetched",
]
