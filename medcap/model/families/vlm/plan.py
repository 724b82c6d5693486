"""What ``medcap plan`` needs to know about an image-text-to-text model: its layer dimensions, how
long an example is (image tokens as the processor makes them at the configured pixel bounds, the
template, the prompt), what autograd keeps for the backward pass and the FLOPs of a training sample.

The sequence is measured, not assumed: the offline processor (with ``model.min_pixels`` /
``max_pixels`` applied) encodes the largest image its settings let through unchanged, so the
image-token count is the processor's own (Qwen's 28 px units, LLaVA-NeXT's anyres grid, Idefics3's
tiles). The activation formulas were checked against autograd's saved tensors on the tiny models
(``tests/plan/test_vlm_plan.py``).

Per decoder layer of a Llama-like language model (frozen base weights, gradients flowing through):

* each RMSNorm keeps its input upcast to fp32 and the reciprocal RMS (4 x T x h + 4 x T), whatever
  the weight dtype (the norm computes in fp32); Gemma 2/3 have four norms a layer, the others two;
  Qwen3's and Gemma 3's q/k norms the same over the heads' widths; OPT's LayerNorms (InstructBLIP)
  keep input, mean and rstd;
* attention keeps q, k, v and the output (and the log-sum-exp), k and v at the key-value heads'
  width; the rotary cos / sin are shared by every layer;
* the gated MLP keeps the gate output, its activation and the up output (3 x T x f), OPT's ReLU MLP
  its output (T x f); frozen linears keep nothing (a frozen weight needs no input for the input's
  gradient);
* per LoRA target of input width d: the adapter's input, lora_A's output and the dropout mask.

The vision tower keeps nothing unless something in it or the projector trains (no gradient flows
into a frozen tower); then its layers keep what ``medcap.plan.layers.encoder_layer_saved_bytes``
counts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from medcap.plan.layers import Flops, encoder_fwd_flops, encoder_layer_saved_bytes
from medcap.plan.memory import ActDtypes, Trainable


@dataclass(frozen=True)
class EncoderDims:
    """A vision encoder (ViT) stack."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    patch_flops: int
    """Multiply-adds x 2 of the patch embedding, per vision token."""
    gated: bool
    """SwiGLU-style MLP (gate, up, down) instead of fc1 / fc2."""
    rms_norm: bool = False
    """RMSNorm (keeps an fp32 copy of its input) instead of LayerNorm (Qwen's ViT)."""


def vision_dims_of(**kw: Any) -> EncoderDims:
    return EncoderDims(**kw)


@dataclass(frozen=True)
class DecoderDims:
    """The language model, as the activation and FLOP formulas see it."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    norms_per_layer: int
    qk_norm: bool
    gated: bool
    layer_norm: bool
    """LayerNorm (mean and rstd kept, input in the weight dtype) instead of RMSNorm."""
    dropout: float
    eager: bool = False
    """Eager attention (Gemma 2: SDPA has no logit soft-capping): the s x s weights are kept."""
    final_softcap: bool = False
    """Gemma 2's tanh soft-capping of the logits (keeps a logits-sized tensor)."""


