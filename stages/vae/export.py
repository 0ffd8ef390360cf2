"""ONNX export of the VAE decoder at fixed tile shapes, cached on disk.

The codec decodes a latent chunk tile by tile (:func:`stages.vae.tiling.tiled_decode`,
reference ``TileProcessor.tiled_decode``). A chunk of a given size visits a
handful of distinct tile shapes (full tiles and the truncated edge tiles:
at most two sizes per axis), so the per-tile decoder forward
(reference ``ViTDecoder.forward``) is exported once per tile shape with every
dimension fixed: no dynamic axes, a static Conv3d, and the position table
already resized to the tile's patch grid (no Resize op in the graph).

Cache layout (``cache_dir``, default ``$MAGI_HOME/vae-runtime`` or
``~/.cache/magi-serve/vae-runtime``)::

    onnx/<weights digest[:16]>/decoder_t{t}_h{h}_w{w}_opset{opset}_v{EXPORT_FORMAT}.onnx

The weights digest hashes the decoder's tensors and the :class:`VaeConfig`, so
a restarted replica with the same checkpoint reuses the files, and any weight
change exports afresh. Files are written to a temporary name and renamed under
a file lock, so concurrent replicas never read a half-written model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from stages.config import VaeConfig, magi_home
from stages.vae import tiling
from stages.vae.modules import VaeDecoder

log = logging.getLogger(__name__)

TileShape = tuple[int, int, int]  # latent tile (t, h, w): latent frames, rows, columns
EXPORT_FORMAT = 1  # bump whenever the exported graph changes, to invalidate old caches
DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "latent", "video"


def default_cache_dir() -> Path:
    """``$MAGI_HOME/vae-runtime`` or ``~/.cache/magi-serve/vae-runtime``."""
    return magi_home() / "vae-runtime"


def check_tile_shape(shape: Sequence[int], field: str = "tile_shape") -> TileShape:
    """Validate a latent tile shape (t, h, w).

    Raises:
        ValueError: naming ``field`` unless it is three positive ints.
    """
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{field}: expected three positive ints (t, h, w), got {shape!r}")
    return shape  # type: ignore[return-value]


def weights_digest(decoder: nn.Module, cfg: VaeConfig) -> str:
    """SHA-256 (hex) of the decoder's state_dict (names, dtypes, shapes, bytes), the config and EXPORT_FORMAT."""
    h = hashlib.sha256(f"magi-vae-decoder/{EXPORT_FORMAT}/{cfg.model_dump_json()}".encode())
    for name, tensor in sorted(decoder.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().data)
    return h.hexdigest()


def decode_tile_shapes(latent_shape: Sequence[int], cfg: VaeConfig, tile_kwargs: dict) -> list[TileShape]:
    """The distinct latent tile shapes :func:`tiling.tiled_decode` visits for one chunk.

    Runs the real tiling on the ``meta`` device (no data, no compute) with a decode
    function that records its input shape, so it can never disagree with the tiler.

    Args:
        latent_shape: (T, h, w) of the latent chunk (latent frames, rows, columns).
        cfg: the VAE configuration (patch sizes).
        tile_kwargs: the codec's tiling arguments (``VaeCodec.tile_kwargs``).
    Returns:
        tile shapes (t, h, w) in first-visit order.
    Raises:
        ValueError: naming ``latent_shape`` unless it is three positive ints.
    """
    t, h, w = check_tile_shape(latent_shape, "latent_shape")
    seen: list[TileShape] = []
    pt, ps = cfg.patch_length, cfg.patch_size

    def record(z: torch.Tensor) -> torch.Tensor:
        shape = tuple(z.shape[2:])
        if shape not in seen:
            seen.append(shape)
        return torch.empty(z.shape[0], 3, shape[0] * pt, shape[1] * ps, shape[2] * ps, device="meta")

    z = torch.empty(1, cfg.z_chans, t, h, w, device="meta")
    tiling.tiled_decode(z, record, spatial_factor=ps, temporal_factor=pt, **tile_kwargs)
    return seen


