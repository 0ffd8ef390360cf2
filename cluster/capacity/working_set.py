"""Per-GPU token geometry and activation working set of one DiT engine step.

Notation (per GPU rank): D hidden_size, F ffn_hidden_size, Q = num_attention_heads x
kv_channels, Dh kv_channels, G num_query_groups, a bytes per activation element
(``params_dtype``; fp8 checkpoints still compute in bfloat16), cw chunk_width, W window_size,
R = max(noise2clean_kvrange) (chunks of keys one query chunk reads at most).

Token geometry (DESIGN.md section 3; reference ``generate_per_chunk``):

* tokens per chunk ``tpc = (cw / t_patch) * (H / 8 / p) * (W_px / 8 / p)``
  (:meth:`stages.config.DiTConfig.tokens_per_chunk`).
* chunks of one job in one DiT call: ``W + 1`` (the just-cleaned chunk re-forwarded at
  clean_t, reference ``fwd_extra_1st_chunk``), ``+ 1`` for distilled models (the self-only
  copy of the nearly clean chunk, reference ``distill_nearly_clean_chunk``). With
  ``batch_cfg`` (the engine's default, :mod:`cluster.engine.runner`) the cfg_number 3
  branches share one call: ``2 (W + 1) + W`` chunks (``main`` and ``text`` over the window,
  ``uncond`` over the W noisy chunks alone, :mod:`cluster.engine.windows`); otherwise one call
  per branch kind. A V2V prefix-extraction forward holds all whole prefix chunks (one
  branch); the largest call is the larger of the two. Times the j jobs of the step (the engine
  packs every active job into one forward; jobs submitted together extract their prefixes in
  the same step): ``j max(c, P)`` for jobs of c chunks and P prefix chunks.
* ``max_forward_tokens`` B (:class:`cluster.engine.runner.BatchRunner`): the step's windows
  (``main``, ``text``, ``uncond`` per job, never split) are packed in order into forwards of at
  most B query tokens; a window larger than B runs alone. The largest forward is then at most
  ``max(floor(B / tpc), largest window)`` chunks (largest window ``W + 1``, ``+ 1`` distilled,
  or the P prefix chunks), and never more than the unbounded step: activations stop growing
  with the jobs admitted. Planned for jobs of the planned resolution (smaller jobs fit more
  windows, thus more caption rows, into B tokens).
* pipeline parallelism (pp_size > 1) cuts the step's tokens at chunk boundaries into
  ``micro_batches`` (default ``2 pp_size``, :mod:`stages.parallel.mesh`) that every pipeline stage runs
  one after another: a layer's temporaries are those of ``ceil(chunks / micro_batches)``
  chunks; the per-forward state (embedding, RoPE rows, captions) is the whole step's.
* Ulysses context parallelism splits tokens evenly: ``s = ceil(S / cp)`` per rank; attention
  runs on all S tokens with ``Q / cp`` query heads; K/V heads per rank ``G / cp`` when cp
  divides G, else 1 (heads replicated ``cp / G`` times, reference ``repeat_interleave`` in
  ``context_parallel.py``).

The KV pool itself is not an activation: :mod:`cluster.capacity.kv` sizes it. Window K/V
are written straight into the pool and attention reads them there.

Activation working set (inference: no autograd, so only one layer's temporaries are live;
terms modelled on :class:`stages.dit.layers.TransformerLayer`):

* per token, held across the layer (``carried``): residual ``D a``, self- and
  cross-attention outputs ``2 Q a``, the layer's fresh K/V before they are written ``2 G Dh a``;
* plus the largest phase: linear_proj (head-interleaved copy ``2 Q a``, its float32 input
  ``2 Q 4``, float32 output ``D 4``, the reference autocast) | fc1 (LayerNorm out ``D a`` +
  fc1 out) | activation (fc1 out + ``2F a`` for GLU's silu and product, ``F a`` for GELU) |
  fp8 layers: unfused activation quantization of the widest input ``X = max(F, 2Q)``:
  ``X a + 2 X 4`` (:func:`stages.dit.fp8.quantize_activation`);
* per token for the whole forward: the float32 patch embedding ``D 4``, RoPE rows
  ``6 (Dh / 8) 4``, the token->chunk map ``8``;
* captions: ``chunks * L * (C_cap 4 + D 4 + D a)`` (T5 embeddings, ``y_proj_xattn`` output);
* attention (``attention``): ``flash`` (:class:`stages.dit.flash_attention.FlashRangeAttention`,
  one varlen call per layer) keeps the log-sum-exp ``S * Q/cp/Dh * 4`` and gathers the key
  ranges of every sequence, at most ``chunks * R * tpc`` tokens of K and V
  (``2 G_rank Dh a`` each); ``sdpa`` (:class:`stages.dit.attention.SdpaRangeAttention`, one
  SDPA call per chunk, math kernel) materialises one chunk's scores
  ``(Q/cp/Dh) * tpc * R tpc * a``, its boolean mask ``tpc * R tpc`` and the concatenated
  keys of a two-range group ``2 * R tpc * G_rank Dh a``;
* Ulysses all-to-all receive buffers ``s (3 Q + 2 max(G, cp) Dh) a`` (q, qx, output, k, v);
* pipeline send/receive buffers ``2 s D a``.

Plus the job's latents on the device (``(W + 1) * 16 * cw * h * w`` float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.capacity.kv import kv_groups_per_rank
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
        micro_batches: pipeline micro-batches per forward (1 without pipeline parallelism).
        chunks_per_micro_batch: chunks of the largest micro-batch.
        micro_tokens_per_rank: its tokens per rank (= tokens_per_rank without pipelining).
        chunks_per_job: one job's chunks in one forward (full window, no token budget): all
            branches with batch_cfg, else the largest branch kind.
        window_chunks: chunks of the largest window of a job's step (a forward never splits one).
        prefix_chunks: chunks of the largest V2V prefix-extraction window (0 = none planned).
        kv_range_chunks: R, chunks of keys one query chunk reads at most.
        kv_heads_per_rank: K/V heads each rank stores.
        q_heads_per_rank: query heads each rank attends with.
        layers_per_pp_stage: DiT layers per pipeline stage.
        act_bytes: bytes per activation / KV element.
    """

    tokens_per_chunk: int
    chunks_per_forward: int
    tokens_per_forward: int
    tokens_per_rank: int
    micro_batches: int
    chunks_per_micro_batch: int
    micro_tokens_per_rank: int
    chunks_per_job: int
    window_chunks: int
    prefix_chunks: int
    kv_range_chunks: int
    kv_heads_per_rank: int
    q_heads_per_rank: int
    layers_per_pp_stage: int
    act_bytes: int


