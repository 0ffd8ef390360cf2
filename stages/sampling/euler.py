"""Flow-matching Euler step over a window of chunks (DESIGN.md section 3)."""

from __future__ import annotations

import torch

from stages.errors import InvalidInput
from stages.sampling._chunks import Scalars, as_f32, chunk_view, per_chunk, same_shape


def euler_step(x: torch.Tensor, velocity: torch.Tensor, t: Scalars, t_next: Scalars) -> torch.Tensor:
    """One Euler step x <- x + v * (t_next - t), per chunk (reference ``SampleTransport.integrate``).

    The model predicts the velocity v = x_1 - x_0 (data minus noise) with
    t = 0 noise and t = 1 clean. The step size t_next - t is computed in
    float32 from the float32 schedule values, as the reference does, so a
    step over schedule entries (``init_t``) matches it bit for bit.

    Args:
        x: latent window (..., T, H, W), e.g. (B, C, T, H, W), T = K * chunk_width
            for K chunks along T.
        velocity: same shape as ``x``.
        t: current timestep, one float for the whole window or (K,) per chunk
            (floats or a tensor).
        t_next: integration target, same form as ``t``.

    Returns:
        tensor of ``x``'s shape; float32 for float32 inputs.

    Raises:
        InvalidInput: shapes differ, or T is not a multiple of K.
    """
    same_shape("velocity", x, velocity)
    t0 = as_f32(t, "t")
    t1 = as_f32(t_next, "t_next")
    if t0.shape != t1.shape:
        raise InvalidInput("t_next", f"shape {tuple(t1.shape)} differs from t's {tuple(t0.shape)}")
    delta = t1 - t0
    if delta.dim() == 0:
        return x + velocity * delta.to(x.device)
    k = delta.shape[0]
    xv = chunk_view(x, k, "x")
    vv = chunk_view(velocity, k, "velocity")
    return (xv + vv * per_chunk(delta, xv)).reshape(x.shape)

