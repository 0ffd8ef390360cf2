"""Per-GPU token geometry, activation working set and KV bytes of one DiT engine step.

Notation (per GPU rank): D hidden_size, F ffn_hidden_size, Q = num_attention_heads x
kv_channels, Dh kv_channels, G num_query_groups, a bytes per activation element
(``params_dtype``; fp8 checkpoints still compute in bfloat16), cw chunk_width, W window_size.

Token geometry (DESIGN.md section 3; reference ``generate_per_chunk``):

* tokens per chunk ``tpc = (cw / t_patch) * (H / 8 / p) * (W_px / 8 / p)``.
* chunks in the largest DiT call of one job: ``W + 1`` (the just-cleaned chunk re-forwarded
  at clean_t, reference ``fwd_extra_1st_chunk``), ``+ 1`` for distilled models (the
  self-only copy of the nearly clean chunk, reference ``distill_nearly_clean_chunk``). With
  ``batch_cfg`` the cfg_number 3 branches share one call: ``2 (W + 1) + W`` chunks
  (cond_prev_text and cond_prev over the window, uncond over the W noisy chunks alone,
  reference ``forward_3cfg``); otherwise branches run one after another (the reference and
  :mod:`cluster.engine.runner`). A V2V prefix-extraction forward holds all whole prefix
  chunks (one branch); the largest call is the larger of the two. Times ``jobs_per_forward``.
* Ulysses context parallelism splits tokens evenly: ``s = ceil(S / cp)`` per rank; attention
  runs on all S tokens with ``Q / cp`` query heads; K/V heads per rank ``G / cp`` when cp
  divides G, else 1 (heads replicated ``cp / G`` times, reference ``repeat_interleave`` in
  ``context_parallel.py``).

KV per job (DESIGN.md "KV cache"): only the last ``ring = max(noise2clean_kvrange) - 1``
clean chunks are ever read. Per chunk and layer a rank stores ``tpc * 2 * G_rank * Dh * a``
bytes. Two layouts (``kv_layout``):

* ``contiguous`` (reference ``InferenceParams``: one buffer per job holding [ring | window]
  per layer, attention reads it in place): ``ring + W`` chunks per job;
* ``ring`` (:class:`stages.dit.kv_cache.ChunkKVCache`, the engine today): ``ring + 1``
  chunks per job (the ring plus the chunk being written before the oldest is released);
  the window's K/V live only inside a layer (``carried`` below), and every forward
  gathers the ring (activation term "KV history gather").

A V2V prefix extraction writes all ``prefix_chunks`` at once, so a job may hold that many.
Plus the job's latents on the device (``(W + 1) * 16 * cw * h * w`` float32).

Activation working set (inference: no autograd, so only one layer's temporaries are live;
terms modelled on :class:`stages.dit.layers.TransformerLayer`):

* per token, held across the layer (``carried``): residual ``D a``, self- and
  cross-attention outputs ``2 Q a``, window K/V ``2 G Dh a``;
* plus the largest phase: linear_proj (head-interleaved copy ``2 Q a``, its float32 input
  ``2 Q 4``, float32 output ``D 4``, the reference autocast) | fc1 (LayerNorm out ``D a`` +
  fc1 out) | activation (fc1 out + ``2F a`` for GLU's silu and product, ``F a`` for GELU) |
  fp8 layers: unfused activation quantization of the widest input ``X = max(F, 2Q)``:
  ``X a + 2 X 4`` (:func:`stages.dit.fp8.quantize_activation`);
* per token for the whole forward: the float32 patch embedding ``D 4``, RoPE rows
  ``6 (Dh / 8) 4``, the token->chunk map ``8``;
* captions: ``chunks * L * (C_cap 4 + D 4 + D a)`` (T5 embeddings, ``y_proj_xattn`` output);
* attention kernel: flash (variable length) keeps only the log-sum-exp ``S * Q/cp/Dh * 4``;
  ``dense`` (SDPA with a boolean mask, :class:`stages.dit.attention.SdpaRangeAttention`)
  materialises scores ``(Q/cp/Dh) * S * Sk * a`` plus the mask ``S * Sk`` (Sk = history + S);
* ``ring`` layout (:meth:`stages.dit.kv_cache.ChunkKVCache.history` concatenates a job's
  cached K/V for all layers, then each layer concatenates [history | window]): the ring copy
  for every layer of the stage plus one layer's [history | window];
* Ulysses all-to-all receive buffers ``s (3 Q + 2 max(G, cp) Dh) a`` (q, qx, output, k, v);
* pipeline send/receive buffers ``2 s D a``; with ``kv_offload`` a double-buffered staging
  copy of one layer's K/V of the job's kept chunks (per layout above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.config import ModelConfig
from stages.parallel.weights import DTYPE_BYTES

LATENT_CHANNELS = 16
LATENT_BYTES = 4  # latents are float32
INDEX_BYTES = 8  # int64


@dataclass(frozen=True)
class StepShape:
    """Token geometry of one engine step on one GPU rank (see the module docstring).

    Attributes:
        tokens_per_chunk: tpc.
        chunks_per_forward: chunks in the largest DiT call (all jobs and batched branches).
        tokens_per_forward: S, all ranks together.
        tokens_per_rank: s = ceil(S / cp_size).
        history_chunks: clean chunks a job keeps in its KV ring (max(noise2clean_kvrange) - 1).
        kv_chunks_per_job: chunks of K/V a job holds (layout dependent, module docstring).
        kv_heads_per_rank: K/V heads each rank stores.
        q_heads_per_rank: query heads each rank attends with.
        layers_per_stage: DiT layers per pipeline stage.
        act_bytes: bytes per activation / KV element.
    """

    tokens_per_chunk: int
    chunks_per_forward: int
    tokens_per_forward: int
    tokens_per_rank: int
    history_chunks: int
    kv_chunks_per_job: int
    kv_heads_per_rank: int
    q_heads_per_rank: int
    layers_per_stage: int
    act_bytes: int


def step_shape(model: ModelConfig, height: int, width: int, *, cp_size: int, pp_size: int,
               jobs_per_forward: int, batch_cfg: bool, kv_layout: str, prefix_chunks: int = 0) -> StepShape:
    """Geometry of the largest DiT call; the caller validated cp/pp/resolution."""
    dit, smp = model.dit, model.sampling
    f = model.vae_spatial_factor * dit.patch_size
    tpc = (smp.chunk_width // dit.t_patch_size) * (height // f) * (width // f)
    w = smp.window_size
    chunks = 2 * (w + 1) + w if (batch_cfg and smp.cfg_number == 3) else w + 1
    if smp.distill:
        chunks += 1
    chunks = max(chunks, prefix_chunks) * jobs_per_forward
    tokens = chunks * tpc
    groups = dit.num_query_groups
    history = max(smp.noise2clean_kvrange) - 1
    return StepShape(
        tokens_per_chunk=tpc, chunks_per_forward=chunks, tokens_per_forward=tokens,
        tokens_per_rank=math.ceil(tokens / cp_size), history_chunks=history,
        kv_chunks_per_job=max(history + (w if kv_layout == "contiguous" else 1), prefix_chunks),
        kv_heads_per_rank=groups // cp_size if groups % cp_size == 0 else 1,
        q_heads_per_rank=dit.num_attention_heads // cp_size,
        layers_per_stage=dit.num_layers // pp_size, act_bytes=DTYPE_BYTES[dit.params_dtype],
    )


def kv_bytes_per_chunk_layer(model: ModelConfig, shape: StepShape) -> int:
    """K and V of one chunk in one layer on one rank."""
    return shape.tokens_per_chunk * 2 * shape.kv_heads_per_rank * model.dit.kv_channels * shape.act_bytes


def kv_bytes_per_job(model: ModelConfig, shape: StepShape) -> int:
    """KV ring + window of one job for every layer of the stage, on one rank."""
    return shape.kv_chunks_per_job * shape.layers_per_stage * kv_bytes_per_chunk_layer(model, shape)


def latent_bytes_per_job(model: ModelConfig, height: int, width: int) -> int:
    """Float32 latents of a job's window chunks (+ the re-forwarded clean chunk) on the device."""
    smp, f = model.sampling, model.vae_spatial_factor
    return (smp.window_size + 1) * LATENT_CHANNELS * smp.chunk_width * (height // f) * (width // f) * LATENT_BYTES


def layer_peak_per_token(model: ModelConfig, a: int) -> int:
    """Bytes per token live at the peak of one transformer layer (module docstring)."""
    dit = model.dit
    d, f, dh = dit.hidden_size, dit.ffn_hidden_size, dit.kv_channels
    q = dit.num_attention_heads * dh
    carried = d * a + 2 * q * a + 2 * dit.num_query_groups * dh * a
    fc1 = (2 * f if dit.gated_linear_unit else f) * a
    phases = [
        2 * q * a + 2 * q * 4 + d * 4,  # linear_proj in float32
        d * a + fc1,  # fc1
        fc1 + (2 * f if dit.gated_linear_unit else f) * a,  # activation
    ]
    if dit.fp8_quant:
        widest = max(f, 2 * q)
        phases.append(widest * a + 2 * widest * 4)
    return carried + max(phases)


def forward_state_per_token(model: ModelConfig) -> int:
    """Bytes per token held for the whole forward: float32 patch embedding, RoPE rows, chunk map."""
    dit = model.dit
    return dit.hidden_size * 4 + 6 * (dit.kv_channels // 8) * 4 + INDEX_BYTES


def activation_terms(model: ModelConfig, shape: StepShape, *, cp_size: int, pp_size: int,
                     jobs_per_forward: int, attention: str, kv_layout: str, kv_offload: bool) -> dict[str, int]:
    """Named activation terms in bytes for one rank (module docstring gives each formula)."""
    dit, a, s = model.dit, shape.act_bytes, shape.tokens_per_rank
    d, dh = dit.hidden_size, dit.kv_channels
    q = dit.num_attention_heads * dh
    big_s = shape.tokens_per_forward
    hist_tokens = shape.history_chunks * shape.tokens_per_chunk * jobs_per_forward
    terms = {
        "layer peak": s * layer_peak_per_token(model, a),
        "forward state": s * forward_state_per_token(model),
        "captions": shape.chunks_per_forward * dit.caption_max_length * (dit.caption_channels * 4 + d * 4 + d * a),
    }
    if attention == "flash":
        terms["attention (flash lse)"] = big_s * shape.q_heads_per_rank * 4
    else:
        keys = hist_tokens + big_s
        terms["attention (dense scores)"] = shape.q_heads_per_rank * big_s * keys * a + big_s * keys
    layer_kv = kv_bytes_per_chunk_layer(model, shape)
    if kv_layout == "ring" and not kv_offload:
        ring = shape.history_chunks * layer_kv
        window = (shape.chunks_per_forward // jobs_per_forward) * layer_kv
        terms["KV history gather"] = jobs_per_forward * (ring * shape.layers_per_stage + ring + window)
    if kv_offload:
        terms["KV offload staging"] = jobs_per_forward * 2 * shape.kv_chunks_per_job * layer_kv
    if cp_size > 1:
        terms["Ulysses all-to-all"] = s * (3 * q + 2 * max(dit.num_query_groups, cp_size) * dh) * a
    if pp_size > 1:
        terms["pipeline send/recv"] = 2 * s * d * a
    return terms