class FixedTileDecoder(nn.Module):
    """The decoder forward for one latent tile shape, position table precomputed.

    Same computation as :meth:`VaeDecoder.forward` (reference ``ViTDecoder.forward``):
    Linear z -> D, cls token, + position table (resized trilinearly to the tile's
    patch grid, reference ``resize_pos_embed``: done here once, in torch, and stored
    as a buffer), blocks, LayerNorm, optional final_proj, unpatchify, Conv3d 3x3x3.

    forward: z float32 (1, C=z_chans, t, h, w) -> (1, 3, t*pT, h*pH, w*pW).
    """

    def __init__(self, decoder: VaeDecoder, tile_shape: TileShape):
        super().__init__()
        self.decoder = decoder
        self.tile_shape = check_tile_shape(tile_shape)
        with torch.no_grad():
            self.register_buffer("pos_table", decoder._pos_embed_for(self.tile_shape).detach().clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        b, c, lt, lh, lw = z.shape
        x = d.proj_in(z.permute(0, 2, 3, 4, 1).reshape(b, lt * lh * lw, c))
        if d.cls_token is not None:
            x = torch.cat((d.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.pos_table
        for blk in d.blocks:
            x = blk(x)
        x = d.norm(x)[:, d.num_cls:]
        if d.use_final_proj:
            x = d.final_norm(d.final_proj(x))
        pt, ps, ch = d.patch_length, d.patch_size, d.unpatch_channels
        x = x.reshape(b, lt, lh, lw, pt, ps, ps, ch).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(b, ch, lt * pt, lh * ps, lw * ps)
        return d.last_layer(x)


def float_cpu_decoder(decoder: VaeDecoder, cfg: VaeConfig) -> VaeDecoder:
    """The decoder itself if it is float32 on CPU, else a float32 CPU copy (built on meta, then assigned)."""
    params = list(decoder.parameters()) + list(decoder.buffers())
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return decoder
    with torch.device("meta"):
        copy = VaeDecoder(cfg)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in decoder.state_dict().items()}
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.eval().requires_grad_(False)


def export_decoder_onnx(decoder: VaeDecoder, cfg: VaeConfig, tile_shape: Sequence[int], path: Path,
                        opset: int = DEFAULT_OPSET) -> Path:
    """Export the per-tile decoder at a fixed shape and validate it with ``onnx.checker``.

    Uses ``torch.onnx.export(dynamo=False)`` (TorchScript exporter), float32,
    batch 1, no dynamic axes; input ``"latent"``, output ``"video"``. Written
    to a temporary file and renamed, so ``path`` is either absent or complete.

    Args:
        decoder: the VAE decoder (any device / dtype; exported from a float32 CPU copy).
        tile_shape: latent tile (t, h, w).
        path: the ``.onnx`` file to write.
        opset: ONNX opset (17 or 18).
    Returns:
        ``path``.
    Raises:
        ValueError: a bad tile shape.
        onnx.checker.ValidationError: the exported model is not valid ONNX.
    """
    import onnx  # noqa: PLC0415

    shape = check_tile_shape(tile_shape)
    module = FixedTileDecoder(float_cpu_decoder(decoder, cfg), shape).eval()
    example = torch.zeros(1, cfg.z_chans, *shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True)
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``<target>.lock`` (serialises exports/builds across processes)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class OnnxCache:
    """Per-tile-shape ONNX files of one decoder, exported on first use and reused after.

    Args:
        decoder: the VAE decoder (``vae.decoder``).
        cfg: its configuration.
        cache_dir: cache root (see the module docstring); None = :func:`default_cache_dir`.
        opset: ONNX opset.

    Attributes:
        digest: weights digest (hex) keying the files.
        exported: tile shapes this object exported (in order).
        reused: tile shapes found already on disk.
    """

    def __init__(self, decoder: VaeDecoder, cfg: VaeConfig, cache_dir: Path | None = None,
                 opset: int = DEFAULT_OPSET):
        self.decoder, self.cfg, self.opset = decoder, cfg, opset
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.digest = weights_digest(decoder, cfg)
        self.exported: list[TileShape] = []
        self.reused: list[TileShape] = []

    def path_for(self, tile_shape: Sequence[int]) -> Path:
        """Where the ONNX file of ``tile_shape`` lives (whether or not it exists yet)."""
        t, h, w = check_tile_shape(tile_shape)
        name = f"decoder_t{t}_h{h}_w{w}_opset{self.opset}_v{EXPORT_FORMAT}.onnx"
        return self.cache_dir / "onnx" / self.digest[:16] / name

    def get(self, tile_shape: Sequence[int]) -> Path:
        """The ONNX file of ``tile_shape``, exporting it first if it is not cached."""
        shape = check_tile_shape(tile_shape)
        path = self.path_for(shape)
        if path.is_file():
            self.reused.append(shape)
            return path
        with file_lock(path):
            if path.is_file():  # another process exported it while we waited
                self.reused.append(shape)
                return path
            log.info("exporting the VAE decoder to ONNX for latent tile %s -> %s", shape, path)
            export_decoder_onnx(self.decoder, self.cfg, shape, path, self.opset)
            self.exported.append(shape)
        return path

    def invalidate(self, tile_shape: Sequence[int]) -> None:
        """Delete a cached file (e.g. one a runtime failed to load) so that :meth:`get` re-exports it."""
        self.path_for(tile_shape).unlink(missing_ok=True)
