"""Exported VAE decoder (magi-tiny): fixed-shape ONNX, ONNX Runtime parity with eager, disk cache."""

from __future__ import annotations

import onnx
import pytest
import torch

from stages.config import magi_tiny
from stages.vae import tiling
from stages.vae.codec import VaeCodec
from stages.vae.export import OnnxCache, decode_tile_shapes, export_decoder_onnx, weights_digest
from stages.vae.runtime import make_decode_backend
from stages.vae.weights import load_vae, write_tiny_checkpoint

# Measured on magi-tiny (CPU, ONNX Runtime 1.31, fp32): max |ORT - eager| = 1.2e-6 over a
# whole chunk whose pixels reach |x| = 2.4; we allow 1e-5 absolute.
ORT_ATOL = 1e-5
CHUNK = (6, 16, 16)  # magi-tiny chunk: chunk_width 6 latent frames, 128 px / 8


@pytest.fixture(scope="module")
def codec(tiny_vae, tiny_vae_cfg):
    return VaeCodec(tiny_vae, tiny_vae_cfg, fps=magi_tiny().sampling.fps)


@pytest.fixture(scope="module")
def shapes(tiny_vae_cfg, codec):
    return decode_tile_shapes(CHUNK, tiny_vae_cfg, codec.tile_kwargs)


@pytest.fixture(scope="module")
def ort_backend(tiny_vae, tiny_vae_cfg, shapes, tmp_path_factory):
    return make_decode_backend(tiny_vae, tiny_vae_cfg, prefer=("onnxruntime",),
                               cache_dir=tmp_path_factory.mktemp("cache"), tile_shapes=shapes)


def _latent(seed: int = 0) -> torch.Tensor:
    return torch.randn(16, *CHUNK, generator=torch.Generator().manual_seed(seed))


def _tiled(z: torch.Tensor, fn, codec: VaeCodec) -> torch.Tensor:
    with torch.no_grad():
        return tiling.tiled_decode(z[None] / codec.cfg.scale_factor, fn, spatial_factor=8, temporal_factor=4,
                                   **codec.tile_kwargs)


def test_tile_shapes_of_a_magi_tiny_chunk(tiny_vae_cfg, codec, shapes):
    """128 px frames, 32 px tiles with a 24 px stride: full 4-cell tiles and 1-cell edge tiles."""
    assert shapes == [(3, 4, 4), (3, 4, 1), (3, 1, 4), (3, 1, 1)]
    assert decode_tile_shapes((4, 8, 7), tiny_vae_cfg, codec.tile_kwargs) == [
        (3, 4, 4), (3, 4, 1), (3, 2, 4), (3, 2, 1), (1, 4, 4), (1, 4, 1), (1, 2, 4), (1, 2, 1)]
    with pytest.raises(ValueError, match="latent_shape"):
        decode_tile_shapes((6, 16), tiny_vae_cfg, codec.tile_kwargs)


def test_export_is_valid_static_onnx_without_resize(tiny_vae, tiny_vae_cfg, tmp_path):
    """Tile (3, 4, 4) differs from the training grid (2, 4, 4): the resized position table is baked in."""
    path = export_decoder_onnx(tiny_vae.decoder, tiny_vae_cfg, (3, 4, 4), tmp_path / "d.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    dims = lambda value: [d.dim_value if d.HasField("dim_value") else d.dim_param  # noqa: E731
                          for d in value.type.tensor_type.shape.dim]
    assert dims(model.graph.input[0]) == [1, 16, 3, 4, 4]
    assert dims(model.graph.output[0]) == [1, 3, 12, 32, 32]
    ops = {n.op_type for n in model.graph.node}
    assert "Conv" in ops and "Resize" not in ops
    with pytest.raises(ValueError, match="tile_shape"):
        export_decoder_onnx(tiny_vae.decoder, tiny_vae_cfg, (3, 0, 4), tmp_path / "bad.onnx")


