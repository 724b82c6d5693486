"""What ``medcap plan`` needs to know about BLIP-2: its layer dimensions, what autograd keeps for
its backward pass (ViT, Q-Former with cross-attention to the image tokens, the language model) and
its FLOPs per training sample. The generic per-layer formulas are in ``medcap.plan.layers``; the
formulas were checked against what autograd really saves (``tests/plan/test_plan.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medcap.plan.layers import Flops, decoder_layer_saved_bytes, encoder_fwd_flops, encoder_layer_saved_bytes
from medcap.plan.memory import ActDtypes, Trainable

if TYPE_CHECKING:
    from medcap.config.model import ModelConfig


@dataclass
class Dims:
    """Layer dimensions the activation and FLOP formulas need."""

    # Vision tower (ViT)
    vit_layers: int
    vit_hidden: int
    vit_ffn: int
    vit_heads: int
    vit_tokens: int  # patches + CLS
    vit_patch_flops: int  # one image through the patch embedding (multiply-adds x 2)
    # Q-Former
    qf_layers: int
    qf_hidden: int
    qf_ffn: int
    qf_heads: int
    qf_cross_every: int
    num_query_tokens: int
    # Language model (OPT decoder only for the activation formula; T5 is approximated)
    lm_layers: int
    lm_hidden: int
    lm_ffn: int
    lm_heads: int
    vocab: int
    lm_dropout: float
    qf_dropout: float
    decoder_only: bool


@dataclass
class Components:
    """Parameter counts of the model's parts (from the meta model)."""

    vision: int
    qformer: int  # incl. query tokens
    projection: int
    lm: int  # incl. embeddings
    lm_embeddings: int


