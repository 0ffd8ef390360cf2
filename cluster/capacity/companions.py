"""Bytes of the T5 encoder and the VAE when they share a GPU with the DiT.

Both run in bfloat16 on a GPU (reference ``T5Embedder`` ``torch_dtype=bfloat16``,
``VaeHelper.get_vae`` ``vae.bfloat16()``). Working sets (inference, one call at a time):

* T5: ``B = 2`` captions (a prompt and the null caption) of L = ``max_length`` tokens;
  per token ``(3 d_model + 3 H d_kv + 3 d_ff) a`` (hidden, norm, attention out; q, k, v;
  wi_0, wi_1, product), plus attention scores and softmax ``2 B H L^2 4`` and the relative
  position bias ``H L^2 4`` (T5 materialises scores).
* VAE decode of one tile (reference ``tiled_decode``): tokens per tile
  ``(video_size / p)^2 (video_length / pl) + cls`` with ``(7 D + 2 mlp_ratio D) a`` per token
  (residual, norm, q k v, attention out, proj; fc1 out, GELU out), the float32 pixel tile
  before and after the last Conv3d ``2 * 3 * video_length * video_size^2 * 4``, and the
  float32 blend accumulators of one chunk's frames ``2 * frames * H * W * 3 * 4``.
"""

from __future__ import annotations

from stages.config import ModelConfig
from stages.parallel.weights import t5_encoder_params, vae_params

COMPANION_BYTES = 2  # bfloat16
T5_BATCH = 2


def text_encoder_bytes(model: ModelConfig) -> dict[str, int]:
    """T5 weights and working set on the GPU, bytes."""
    te, a = model.text_encoder, COMPANION_BYTES
    length, heads = te.max_length, te.num_heads
    per_token = (3 * te.d_model + 3 * heads * te.d_kv + 3 * te.d_ff) * a
    work = T5_BATCH * length * per_token + 2 * T5_BATCH * heads * length * length * 4 + heads * length * length * 4
    return {"T5 weights": t5_encoder_params(te) * a, "T5 working set": work}


def vae_bytes(model: ModelConfig, height: int, width: int) -> dict[str, int]:
    """VAE weights and tiled-decode working set on the GPU, bytes."""
    v, a = model.vae, COMPANION_BYTES
    tokens = (v.video_size // v.patch_size) ** 2 * (v.video_length // v.patch_length) + (1 if v.with_cls_token else 0)
    per_token = (7 * v.embed_dim + 2 * int(v.mlp_ratio * v.embed_dim)) * a
    pixels = 2 * 3 * v.video_length * v.video_size * v.video_size * 4
    frames = model.sampling.frames_per_chunk
    blend = 2 * frames * height * width * 3 * 4
    return {"VAE weights": vae_params(v) * a, "VAE working set": tokens * per_token + pixels + blend}