def test_onnxruntime_chunk_matches_eager(tiny_vae, codec, ort_backend):
    """A whole chunk through the same tiling and blending: float pixels within ORT_ATOL, uint8 off by <= 1."""
    z = _latent(1)
    eager, ort = _tiled(z, tiny_vae.decoder, codec), _tiled(z, ort_backend, codec)
    assert ort.shape == eager.shape == (1, 3, 24, 128, 128)
    assert eager.abs().max() > 1.0  # non-degenerate output
    assert (ort - eager).abs().max().item() <= ORT_ATOL
    diff = (tiling.to_uint8(ort).int() - tiling.to_uint8(eager).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_onnxruntime_decodes_unprepared_shapes_and_batches(tiny_vae, tiny_vae_cfg, ort_backend):
    """A tile shape not prepared up front is exported on first use; B > 1 is decoded item by item."""
    z = torch.randn(2, 16, 2, 3, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tiny_vae.decoder(z)
    assert (ort_backend(z) - expected).abs().max().item() <= ORT_ATOL
    assert (2, 3, 2) in ort_backend.cache.exported
    with pytest.raises(ValueError, match="z: expected"):
        ort_backend(torch.zeros(1, 8, 3, 4, 4))


def test_onnx_cache_is_reused_across_restarts(tiny_vae_cfg, tiny_vae_ckpt, shapes, tmp_path):
    first = make_decode_backend(load_vae(tiny_vae_ckpt, tiny_vae_cfg), tiny_vae_cfg, prefer=("onnxruntime",),
                                cache_dir=tmp_path, tile_shapes=shapes)
    assert first.cache.exported == shapes and first.cache.reused == []
    stamps = {s: first.cache.path_for(s).stat().st_mtime_ns for s in shapes}
    # a "restarted replica": the same checkpoint loaded again, same cache folder
    second = make_decode_backend(load_vae(tiny_vae_ckpt, tiny_vae_cfg), tiny_vae_cfg, prefer=("onnxruntime",),
                                 cache_dir=tmp_path, tile_shapes=shapes)
    assert second.cache.exported == [] and second.cache.reused == shapes
    assert {s: second.cache.path_for(s).stat().st_mtime_ns for s in shapes} == stamps
    z = torch.randn(1, 16, 3, 4, 4)
    assert torch.equal(first(z), second(z))


def test_cache_is_keyed_by_weights(tiny_vae, tiny_vae_cfg, tmp_path):
    other_dir = tmp_path / "seed1"
    write_tiny_checkpoint(tiny_vae_cfg, other_dir, seed=1)
    other = load_vae(other_dir, tiny_vae_cfg)
    assert weights_digest(tiny_vae.decoder, tiny_vae_cfg) != weights_digest(other.decoder, tiny_vae_cfg)
    a, b = OnnxCache(tiny_vae.decoder, tiny_vae_cfg, tmp_path), OnnxCache(other.decoder, tiny_vae_cfg, tmp_path)
    assert a.path_for((3, 4, 4)) != b.path_for((3, 4, 4))
    a.get((3, 4, 4))
    b.get((3, 4, 4))
    assert a.exported == b.exported == [(3, 4, 4)]


def test_damaged_cache_file_is_exported_again(tiny_vae, tiny_vae_cfg, tmp_path):
    cache = OnnxCache(tiny_vae.decoder, tiny_vae_cfg, tmp_path)
    cache.path_for((3, 1, 1)).parent.mkdir(parents=True)
    cache.path_for((3, 1, 1)).write_bytes(b"not an onnx model")
    backend = make_decode_backend(tiny_vae, tiny_vae_cfg, prefer=("onnxruntime",), cache_dir=tmp_path,
                                  tile_shapes=[(3, 1, 1)])
    assert backend.cache.exported == [(3, 1, 1)]
    z = torch.randn(1, 16, 3, 1, 1)
    with torch.no_grad():
        assert (backend(z) - tiny_vae.decoder(z)).abs().max().item() <= ORT_ATOL