def job_chunks(model: ModelConfig, batch_cfg: bool) -> tuple[int, int]:
    """(chunks of one job in one forward, chunks of its largest window) for a step with the
    full window (module docstring): cfg_number 3 with batch_cfg ``2 (W + 1) + W`` (main, text,
    uncond), else ``W + 1``; distilled models ``+ 1`` (the self-only nearly clean chunk)."""
    smp = model.sampling
    w, extra = smp.window_size, int(smp.distill)
    per_job = 2 * (w + 1) + w if (batch_cfg and smp.cfg_number == 3) else w + 1
    return per_job + extra, w + 1 + extra


def forward_chunks(per_job: int, window: int, prefix_chunks: int, jobs: int, budget_chunks: int | None) -> int:
    """Chunks of the largest forward of a step of ``jobs`` jobs (module docstring);
    ``budget_chunks`` = ``max_forward_tokens // tpc`` (None = one forward per step or branch kind)."""
    unbounded = max(per_job, prefix_chunks) * jobs
    if budget_chunks is None:
        return unbounded
    return min(unbounded, max(budget_chunks, window, prefix_chunks))


def step_shape(model: ModelConfig, height: int, width: int, *, cp_size: int, pp_size: int,
               jobs_per_forward: int, batch_cfg: bool, prefix_chunks: int = 0,
               micro_batches: int | None = None, max_forward_tokens: int | None = None) -> StepShape:
    """Geometry of the largest DiT call of a step of ``jobs_per_forward`` jobs; the caller
    validated cp/pp/resolution. ``micro_batches``: None = the mesh default (``2 * pp_size`` with
    a pipeline, else 1). ``max_forward_tokens``: the engine's token budget per forward (None =
    every job in one forward)."""
    dit, smp = model.dit, model.sampling
    f = model.vae_spatial_factor
    tpc = dit.tokens_per_chunk(smp.chunk_width, height // f, width // f)
    per_job, window = job_chunks(model, batch_cfg)
    budget = None if max_forward_tokens is None else max_forward_tokens // tpc
    chunks = forward_chunks(per_job, window, prefix_chunks, jobs_per_forward, budget)
    tokens = chunks * tpc
    if cp_size * pp_size == 1:
        micro = 1  # no mesh: one forward over the whole step
    else:  # the mesh default (stages.parallel.mesh.init_mesh): 2 * pp_size with a pipeline, else 1
        micro = min(chunks, micro_batches or (2 * pp_size if pp_size > 1 else 1))
    micro_chunks = math.ceil(chunks / micro)
    return StepShape(
        tokens_per_chunk=tpc, chunks_per_forward=chunks, tokens_per_forward=tokens,
        tokens_per_rank=math.ceil(tokens / cp_size), micro_batches=micro, chunks_per_micro_batch=micro_chunks,
        micro_tokens_per_rank=math.ceil(micro_chunks * tpc / cp_size), chunks_per_job=per_job,
        window_chunks=window, prefix_chunks=prefix_chunks, kv_range_chunks=max(smp.noise2clean_kvrange, default=1),
        kv_heads_per_rank=kv_groups_per_rank(dit.num_query_groups, cp_size),
        q_heads_per_rank=dit.num_attention_heads // cp_size,
        layers_per_pp_stage=dit.num_layers // pp_size, act_bytes=DTYPE_BYTES[dit.params_dtype],
    )


def kv_bytes_per_token_layer(model: ModelConfig, shape: StepShape) -> int:
    """K and V of one token in one layer on one rank."""
    return 2 * shape.kv_heads_per_rank * model.dit.kv_channels * shape.act_bytes


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
                     attention: str) -> dict[str, int]:
    """Named activation terms in bytes for one rank (module docstring gives each formula)."""
    dit, a, s = model.dit, shape.act_bytes, shape.micro_tokens_per_rank  # a layer runs one micro-batch
    d, dh = dit.hidden_size, dit.kv_channels
    q = dit.num_attention_heads * dh
    tpc, mb_chunks = shape.tokens_per_chunk, shape.chunks_per_micro_batch
    keys = shape.kv_range_chunks * tpc  # keys of one query chunk
    kv_token = kv_bytes_per_token_layer(model, shape)
    terms = {
        "layer peak": s * layer_peak_per_token(model, a),
        "forward state": shape.tokens_per_rank * forward_state_per_token(model),
        "captions": shape.chunks_per_forward * dit.caption_max_length * (dit.caption_channels * 4 + d * 4 + d * a),
    }
    if attention == "flash":
        terms["attention (flash lse)"] = mb_chunks * tpc * shape.q_heads_per_rank * 4
        terms["attention key gather"] = mb_chunks * keys * kv_token
    else:
        terms["attention (sdpa, one chunk)"] = shape.q_heads_per_rank * tpc * keys * a + tpc * keys + keys * kv_token
    if cp_size > 1:
        terms["Ulysses all-to-all"] = s * (3 * q + 2 * max(dit.num_query_groups, cp_size) * dh) * a
    if pp_size > 1:
        terms["pipeline send/recv"] = 2 * s * d * a
    return terms
