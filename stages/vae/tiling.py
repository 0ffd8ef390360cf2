"""Tiled VAE encode / decode with linear overlap blending (reference ``TileProcessor``).

Semantics (reference ``inference/infra/parallelism/tile_parallel.py``, single process):

* Tiles are visited in (t, h, w) row-major order. Tile starts are multiples of the
  stride ``int(tile * (1 - overlap))``; edge tiles are truncated by the input.
* A tile is blended with its predecessor along t, then h (``blend_v``), then w
  (``blend_h``): over ``e`` rows, row ``y`` = ``prev[-e + y] * (1 - y/e) + cur[y] * (y/e)``
  (the first overlapped row is 100 % the previous tile), ``e = min(prev, cur, extent)``.
* Encode blends *in place*: later tiles blend against already-blended neighbours.
  Decode blends a clone against the *unblended* neighbours.
* Each tile is cropped to ``tile - extent`` along every axis and the crops are
  concatenated (w, then h, then t).
"""

from __future__ import annotations

from typing import Callable

import torch

Codec = Callable[[torch.Tensor], torch.Tensor]
NO_SPATIAL_TILING = 100000  # reference: tile size used when spatial tiling is off


def blend(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Linear cross-fade of ``cur``'s first rows with ``prev``'s last rows along ``dim``.

    Reference ``TileProcessor.blend_t`` / ``blend_v`` / ``blend_h`` (dims 2, 3, 4),
    vectorised; weights are computed in float64 like the reference's Python floats.

    Args:
        prev, cur: (B, C, T, H, W) tiles (same size on the other axes).
        extent: requested overlap in rows; clipped to both tiles' sizes.
    Returns:
        a new tensor: ``cur`` with its first ``extent`` rows blended.
    """
    extent = min(prev.shape[dim], cur.shape[dim], extent)
    if extent <= 0:
        return cur
    shape = [1] * cur.dim()
    shape[dim] = extent
    w_cur = (torch.arange(extent, dtype=torch.float64, device=cur.device) / extent)
    w_prev = (1 - w_cur).to(cur.dtype).reshape(shape)
    w_cur = w_cur.to(cur.dtype).reshape(shape)
    head = prev.narrow(dim, prev.shape[dim] - extent, extent) * w_prev + cur.narrow(dim, 0, extent) * w_cur
    return torch.cat((head, cur.narrow(dim, extent, cur.shape[dim] - extent)), dim=dim)


def _count(size: int, stride: int, name: str) -> int:
    if stride < 1:
        raise ValueError(f"{name}: tile stride is {stride}; use a larger tile or a smaller overlap")
    return (size + stride - 1) // stride


def _grid(shape: tuple[int, int, int], strides: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Tile indices (f, i, j) in row-major order."""
    nt = _count(shape[0], strides[0], "tile_sample_min_length")
    nh = _count(shape[1], strides[1], "tile_sample_min_height")
    nw = _count(shape[2], strides[2], "tile_sample_min_width")
    return [(f, i, j) for f in range(nt) for i in range(nh) for j in range(nw)]


def _run_tiles(x: torch.Tensor, fn: Codec, grid, strides, sizes) -> dict:
    out = {}
    for f, i, j in grid:
        t0, h0, w0 = f * strides[0], i * strides[1], j * strides[2]
        out[(f, i, j)] = fn(x[:, :, t0 : t0 + sizes[0], h0 : h0 + sizes[1], w0 : w0 + sizes[2]])
    return out


def _blend_tile(tiles: dict, key, extents, tile: torch.Tensor) -> torch.Tensor:
    f, i, j = key
    for dim, prev_key in ((2, (f - 1, i, j)), (3, (f, i - 1, j)), (4, (f, i, j - 1))):
        if min(prev_key) >= 0:
            tile = blend(tiles[prev_key], tile, extents[dim - 2], dim)
    return tile


def _assemble(crops: dict, grid) -> torch.Tensor:
    nt, nh, nw = (max(k[d] for k in grid) + 1 for d in range(3))
    frames = []
    for f in range(nt):
        rows = [torch.cat([crops[(f, i, j)] for j in range(nw)], dim=4) for i in range(nh)]
        frames.append(torch.cat(rows, dim=3))
    return torch.cat(frames, dim=2)


def _crop(tile: torch.Tensor, limits) -> torch.Tensor:
    return tile[:, :, : limits[0], : limits[1], : limits[2]]


def _sizes(tile_sample_min_length, tile_sample_min_height, tile_sample_min_width, allow_spatial_tiling):
    if not allow_spatial_tiling:
        tile_sample_min_height = tile_sample_min_width = NO_SPATIAL_TILING
    return tile_sample_min_length, tile_sample_min_height, tile_sample_min_width


def tiled_encode(
    x: torch.Tensor, encode_fn: Codec, *, spatial_factor: int, temporal_factor: int,
    tile_sample_min_height: int = 256, tile_sample_min_width: int = 256, tile_sample_min_length: int = 16,
    spatial_tile_overlap_factor: float = 0.25, temporal_tile_overlap_factor: float = 0.0,
    allow_spatial_tiling: bool = True,
) -> torch.Tensor:
    """Encode a video tile by tile (reference ``TileProcessor.tiled_encode``).

    Args:
        x: (B, 3, T, H, W) float pixels in [-1, 1].
        encode_fn: pixel tile (B, 3, t, h, w) -> latent tile (B, C, t', h', w').
        spatial_factor, temporal_factor: the VAE's downsampling (8, 4).
        tile_sample_min_*: pixel tile sizes (the pipeline: 256, 256, fps // 2).
        *_overlap_factor: overlap as a fraction of the tile (0.25 spatial, 0 temporal).
        allow_spatial_tiling: False = one tile per frame area.
    Returns:
        (B, C, t, h, w) latent; tiles blended in place over ``int(latent_tile * overlap)`` cells.
    Raises:
        ValueError: a tile stride below 1.
    """
    sizes = _sizes(tile_sample_min_length, tile_sample_min_height, tile_sample_min_width, allow_spatial_tiling)
    overlaps = (temporal_tile_overlap_factor, spatial_tile_overlap_factor, spatial_tile_overlap_factor)
    latent = (sizes[0] // temporal_factor, sizes[1] // spatial_factor, sizes[2] // spatial_factor)
    strides = tuple(int(s * (1 - o)) for s, o in zip(sizes, overlaps))
    extents = tuple(int(lat * o) for lat, o in zip(latent, overlaps))
    limits = tuple(lat - e for lat, e in zip(latent, extents))
    grid = _grid(tuple(x.shape[2:]), strides)
    tiles = _run_tiles(x, encode_fn, grid, strides, sizes)
    crops = {}
    for key in grid:  # in place: later tiles see blended neighbours
        tiles[key] = _blend_tile(tiles, key, extents, tiles[key])
        crops[key] = _crop(tiles[key], limits)
    return _assemble(crops, grid)


def tiled_decode(
    z: torch.Tensor, decode_fn: Codec, *, spatial_factor: int, temporal_factor: int,
    tile_sample_min_height: int = 256, tile_sample_min_width: int = 256, tile_sample_min_length: int = 16,
    spatial_tile_overlap_factor: float = 0.25, temporal_tile_overlap_factor: float = 0.0,
    allow_spatial_tiling: bool = True,
) -> torch.Tensor:
    """Decode a latent tile by tile (reference ``TileProcessor.tiled_decode``).

    Latent tiles are ``tile_sample_min_* // factor`` cells with stride
    ``int(latent_tile * (1 - overlap))``; decoded tiles are blended over
    ``int(pixel_tile * overlap)`` pixels against the unblended neighbours and
    cropped to ``pixel_tile - extent``.

    Args:
        z: (B, C, T, h, w) unscaled latent.
        decode_fn: latent tile -> pixel tile (B, 3, F, H, W).
        other args: as :func:`tiled_encode` (pixel units).
    Returns:
        (B, 3, F, H, W) float pixels.
    Raises:
        ValueError: a tile stride below 1.
    """
    sizes = _sizes(tile_sample_min_length, tile_sample_min_height, tile_sample_min_width, allow_spatial_tiling)
    overlaps = (temporal_tile_overlap_factor, spatial_tile_overlap_factor, spatial_tile_overlap_factor)
    factors = (temporal_factor, spatial_factor, spatial_factor)
    latent = tuple(s // fac for s, fac in zip(sizes, factors))
    strides = tuple(int(lat * (1 - o)) for lat, o in zip(latent, overlaps))
    real = tuple(lat * fac for lat, fac in zip(latent, factors))
    extents = tuple(int(r * o) for r, o in zip(real, overlaps))
    limits = tuple(r - e for r, e in zip(real, extents))
    grid = _grid(tuple(z.shape[2:]), strides)
    tiles = _run_tiles(z, decode_fn, grid, strides, latent)
    crops = {key: _crop(_blend_tile(tiles, key, extents, tiles[key]), limits) for key in grid}
    return _assemble(crops, grid)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> uint8 (reference ``VaeHelper.decode``, ``uint8_output=True``).

    ``(x * 127.5 + 127.5).clamp(0, 255)`` then a cast, which truncates (no rounding).
    """
    return (x * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
