"""Per-chunk broadcasting helpers shared by the Euler step and the guidance combine.

A window of K chunks is laid out along the latent time axis T (dim -3 of a
(..., T, H, W) tensor, T = K * chunk_width), as in the reference
``SampleTransport.integrate`` and ``forward_dispatcher``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stages.errors import InvalidInput

Scalars = float | Sequence[float] | torch.Tensor


def as_f32(values: Scalars, field: str) -> torch.Tensor:
    """Per-chunk scalars as a float32 tensor: 0-dim for one float, (K,) otherwise.

    Python floats that came from a float32 schedule convert back exactly.

    Raises:
        InvalidInput: ``values`` is not a float, a sequence of floats or a 0-/1-dim tensor.
    """
    if isinstance(values, torch.Tensor):
        out = values.detach().to(dtype=torch.float32, device="cpu")
    else:
        try:
            out = torch.tensor(values, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(field, f"expected a float or a sequence of floats ({exc})") from None
    if out.dim() > 1:
        raise InvalidInput(field, f"expected a scalar or a (K,) vector, got shape {tuple(out.shape)}")
    return out


def chunk_view(x: torch.Tensor, num_chunks: int, field: str, chunk_width: int | None = None) -> torch.Tensor:
    """View (..., T, H, W) as (..., K, T / K, H, W).

    Raises:
        InvalidInput: x has fewer than 3 dims, T is not a multiple of K, or T / K
            differs from ``chunk_width`` when it is given.
    """
    if x.dim() < 3:
        raise InvalidInput(field, f"expected (..., T, H, W), got shape {tuple(x.shape)}")
    t_len = x.shape[-3]
    if num_chunks <= 0 or t_len % num_chunks:
        raise InvalidInput(field, f"T={t_len} latent frames is not a multiple of {num_chunks} chunks")
    width = t_len // num_chunks
    if chunk_width is not None and width != chunk_width:
        raise InvalidInput(field, f"T={t_len} holds {num_chunks} chunks of {width}, expected chunk_width {chunk_width}")
    return x.reshape(*x.shape[:-3], num_chunks, width, *x.shape[-2:])


def per_chunk(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (K,) vector to broadcast over a (..., K, w, H, W) chunk view."""
    return scale.to(like.device).reshape(-1, 1, 1, 1)


def same_shape(field: str, ref: torch.Tensor, *others: torch.Tensor) -> None:
    """Raise InvalidInput naming ``field`` unless all tensors have ``ref``'s shape."""
    for other in others:
        if other.shape != ref.shape:
            raise InvalidInput(field, f"shape {tuple(other.shape)} differs from {tuple(ref.shape)}")
