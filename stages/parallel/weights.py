"""Exact weight sizes of the DiT, T5 encoder and VAE from their configs (no torch).

Every count mirrors the reference module layout tensor by tensor (the DiT: reference
``VideoDiTModel`` / ``TransformerLayer`` in ``inference/model/dit/dit_module.py``; T5 v1.1
encoder: transformers ``T5EncoderModel`` with gated-GELU; VAE: reference ``ViTVAE``) and is
checked against the golden manifests (``shared/golden/dit_manifest_*.json``,
``vae_manifest.json``) and meta-device models in ``tests/unit/test_fit_weights.py``.

Dtypes at run time (what sits in GPU memory): embedders, RoPE bands and the final linear
are float32; layer weights are ``params_dtype``; the reference ``_high_precision_promoter``
turns ``q_layernorm``, ``k_layernorm``, ``self_attn_post_norm``, ``mlp_post_norm`` and the
final LayerNorm into float32 (``promoted=True``). With ``fp8_quant`` the seven big linears
(q, qx, k, v, linear_proj, fc1, fc2) of layers 1 .. num_layers-2 are e4m3 (1 byte) with
float32 scales (per-tensor: ``weight_scale`` (1,), ``input_scale`` (in,); per-channel
``linear_proj``/``fc2``: ``weight_scale`` (1,), ``input_scale`` (1,), ``smooth_scale`` (1, in)).
"""

from __future__ import annotations

from collections import Counter

from stages.config import DiTConfig, TextEncoderConfig, VaeConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}
F32, FP8 = "float32", "float8_e4m3fn"
TIMESTEP_FREQ_DIM = 256  # reference TimestepEmbedder.frequency_embedding_size
T5_RELATIVE_BUCKETS = 32  # T5 relative_attention_num_buckets

Counts = Counter  # dtype name -> number of elements


def nbytes(counts: Counts) -> int:
    """Bytes of a dtype -> element-count table."""
    return sum(DTYPE_BYTES[dtype] * n for dtype, n in counts.items())


def is_quantized_layer(cfg: DiTConfig, layer: int) -> bool:
    """Reference rule: fp8 linears in every layer except the first and the last."""
    return cfg.fp8_quant and 0 < layer < cfg.num_layers - 1


def _linear(counts: Counts, n_in: int, n_out: int, dtype: str, fp8: bool, per_channel: bool) -> None:
    if not fp8:
        counts[dtype] += n_in * n_out
        return
    counts[FP8] += n_in * n_out
    counts[F32] += 1 + (1 + n_in if per_channel else n_in)  # weight_scale + input_scale (+ smooth_scale)


def dit_layer_counts(cfg: DiTConfig, layer: int, promoted: bool = True) -> Counts:
    """Elements per dtype of transformer layer ``layer`` (reference ``TransformerLayer``)."""
    d, dh, f = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    q_size, kv_size = cfg.num_attention_heads * dh, cfg.num_query_groups * dh
    cond = int(d * cfg.cond_hidden_ratio)
    gates = int(d * cfg.cond_gating_ratio * 2)
    dt, fp8 = cfg.params_dtype, is_quantized_layer(cfg, layer)
    hi = F32 if promoted else dt
    c: Counts = Counter()
    c[dt] += gates * cond + gates  # ada_modulate_layer.proj.0 (weight + bias)
    c[dt] += 2 * d  # linear_qkv.layer_norm
    for n_out in (q_size, q_size, kv_size, kv_size):  # q, qx, k, v
        _linear(c, d, n_out, dt, fp8, per_channel=False)
    c[dt] += int(d * cfg.xattn_cond_hidden_ratio) * 2 * kv_size  # linear_kv_xattn
    _linear(c, 2 * q_size, d, dt, fp8, per_channel=True)  # linear_proj
    c[hi] += 2 * 2 * dh  # q_layernorm, k_layernorm (promoted)
    c[dt] += 2 * 2 * dh  # q_layernorm_xattn, k_layernorm_xattn
    c[hi] += 2 * d  # self_attn_post_norm (promoted)
    c[dt] += 2 * d  # mlp.layer_norm
    _linear(c, d, 2 * f if cfg.gated_linear_unit else f, dt, fp8, per_channel=False)  # fc1
    _linear(c, f, d, dt, fp8, per_channel=True)  # fc2
    c[hi] += 2 * d  # mlp_post_norm (promoted)
    return c