def decoder_dims_of(text: Any) -> DecoderDims:
    """Dimensions of a transformers text config (Llama, Mistral, Qwen2/3, Gemma 1/2/3, OPT, T5)."""
    kind = text.model_type
    if kind == "t5":  # encoder and decoder counted as one stack (an approximation, as for BLIP-2)
        return DecoderDims(
            layers=text.num_layers + text.num_decoder_layers,
            hidden=text.d_model,
            ffn=text.d_ff,
            heads=text.num_heads,
            kv_heads=text.num_heads,
            head_dim=text.d_kv,
            vocab=text.vocab_size,
            norms_per_layer=2,
            qk_norm=False,
            gated=text.is_gated_act,
            layer_norm=False,
            dropout=float(text.dropout_rate or 0.0),
        )
    if kind == "opt":
        return DecoderDims(
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            ffn=text.ffn_dim,
            heads=text.num_attention_heads,
            kv_heads=text.num_attention_heads,
            head_dim=text.hidden_size // text.num_attention_heads,
            vocab=text.vocab_size,
            norms_per_layer=2,
            qk_norm=False,
            gated=False,
            layer_norm=True,
            dropout=float(text.dropout or 0.0),
        )
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return DecoderDims(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        ffn=text.intermediate_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=text.vocab_size,
        norms_per_layer=4 if kind in ("gemma2", "gemma3_text", "gemma3") else 2,
        qk_norm=kind in ("qwen3_vl_text", "gemma3_text", "qwen3"),
        gated=True,
        layer_norm=False,
        dropout=float(getattr(text, "attention_dropout", 0.0) or 0.0),
        eager=kind == "gemma2",
        final_softcap=bool(getattr(text, "final_logit_softcapping", None)),
    )


@dataclass(frozen=True)
class VlmDims:
    """What a kit tells the planner about its model's parts."""

    vision: EncoderDims
    projector_in: int
    """Input width of the projector (the vision hidden size, times the tokens it merges)."""
    projector_hidden: int
    """Width of a two-layer projector's hidden layer (0: one linear layer)."""
    tokens_per_lm_token: int
    """Vision tokens per language-model image token (Qwen's 2 x 2 merge: 4; 0 for a Q-Former)."""
    text: Any
    """The transformers text config."""


@dataclass(frozen=True)
class Geometry:
    """An example's shape, measured with the offline processor at the planning image size."""

    prefix_tokens: int
    """Tokens before the caption: image tokens, template, prompt."""
    image_tokens: int
    """Of those, the ones the image fills."""
    end_tokens: int
    crops: int
    """Vision-encoder passes per image (anyres crops, Idefics3 tiles + the global view)."""
    vision_tokens: int
    """Tokens per pass through the vision encoder."""
    image_size: tuple[int, int]


#: Which LoRA targets read the same tensor (with no dropout and no dtype cast, one saved input serves
#: them all): the attention input, the attention output, the MLP input, the MLP's inner activation.
INPUT_GROUPS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "qkv": "attn_in",
    "o_proj": "attn_out",
    "out_proj": "attn_out",
    "proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "fc1": "mlp_in",
    "linear_fc1": "mlp_in",
    "down_proj": "mlp_mid",
    "fc2": "mlp_mid",
    "linear_fc2": "mlp_mid",
}


def lora_bytes(
    targets: list[tuple[str, int, int]],
    t: int,
    e: ActDtypes,
    r: int,
    dropout: float,
    shared: bool,
    frozen_input: bool,
) -> int:
    """Bytes the LoRA adapters of ONE layer keep: per target its input (in the adapter's fp32, or the
    autocast copy), lora_A's output and, with dropout, the dropout mask. ``shared``: the input needs
    no cast and no dropout, so targets reading the same tensor keep it once (and the attention
    output / MLP activation are kept by the layer already). ``frozen_input``: the layer's input needs
    no gradient (the first layer over frozen embeddings), so the attention inputs' dropout keeps no
    mask."""
    total = 0
    seen: set[str] = set()
    for leaf, width, _ in targets:
        group = INPUT_GROUPS.get(leaf, leaf)
        if shared:
            if group not in seen and group in ("attn_in", "mlp_in", "mlp_mid"):
                total += e.lora * t * width
            seen.add(group)
        else:
            total += e.lora * t * width
        total += e.lora * t * r
        if dropout > 0 and not (frozen_input and group == "attn_in"):
            total += e.mask_lora * t * width
    return int(total)