def dims_of(model: Any, decoder_only: bool) -> Dims:
    cfg = model.config
    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config
    patches = (v.image_size // v.patch_size) ** 2
    if decoder_only:  # OPT
        lm_layers, lm_hidden, lm_ffn, lm_heads = (
            t.num_hidden_layers,
            t.hidden_size,
            t.ffn_dim,
            t.num_attention_heads,
        )
        lm_dropout = t.dropout
    else:  # T5: encoder + decoder layers, d_ff; approximated as one stack of both
        lm_layers, lm_hidden, lm_ffn, lm_heads = (
            t.num_layers + t.num_decoder_layers,
            t.d_model,
            t.d_ff,
            t.num_heads,
        )
        lm_dropout = t.dropout_rate
    return Dims(
        vit_layers=v.num_hidden_layers,
        vit_hidden=v.hidden_size,
        vit_ffn=v.intermediate_size,
        vit_heads=v.num_attention_heads,
        vit_tokens=patches + 1,
        vit_patch_flops=2 * patches * 3 * v.patch_size**2 * v.hidden_size,
        qf_layers=q.num_hidden_layers,
        qf_hidden=q.hidden_size,
        qf_ffn=q.intermediate_size,
        qf_heads=q.num_attention_heads,
        qf_cross_every=q.cross_attention_frequency,
        num_query_tokens=cfg.num_query_tokens,
        lm_layers=lm_layers,
        lm_hidden=lm_hidden,
        lm_ffn=lm_ffn,
        lm_heads=lm_heads,
        vocab=t.vocab_size,
        lm_dropout=float(lm_dropout or 0.0),
        qf_dropout=float(q.hidden_dropout_prob or 0.0),
        decoder_only=decoder_only,
    )


def lora_inputs_per_layer(trainable: Trainable, dims: Dims) -> list[tuple[str, int]]:
    """(module leaf name, input width) of the LoRA targets in ONE language-model layer."""
    lm = [t for t in trainable.adapter_targets if t[0].startswith("language_model.")]
    if not lm or dims.lm_layers == 0:
        return []
    per_layer: dict[str, int] = {}
    for name, fin, _ in lm:
        per_layer[name.rsplit(".", 1)[-1]] = fin
    return sorted(per_layer.items())


def activation_bytes(
    dims: Dims,
    trainable: Trainable,
    model_cfg: ModelConfig,
    e: ActDtypes,
    b: int,
    s: int,
    mixed_precision: str = "no",
) -> tuple[int, int]:
    """(activations kept for backward, logits/loss peak) in bytes for micro-batch ``b`` at length ``s``.

    Gradients flow from the loss down to the lowest trainable part: through the LM whenever anything
    trains, through the Q-Former when it or the vision tower trains, through the ViT only when it
    trains. With gradient checkpointing each checkpointed layer keeps only its input (res x b*s*h)
    and one layer's activations are rebuilt at a time during backward.

    Logits at the start of backward: the lm_head output (lin bytes), the fp32 log-probabilities the
    cross-entropy keeps, their fp32 gradient and the gradient of the logits in fp32 and in the lm_head
    dtype: (lin + 4 + 4 + 4 + lin) x b*s*vocab, minus one lin for the logits freed after the loss.
    """
    comps = trainable.grad_components
    ckpt = model_cfg.gradient_checkpointing
    lora_layer = lora_inputs_per_layer(trainable, dims)
    r = model_cfg.peft.r
    lora_dropout = model_cfg.peft.dropout if model_cfg.peft.method in ("lora", "dora", "rslora") else 0.0
    total = 0
    if comps:  # anything trains: the loss's gradient goes through the whole LM
        full_lm = dims.lm_layers * decoder_layer_saved_bytes(
            b, s, dims.lm_hidden, dims.lm_ffn, dims.lm_heads, e, dims.lm_dropout, lora_layer, r, lora_dropout
        )
        if "lm" in comps and dims.lm_layers and model_cfg.full_finetune:
            # Fully trained LM linears keep their inputs too (about 3 more b*s*h tensors and fc2's).
            full_lm += dims.lm_layers * 3 * e.lin * b * s * dims.lm_hidden
        if ckpt:
            per_layer = full_lm // max(dims.lm_layers, 1)
            total += dims.lm_layers * e.res * b * s * dims.lm_hidden + per_layer
        else:
            total += full_lm
            if not comps & {"projection", "qformer", "vision"}:
                # The first layer's input (the frozen embeddings) needs no gradient: its first layer
                # norm keeps nothing, nor do the LoRA dropouts reading that norm's output.
                tokens = b * s
                total -= e.res * tokens * dims.lm_hidden + 8 * tokens
                if lora_dropout > 0:
                    total -= sum(
                        e.mask_lora * tokens * d
                        for name, d in lora_layer
                        if name in ("q_proj", "k_proj", "v_proj")
                    )
        total += e.res * b * s * dims.lm_hidden  # final layer norm input
        autocast_dtype = {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision)
        if autocast_dtype and model_cfg.quantization == "none" and model_cfg.precision != autocast_dtype:
            # Autocast casts every frozen weight to 16 bits for its matmul and autograd keeps that copy
            # (the input's gradient needs it): a 16-bit copy of the LM's linears and lm_head per step.
            lm_linear = dims.lm_layers * (4 * dims.lm_hidden**2 + 2 * dims.lm_hidden * dims.lm_ffn)
            total += 2 * (lm_linear + dims.vocab * dims.lm_hidden)
    vis_e = 4 if model_cfg.precision == "fp32" or model_cfg.quantization != "none" else 2
    if comps & {"qformer", "vision"}:
        nq = dims.num_query_tokens
        qf_train = "qformer" in comps
        layer = encoder_layer_saved_bytes(
            b, nq, dims.qf_hidden, dims.qf_ffn, dims.qf_heads, 4, qf_train
        )  # the Q-Former runs in fp32
        cross = dims.qf_layers // max(dims.qf_cross_every, 1)
        # Cross-attention keys and values over the image tokens (and their input, kept once).
        cross_kv = (
            cross * 2 * 4 * b * dims.vit_tokens * dims.qf_hidden + 4 * b * dims.vit_tokens * dims.vit_hidden
        )
        qf_total = dims.qf_layers * layer + cross_kv
        total += (
            qf_total
            if not ckpt
            else qf_total // max(dims.qf_layers, 1) + dims.qf_layers * 4 * b * nq * dims.qf_hidden
        )
    if "vision" in comps:
        layer = encoder_layer_saved_bytes(
            b, dims.vit_tokens, dims.vit_hidden, dims.vit_ffn, dims.vit_heads, vis_e, True
        )
        if ckpt:
            total += dims.vit_layers * vis_e * b * dims.vit_tokens * dims.vit_hidden + layer
        else:
            total += dims.vit_layers * layer
    logits = 0
    if comps:
        logit_elems = b * s * dims.vocab
        logits = int((e.lin + 4 + 4 + 4) * logit_elems)
    return int(total), logits


def train_flops_per_sample(dims: Dims, trainable: Trainable, model_cfg: ModelConfig, s: float) -> Flops:
    """FLOPs for one sample of LM length ``s``.

    Why not 6 x N: that rule assumes every weight gets a weight gradient. With LoRA the base weights are
    frozen, so the backward pass through a frozen linear computes only the input gradient (one matmul
    of the forward's size, not two), and nothing at all runs backward below the lowest trainable part
    (the frozen ViT and Q-Former only run forward). So:

    * forward: 2 x (multiply-adds) of every matmul: ViT on 257 tokens, Q-Former on 32 queries (cross-
      attention keys/values on the image tokens), the projection, the LM on ``s`` tokens incl. the
      attention products (4 x s^2 x h per layer) and the lm_head (2 x s x h x vocab);
    * backward through the LM: input gradients = the LM forward again, plus weight gradients of
      trained weights (LoRA: 2 x 2 x r x (in + out) x s per target, negligible; full training: the
      forward again), attention backward = 2 x its forward;
    * with gradient checkpointing, the LM layers' forward runs once more (counted in ``hardware``).
    """
    comps = trainable.grad_components
    vision = dims.vit_patch_flops + encoder_fwd_flops(
        dims.vit_tokens, dims.vit_hidden, dims.vit_ffn, dims.vit_layers
    )
    nq, hq = dims.num_query_tokens, dims.qf_hidden
    cross = dims.qf_layers // max(dims.qf_cross_every, 1)
    qformer = encoder_fwd_flops(nq, hq, dims.qf_ffn, dims.qf_layers)
    qformer += cross * (
        2 * nq * 2 * hq * hq + 2 * dims.vit_tokens * 2 * dims.vit_hidden * hq + 4 * nq * dims.vit_tokens * hq
    )
    qformer += 2 * nq * hq * dims.lm_hidden  # language projection
    h, f, L = dims.lm_hidden, dims.lm_ffn, dims.lm_layers
    layers_fwd = L * (2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h)
    lm_fwd = layers_fwd + 2 * s * h * dims.vocab
    lm_bwd = qf_bwd = vis_bwd = 0.0
    if comps:
        attn = L * 4 * s * s * h
        lm_bwd = lm_fwd + attn  # input grads (= forward) + attention backward's second product
        for _, fin, fout in trainable.adapter_targets:
            lm_bwd += 3 * 2 * model_cfg.peft.r * (fin + fout) * (s if _.startswith("language_model.") else nq)
        if model_cfg.full_finetune:
            lm_bwd += layers_fwd
    if comps & {"qformer", "vision"}:
        qf_bwd = 2 * qformer if "qformer" in comps else qformer
    if "vision" in comps:
        vis_bwd = 2 * vision
    recompute = layers_fwd if model_cfg.gradient_checkpointing and comps else 0.0
    return Flops(vision, qformer, lm_fwd, lm_bwd, qf_bwd, vis_bwd, recompute)


@dataclass
class Blip2PlanSpec:
    """The planner's view of one BLIP-2 model (``family.plan_spec(meta_model)``)."""

    dims: Dims

    @classmethod
    def of(cls, model: Any, family: Any) -> Blip2PlanSpec:
        return cls(dims_of(model, family.decoder_only))

    @property
    def image_tokens(self) -> int:
        """Tokens the image takes in the language model's sequence (the query tokens)."""
        return self.dims.num_query_tokens

    def prefix_tokens(self, model_cfg: Any) -> int:
        """Tokens before the caption: the query tokens, BOS and the prompt (offline tokenizer)."""
        from medcap.model.tokenizer import offline_tokenizer

        prompt = model_cfg.prompt
        n = (
            len(offline_tokenizer("bos-first")(prompt, add_special_tokens=False)["input_ids"])
            if prompt
            else 0
        )
        return self.dims.num_query_tokens + 1 + n

    def end_tokens(self, model_cfg: Any) -> int:
        """The EOS after a caption that ends."""
        return 1

    def activation_bytes(
        self,
        trainable: Trainable,
        model_cfg: ModelConfig,
        e: ActDtypes,
        b: int,
        s: int,
        mixed_precision: str = "no",
    ) -> tuple[int, int]:
        """(activations kept for backward, logits/loss peak) for micro-batch ``b`` at length ``s``."""
        return activation_bytes(self.dims, trainable, model_cfg, e, b, s, mixed_precision)

    def flops(self, trainable: Trainable, model_cfg: ModelConfig, s: float) -> Flops:
        """FLOPs of one training sample at mean LM length ``s``."""
        return train_flops_per_sample(self.dims, trainable, model_cfg, s)