def dit_shared_counts(cfg: DiTConfig, promoted: bool = True) -> Counts:
    """Elements per dtype outside the layer stack: embedders, RoPE bands, final LayerNorm and
    final linear. The reference builds these on every pipeline stage."""
    d, cap = cfg.hidden_size, cfg.caption_channels
    cond = int(d * cfg.cond_hidden_ratio)
    p, pt = cfg.patch_size, cfg.t_patch_size
    c: Counts = Counter()
    c[F32] += d * cfg.in_channels * pt * p * p  # x_embedder (Conv3d, no bias)
    c[F32] += TIMESTEP_FREQ_DIM * cond + cond + cond * cond + cond  # t_embedder.mlp.{0,2}
    c[F32] += cfg.caption_max_length * cap  # y_embedder.null_caption_embedding
    xattn = int(d * cfg.xattn_cond_hidden_ratio)
    c[F32] += cap * xattn + xattn + cap * cond + cond  # y_proj_xattn, y_proj_adaln
    c[F32] += cfg.kv_channels // 8  # rope.bands
    c[F32 if promoted else cfg.params_dtype] += 2 * d  # videodit_blocks.final_layernorm
    c[F32] += d * p * p * pt * cfg.out_channels  # final_linear.linear (no bias)
    return c


def pp_stage_layers(num_layers: int, pp_size: int) -> list[range]:
    """Consecutive layers of each pipeline stage (reference ``_get_layer_offset``:
    ``num_layers // pp_size`` layers per pipeline stage; the caller checks divisibility)."""
    per = num_layers // pp_size
    return [range(s * per, (s + 1) * per) for s in range(pp_size)]


def dit_pp_stage_counts(cfg: DiTConfig, layers: range, promoted: bool = True) -> Counts:
    """Elements per dtype held by a pipeline stage owning ``layers`` (shared parts included)."""
    c = dit_shared_counts(cfg, promoted)
    for layer in layers:
        c.update(dit_layer_counts(cfg, layer, promoted))
    return c


def dit_weight_bytes(cfg: DiTConfig, promoted: bool = True) -> int:
    """Bytes of the whole DiT (one copy, all layers)."""
    return nbytes(dit_pp_stage_counts(cfg, range(cfg.num_layers), promoted))


def t5_encoder_params(cfg: TextEncoderConfig) -> int:
    """Parameters of a T5 v1.1 encoder (gated-GELU FFN, RMS norms without bias, relative
    position bias in block 0, shared token embedding counted once)."""
    d, inner, ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    block = 4 * d * inner + d + 3 * d * ff + d  # q k v o, norm, wi_0 wi_1 wo, norm
    return cfg.vocab_size * d + cfg.num_layers * block + T5_RELATIVE_BUCKETS * cfg.num_heads + d


def vae_params(cfg: VaeConfig) -> int:
    """Parameters of the reference transformer VAE (``ViTVAE``, encoder + decoder; decoder
    head = optional ``final_proj`` + ``final_norm``, then ``Conv3d(unpatch -> 3, k=3)``).

    Raises:
        ValueError: ``conv_last_layer=False`` (not supported by :mod:`stages.vae` either).
    """
    if not cfg.conv_last_layer:
        raise ValueError("VaeConfig.conv_last_layer: only conv_last_layer=True is supported")
    d, p, pl = cfg.embed_dim, cfg.patch_size, cfg.patch_length
    hidden = int(cfg.mlp_ratio * d)
    norm1 = 0 if cfg.ln_in_attn else 2 * d
    block = norm1 + 3 * d * d + (3 * d if cfg.qkv_bias else 0) + d * d + d + 2 * d + 2 * hidden * d + hidden + d
    cls = 1 if cfg.with_cls_token else 0
    tokens = (cfg.video_size // p) ** 2 * (cfg.video_length // pl) + cls
    trunk = cls * d + tokens * d + cfg.depth * block + 2 * d  # cls, pos_embed, blocks, norm
    z_out = cfg.z_chans * (2 if cfg.double_z else 1)
    encoder = trunk + d * cfg.in_chans * pl * p * p + d + z_out * d + z_out  # patch_embed, last_layer
    volume = p * p * pl
    head, unpatch = 0, d // volume
    if cfg.use_final_proj:
        unpatch = 4
        head = d * 4 * volume + 4 * volume + 2 * 4 * volume  # final_proj, final_norm
    head += 3 * unpatch * 27 + 3  # last_layer Conv3d(unpatch -> 3, kernel 3)
    decoder = trunk + cfg.z_chans * d + d + head  # proj_in
    return encoder + decoder