def decoder_layer_bytes(d: DecoderDims, b: int, s: int, e: ActDtypes) -> int:
    """Bytes one decoder layer keeps for backward without its adapters (frozen base weights), see the
    module docstring. Batches are taken as padded (the usual case): the attention then gets a mask,
    and SDPA takes the key-value heads repeated to every head."""
    t = b * s
    if d.layer_norm:
        norms = d.norms_per_layer * (e.res * t * d.hidden + 8 * t)
    else:
        norms = d.norms_per_layer * (4 * t * d.hidden + 4 * t)
    width = d.heads * d.head_dim
    if d.qk_norm:
        norms += 4 * t * 2 * width + 4 * t * 2 * d.heads
    # q, k, v (repeated to every head), the output, the log-sum-exp and the additive mask (b x s x s).
    attention = 4 * e.attn * t * width + 4 * b * d.heads * s + e.attn * b * s * s
    if d.eager:  # q, k, v; the scaled, capped scores, their fp32 softmax and its 16-bit copy
        scores = e.attn + 4 + (e.attn if e.attn < 4 else 0)
        attention = 3 * e.attn * t * width + scores * b * d.heads * s * s
    mlp = (3 if d.gated else 1) * e.lin * t * d.ffn
    dropout = 2 * e.mask_res * t * d.hidden if d.dropout > 0 else 0
    return int(norms + attention + mlp + dropout)


def autocast_copy_bytes(d: DecoderDims, trainable: Trainable, model_cfg: Any) -> int:
    """The 16-bit copies autocast makes of fp32 weights and autograd keeps for backward.

    * The adapters (PEFT keeps them fp32): autocast caches the cast of a leaf that requires grad for
      the whole forward, and each adapter's matmul saves it (2 bytes a parameter).
    * The lm_head when it is fp32 (prepare_model_for_kbit_training cast it for QLoRA, or fp32
      weights): frozen, but its input requires grad, so the product saves the 16-bit weight for the
      input's gradient (vocab x hidden x 2: 1.09 GB for Qwen2.5-VL-7B), outside any checkpointed layer.
      A quantised model's lm_head is never quantised (transformers skips the output embeddings).
    Only under autocast (the caller's condition).
    """
    copies = 2 * trainable.adapter_params
    if model_cfg.quantization != "none" or model_cfg.precision == "fp32":
        copies += 2 * d.vocab * d.hidden
    return copies


