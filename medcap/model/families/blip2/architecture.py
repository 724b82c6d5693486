"""BLIP-2 architectures without the hub: the shipped Salesforce configs, the built-in tiny models,
config.json files of local folders wired to the offline tokenizer, and the vision tower's position
embeddings (tiny models' sine-cosine start, re-gridding for another image size)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config.loader import ConfigError
from medcap.model.tokenizer import ASSETS_DIR, padded_vocab, special_ids

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig

#: Hub ids whose configs ship in ``model/assets/<short name>/config.json``.
SHIPPED_CONFIGS = {
    "Salesforce/blip2-opt-6.7b": "blip2-opt-6.7b",
    "Salesforce/blip2-opt-2.7b": "blip2-opt-2.7b",
    "Salesforce/blip2-flan-t5-xl": "blip2-flan-t5-xl",
}


def shipped_config(name_or_path: str) -> Path | None:
    """The shipped config.json of a known hub id (or its short name), else None."""
    short = SHIPPED_CONFIGS.get(name_or_path) or (
        name_or_path if name_or_path in SHIPPED_CONFIGS.values() else None
    )
    return ASSETS_DIR / short / "config.json" if short else None


def config_from_file(path: Path):
    """A ``Blip2Config`` from a config.json file."""
    from transformers import Blip2Config

    if not path.is_file():
        raise ConfigError(f"{path} does not exist: a local model folder needs its config.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    return Blip2Config.from_dict(data)


def tiny_blip2_config(text: str, vocab_size: int, image_token_index: int, special: dict[str, int]):
    """The built-in tiny BLIP-2 (``text``: ``opt`` or ``t5``): builds in milliseconds, learns phantom
    facts on a CPU.

    Vision hidden 128 (FACTS 3: hidden 64 learned modality but not lesion side/kind), 64 px images
    in a 4 x 4 grid of 16 px patches with sine-cosine starting positions (``sincos_vision_positions``),
    a 2-layer Q-Former with cross-attention in every layer, 8 query tokens and a 2-layer, 64-wide
    language model. Measured on 700 phantoms (tests/train/test_learns.py settings, 900 steps at batch 32):
    with 8 px patches and random positions, 300 steps learned modality and region but lesion side
    stayed at chance; 16 px patches make a step ~1.5x cheaper, and with sine-cosine positions the side
    is read off the image (0.77 where only the image tells it, against 0.5 for a guess).
    """
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config

    vision = Blip2VisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
        initializer_range=0.02,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        cross_attention_frequency=1,
        encoder_hidden_size=128,
        max_position_embeddings=64,
        vocab_size=64,
        # No dropout: the tiny model learns from scratch in a few hundred steps.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if text == "opt":
        text_config = OPTConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            word_embed_proj_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=256,
            max_position_embeddings=512,
            bos_token_id=special["bos"],
            eos_token_id=special["eos"],
            pad_token_id=special["pad"],
            dropout=0.0,
        )
    else:
        text_config = T5Config(
            vocab_size=vocab_size,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            eos_token_id=special["eos"],
            pad_token_id=special["pad"],
            decoder_start_token_id=special["pad"],
            dropout_rate=0.0,
        )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=8,
        image_token_index=image_token_index,
        # The std of every random weight (_random_fill). 0.02 (BERT's, for 768+ wide layers) leaves
        # 64-128 wide layers so small that the image barely moves the Q-Former output at first and
        # the language model learns the caption prior instead; measured on 600 phantoms (600 steps,
        # batch 16), 0.05 got held-out modality 0.70 and region 0.67 against 0.54 and 0.43 for 0.02
        # (0.1: 0.58, 0.52).
        initializer_range=0.05,
    )


def offline_architecture(cfg: ModelConfig, text: str, tiny: bool, tokenizer) -> Any:
    """The ``Blip2Config`` of a tiny or shipped/local architecture, wired to the offline tokenizer.

    The offline tokenizer is smaller than the real one: the special ids point at it, while the
    embedding keeps the real vocabulary size, so parameter counts and memory are the real ones.
    """
    special = special_ids(tokenizer)
    if tiny:
        config = tiny_blip2_config(text, padded_vocab(tokenizer), special["image"], special)
    else:
        path = shipped_config(cfg.name_or_path) or Path(cfg.name_or_path).expanduser() / "config.json"
        if not Path(cfg.name_or_path).expanduser().is_dir() and shipped_config(cfg.name_or_path) is None:
            raise ConfigError(
                f"model.name_or_path {cfg.name_or_path!r}: its config is not here (no hub); shipped configs "
                f"are {', '.join(SHIPPED_CONFIGS)}, or give a local folder with config.json"
            )
        config = config_from_file(path)
        if len(tokenizer) > config.text_config.vocab_size:
            raise ConfigError(
                f"{path}: vocab_size {config.text_config.vocab_size} is smaller than the tokenizer"
            )
        config.image_token_index = special["image"]
        tc = config.text_config
        tc.pad_token_id = special["pad"]
        tc.eos_token_id = special["eos"]
        if text == "opt":
            tc.bos_token_id = special["bos"]
        else:
            tc.decoder_start_token_id = special["pad"]
    if cfg.image_size:
        config.vision_config.image_size = cfg.image_size
    return config


def make_processor(tokenizer, image_size: int, num_query_tokens: int):
    """A ``Blip2Processor`` from a tokenizer: CLIP mean/std, bicubic resize to ``image_size``.

    The Pillow image processor is used because the torchvision one would need torchvision.
    """
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)


def sincos_vision_positions(model) -> None:
    """Start the tiny vision tower's position embeddings as fixed 2-D sine-cosine codes (as MAE does).

    The tiny models learn from scratch in a few hundred steps. With random position embeddings the
    patches barely know where they are, so the model learns what is in an image (modality, region,
    finding) but not where (the lesion's side: chance after 300 steps). Half the channels encode the
    patch column and half the row, at geometric frequencies; the class position gets zeros. Still
    trainable parameters: only their starting point changes.
    """
    import torch

    from medcap.model.adapters import unwrap

    emb = unwrap(model).vision_model.embeddings
    pos = emb.position_embedding
    dim = pos.shape[-1]
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    if grid * grid != pos.shape[1] - 1 or dim % 4:
        return  # not a square patch grid with a class token: leave the random start
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coord in (cols.flatten(), rows.flatten()):
        angle = coord[:, None] * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    table = torch.cat([torch.zeros(1, dim), torch.cat(parts, dim=1)], dim=0)
    with torch.no_grad():
        pos.copy_(table[None].to(pos.dtype))


def resize_vision_positions(model, image_size: int) -> None:
    """Re-grid the vision tower's position embeddings for ``image_size`` (bicubic, as LAVIS does).

    Pretrained BLIP-2 sees 224 px; LAVIS fine-tunes captioning at 364 px with interpolated positions.
    Resizing once at build time keeps every forward and generate call free of extra arguments.
    """
    import torch

    from medcap.model.adapters import unwrap

    emb = unwrap(model).vision_model.embeddings
    patch = emb.patch_size
    if image_size % patch:
        raise ConfigError(f"model.image_size {image_size} is not a multiple of the patch size {patch}")
    grid = image_size // patch
    dummy = torch.empty(1, 1 + grid * grid, emb.embed_dim, device="meta")
    with torch.no_grad():
        new = emb.interpolate_pos_encoding(dummy, image_size, image_size)
    emb.position_embedding = torch.nn.Parameter(
        new.contiguous(), requires_grad=emb.position_embedding.requires_grad
    )
    emb.image_size = image_size
    emb.num_patches = grid * grid
    emb.num_positions = grid * grid + 1
    unwrap(model).config.vision_config.image_size = image_size