@dataclass
class VlmPlanSpec:
    """The planner's view of one image-text-to-text model (``family.plan_spec(meta_model)``)."""

    family: Any
    config: Any
    dims: VlmDims
    lm: DecoderDims
    _geometry: dict[tuple[Any, ...], Geometry] = field(default_factory=dict)

    @classmethod
    def of(cls, model: Any, family: Any) -> VlmPlanSpec:
        config = model.config
        dims = family.kit.plan_dims(config)
        return cls(family=family, config=config, dims=dims, lm=decoder_dims_of(dims.text))

    # --- the example's shape ----------------------------------------------------------------

    def geometry(self, model_cfg: Any) -> Geometry:
        """The example's shape for ``model_cfg``'s pixel bounds and prompt (measured once each)."""
        key = (model_cfg.min_pixels, model_cfg.max_pixels, model_cfg.prompt)
        if key not in self._geometry:
            self._geometry[key] = self._measure(model_cfg)
        return self._geometry[key]

    def _measure(self, model_cfg: Any) -> Geometry:
        from PIL import Image

        kit = self.family.kit
        tokenizer = kit.offline_tokenizer()
        config = copy.deepcopy(self.config)  # apply_image_settings may narrow LLaVA-NeXT's grids
        kit.wire(config, tokenizer)
        processor = kit.offline_processor(tokenizer, config)
        kit.apply_image_settings(processor, config, model_cfg)
        width, height = kit.planning_image(processor)
        enc = self.family.generation_inputs(processor, [Image.new("RGB", (width, height))], model_cfg.prompt)
        layout = self.family.layout(processor, model_cfg.prompt)
        image_id = self._image_token_id(processor)
        ids = enc["input_ids"][0]
        crops, per_crop = self._vision_sequence(enc)
        return Geometry(
            prefix_tokens=int(enc["attention_mask"][0].sum()),
            image_tokens=int((ids == image_id).sum()) if image_id is not None else 0,
            end_tokens=len(layout.end_ids),
            crops=crops,
            vision_tokens=per_crop,
            image_size=(width, height),
        )

    def _image_token_id(self, processor: Any) -> int | None:
        tok = processor.tokenizer
        for owner in (tok, processor):
            token = getattr(owner, "image_token", None)
            if token is not None:
                return tok.convert_tokens_to_ids(getattr(token, "content", token))
        return None

    def _vision_sequence(self, enc: Any) -> tuple[int, int]:
        """(passes, tokens per pass) through the vision encoder, from the processor's pixel tensor."""
        pixels = enc["pixel_values"]
        v = self.config.vision_config
        patch = v.patch_size
        if "image_grid_thw" in enc:  # Qwen: one pass over all patches of the image
            return 1, int(enc["image_grid_thw"][0].prod())
        side_h, side_w = pixels.shape[-2], pixels.shape[-1]
        crops = int(pixels[0].shape[0]) if pixels.dim() == 5 else 1
        if "pixel_attention_mask" in enc:  # Idefics3: padded tiles do not count
            crops = int(enc["pixel_attention_mask"][0].flatten(1).any(-1).sum())
        tokens = (side_h // patch) * (side_w // patch)
        model_type = v.model_type
        if model_type in ("clip_vision_model", "instructblip_vision_model", "blip_2_vision_model"):
            tokens += 1  # the class token
        return crops, tokens

    def prefix_tokens(self, model_cfg: Any) -> int:
        """Tokens before the caption (image, template, prompt) for the planning image."""
        return self.geometry(model_cfg).prefix_tokens

    def end_tokens(self, model_cfg: Any) -> int:
        """Tokens after a caption that ends (end of turn, EOS)."""
        return self.geometry(model_cfg).end_tokens

    # --- memory -----------------------------------------------------------------------------

    def activation_bytes(
        self, trainable: Trainable, model_cfg: Any, e: ActDtypes, b: int, s: int, mixed_precision: str = "no"
    ) -> tuple[int, int]:
        """(activations kept for backward, logits/loss peak) for micro-batch ``b`` at length ``s``.

        With gradient checkpointing each checkpointed layer keeps only its input and one layer's
        activations are rebuilt at a time during backward. The logits at the start of backward: the
        lm_head output, the fp32 log-probabilities and their gradient (as BLIP-2's spec counts them).
        """
        d = self.lm
        comps = trainable.grad_components
        ckpt = model_cfg.gradient_checkpointing
        r = model_cfg.peft.r
        lora_dropout = model_cfg.peft.dropout if model_cfg.peft.method in ("lora", "dora", "rslora") else 0.0
        lm_targets = _per_layer(
            [x for x in trainable.adapter_targets if component(x[0], self.family) == "lm"], d.layers
        )
        t = b * s
        # The adapters' input is cast to their fp32 unless it is fp32 already (fp32 weights, no autocast).
        shared = lora_dropout == 0 and e.lora == e.lin == 4
        upstream = bool(comps & {"projection", "vision", "qformer"})
        total = 0
        if comps:  # anything trains: the loss's gradient goes through the whole LM
            layer = decoder_layer_bytes(d, b, s, e)
            adapters = lora_bytes(lm_targets, t, e, r, lora_dropout, shared, False)
            if model_cfg.full_finetune:
                layer += 4 * e.lin * t * d.hidden  # trained linears keep their inputs too
            if ckpt:
                total += d.layers * e.res * t * d.hidden + layer + adapters
            else:
                total += d.layers * (layer + adapters)
                if not upstream:
                    # The embeddings need no gradient: the first layer's first norm keeps nothing,
                    # nor do the dropouts of the adapters reading it.
                    total -= (e.res if d.layer_norm else 4) * t * d.hidden + 4 * t
                    total -= adapters - lora_bytes(lm_targets, t, e, r, lora_dropout, shared, True)
            total += 4 * t * d.hidden + 4 * t  # final norm
            total += 2 * e.attn * s * d.head_dim  # rotary cos / sin, shared by the layers
        if upstream:
            total += self._vision_side_bytes(trainable, model_cfg, b)
        autocast = mixed_precision in ("fp16", "bf16")
        if comps and autocast:
            total += autocast_copy_bytes(d, trainable, model_cfg)
        logits = 0
        if comps:
            # The lm_head is a plain Linear (never quantised): its output has autocast's dtype, or
            # its weight's (``e.lin`` is the bitsandbytes layers' output, the fp32 stream under QLoRA).
            head = 2 if autocast else (4 if model_cfg.quantization != "none" else e.lin)
            logits = int((head + 4 + 4 + 4) * t * d.vocab)
            if d.final_softcap:  # the tanh of the capped logits, kept by the forward
                total += head * t * d.vocab
        return int(total), logits

    def _vision_side_bytes(self, trainable: Trainable, model_cfg: Any, b: int) -> int:
        """What the vision tower and projector keep when a gradient reaches them."""
        g = self.geometry(model_cfg)
        v = self.dims.vision
        comps = trainable.grad_components
        vis_e = 4 if model_cfg.precision == "fp32" or model_cfg.quantization != "none" else 2
        n = g.crops * g.vision_tokens
        total = 0
        lm_tokens = g.image_tokens or getattr(self.config, "num_query_tokens", 0)
        # The projector's input and hidden activation.
        total += vis_e * b * lm_tokens * (self.dims.projector_in + self.dims.projector_hidden)
        if "qformer" in self.family.parts and comps & {"qformer", "vision"}:
            total += self._qformer_bytes(trainable, model_cfg, b, n, g)
        if "vision" in comps:
            trains = model_cfg.train_vision or model_cfg.full_finetune
            layer = encoder_layer_saved_bytes(b, n, v.hidden, v.ffn, v.heads, vis_e, trains)
            if v.gated:
                layer += 2 * vis_e * b * n * v.ffn  # the up projection and the product
            if v.rms_norm:  # two norms keeping fp32 copies instead of inputs in the weight dtype
                layer += 2 * (4 - vis_e) * b * n * v.hidden
            targets = _per_layer(
                [x for x in trainable.adapter_targets if component(x[0], self.family) == "vision"], v.layers
            )
            lora_dropout = (
                model_cfg.peft.dropout if model_cfg.peft.method in ("lora", "dora", "rslora") else 0.0
            )
            e = ActDtypes(vis_e, vis_e, vis_e, 4, 4, 4)
            layer_lora = lora_bytes(targets, b * n, e, model_cfg.peft.r, lora_dropout, False, False)
            first_lora = lora_bytes(targets, b * n, e, model_cfg.peft.r, lora_dropout, False, True)
            if model_cfg.gradient_checkpointing:
                total += v.layers * vis_e * b * n * v.hidden + layer + layer_lora
            else:
                # The first layer's input (the patch embeddings) needs no gradient unless the tower
                # trains whole: its first norm keeps nothing, nor its attention inputs' dropouts.
                total += v.layers * (layer + layer_lora)
                if not trains:
                    total -= vis_e * b * n * v.hidden + 2 * vis_e * b * n + layer_lora - first_lora
        return int(total)

    def _qformer_bytes(self, trainable: Trainable, model_cfg: Any, b: int, n: int, g: Geometry) -> int:
        """InstructBLIP's Q-Former (fp32, as BLIP-2's spec counts it): its layers over the query and
        instruction tokens, the cross-attention keys and values over the image tokens."""
        q = self.config.qformer_config
        tokens = self.config.num_query_tokens + max(g.prefix_tokens - self.config.num_query_tokens, 0)
        trains = "qformer" in trainable.grad_components and (
            model_cfg.train_qformer or model_cfg.full_finetune
        )
        layer = encoder_layer_saved_bytes(
            b, tokens, q.hidden_size, q.intermediate_size, q.num_attention_heads, 4, trains
        )
        cross = q.num_hidden_layers // max(q.cross_attention_frequency, 1)
        cross_kv = cross * 2 * 4 * b * n * q.hidden_size + 4 * b * n * self.dims.vision.hidden
        return int(q.num_hidden_layers * layer + cross_kv)

    # --- time -------------------------------------------------------------------------------

    def flops(self, trainable: Trainable, model_cfg: Any, s: float) -> Flops:
        """FLOPs of one training sample at mean LM length ``s`` (see BLIP-2's spec for the rules:
        frozen linears run backward only for the input gradient, nothing runs backward below the
        lowest trainable part)."""
        g = self.geometry(model_cfg)
        v, d = self.dims.vision, self.lm
        comps = trainable.grad_components
        n = g.vision_tokens
        v_ffn = v.ffn * (3 if v.gated else 2)
        vision = g.crops * (n * v.patch_flops + encoder_fwd_flops(n, v.hidden, v_ffn // 2, v.layers))
        lm_image = g.image_tokens or getattr(self.config, "num_query_tokens", 0)
        connector = 2 * lm_image * self.dims.projector_in * (self.dims.projector_hidden or d.hidden)
        if self.dims.projector_hidden:
            connector += 2 * lm_image * self.dims.projector_hidden * d.hidden
        h, f, L = d.hidden, d.ffn, d.layers
        q_kv = d.heads * d.head_dim + 2 * d.kv_heads * d.head_dim
        per_token = 2 * (h * q_kv + d.heads * d.head_dim * h + (3 if d.gated else 2) * h * f)
        layers_fwd = L * (s * per_token + 4 * s * s * d.heads * d.head_dim)
        lm_fwd = layers_fwd + 2 * s * h * d.vocab
        lm_bwd = conn_bwd = vis_bwd = 0.0
        if comps:
            lm_bwd = lm_fwd + L * 4 * s * s * d.heads * d.head_dim
            for _, fin, fout in trainable.adapter_targets:
                lm_bwd += 3 * 2 * model_cfg.peft.r * (fin + fout) * s
            if model_cfg.full_finetune:
                lm_bwd += layers_fwd
        if comps & {"projection", "vision", "qformer"}:
            conn_bwd = 2 * connector
        if "vision" in comps:
            vis_bwd = 2 * vision
        recompute = layers_fwd if model_cfg.gradient_checkpointing and comps else 0.0
        return Flops(vision, connector, lm_fwd, lm_bwd, conn_bwd, vis_bwd, recompute)


def component(name: str, family: Any) -> str:
    from medcap.plan.memory import component as part_of

    return part_of(name, family)


def _per_layer(targets: list[tuple[str, int, int]], layers: int) -> list[tuple[str, int, int]]:
    """The LoRA targets of one layer: every layer of a stack carries the same ones, so the targets of
    the whole stack divided by its layer count (by leaf name, with their widths)."""
    if not targets or layers == 0:
        return []
    leaves: dict[str, tuple[int, int]] = {}
    counts: dict[str, int] = {}
    for name, fin, fout in targets:
        leaf = name.rsplit(".", 1)[-1]
        leaves[leaf] = (fin, fout)
        counts[leaf] = counts.get(leaf, 0) + 1
    out: list[tuple[str, int, int]] = []
    for leaf, (fin, fout) in sorted(leaves.items()):
        out += [(leaf, fin, fout)] * max(1, round(counts[leaf] / layers))
    return out


__all__ = [
    "DecoderDims",
    "EncoderDims",
    "Geometry",
    "VlmDims",
    "VlmPlanSpec",
    "decoder_dims_of",
    "vision_dims_of",
]
