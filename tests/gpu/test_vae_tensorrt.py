"""VAE decode through TensorRT (and ONNX Runtime's CUDA provider) on a GPU: parity and the engine cache.

``gpu`` marker; skipped without a CUDA device or without the tensorrt module
(which cannot be installed from PyPI on the CI machines, see FIELD-NOTES).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from stages.config import magi_tiny
from stages.vae import tiling
from stages.vae.codec import VaeCodec
from stages.vae.export import decode_tile_shapes
from stages.vae.runtime import make_decode_backend
from stages.vae.weights import load_vae, write_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_trt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs the tensorrt module")

# Reduced precision against the fp32 eager decode of a whole chunk (pixels span about [-2.5, 2.5]).
ATOL = {"fp16": 2e-2, "bf16": 1e-1, "fp32": 1e-3}


@pytest.fixture(scope="module")
def cfg():
    return magi_tiny().vae


def write_tiny(cfg, folder):
    write_tiny_checkpoint(cfg, folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def vae(cfg, tmp_path_factory):
    return load_vae(write_tiny(cfg, tmp_path_factory.mktemp("vae")), cfg, device="cuda")


@pytest.fixture(scope="module")
def codec(vae, cfg):
    return VaeCodec(vae, cfg, fps=magi_tiny().sampling.fps)


@pytest.fixture(scope="module")
def shapes(cfg, codec):
    return decode_tile_shapes((6, 16, 16), cfg, codec.tile_kwargs)


def _max_diff(codec: VaeCodec, backend, seed: int = 0) -> float:
    z = torch.randn(1, 16, 6, 16, 16, generator=torch.Generator().manual_seed(seed)).cuda() / codec.cfg.scale_factor
    kw = dict(spatial_factor=8, temporal_factor=4, **codec.tile_kwargs)
    with torch.no_grad():
        eager = tiling.tiled_decode(z, codec.vae.decoder, **kw)
        other = tiling.tiled_decode(z, backend, **kw)
    assert other.shape == eager.shape and other.device == eager.device and torch.isfinite(other).all()
    return (other - eager).abs().max().item()


@needs_trt
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_tensorrt_matches_eager_and_reuses_its_engines(vae, cfg, codec, shapes, dtype, tmp_path):
    if dtype == "bf16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs compute capability 8.0+")
    first = make_decode_backend(vae, cfg, cache_dir=tmp_path, tile_shapes=shapes, trt_dtype=dtype)
    assert first.name == "tensorrt" and first.skipped == {}
    assert first.built == shapes and first.reused == []
    major, minor = torch.cuda.get_device_capability()
    import tensorrt  # noqa: PLC0415

    for shape in shapes:
        path = first.engine_path(shape)
        assert path.is_file() and f"sm{major}{minor}" in path.name and dtype in path.name
        assert f"trt{tensorrt.__version__}" in path.name and first.cache.digest[:16] in str(path)
    assert _max_diff(codec, first) <= ATOL[dtype]
    second = make_decode_backend(vae, cfg, cache_dir=tmp_path, tile_shapes=shapes, trt_dtype=dtype)
    assert second.built == [] and second.reused == shapes and second.cache.exported == []
    z = torch.randn(1, 16, 3, 4, 4, device="cuda")
    assert torch.equal(first(z), second(z))


@needs_trt
def test_tensorrt_codec_decodes_a_chunk(vae, cfg, codec, shapes, tmp_path):
    backend = make_decode_backend(vae, cfg, prefer=("tensorrt",), cache_dir=tmp_path, tile_shapes=shapes)
    chunk = torch.randn(16, 6, 16, 16, generator=torch.Generator().manual_seed(1))
    frames = VaeCodec(vae, cfg, fps=24, decode_backend=backend).decode(chunk)
    eager = codec.decode(chunk)
    assert frames.shape == eager.shape == (24, 128, 128, 3)
    assert abs(frames.astype(int) - eager.astype(int)).max() <= 4


@needs_trt
def test_tensorrt_is_skipped_for_a_cpu_vae(cfg, tmp_path):
    cpu_vae = load_vae(write_tiny(cfg, tmp_path / "vae"), cfg)
    backend = make_decode_backend(cpu_vae, cfg, prefer=("tensorrt", "torch"), cache_dir=tmp_path)
    assert backend.name == "torch" and "not on a CUDA device" in backend.skipped["tensorrt"]


def test_onnxruntime_cuda_provider_matches_eager(vae, cfg, codec, shapes, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider")
    backend = make_decode_backend(vae, cfg, prefer=("onnxruntime",), cache_dir=tmp_path, tile_shapes=shapes)
    assert backend.providers[0][0] == "CUDAExecutionProvider"
    assert _max_diff(codec, backend) <= 5e-3  # ORT's CUDA convolutions may use TF32


def test_onnxruntime_without_cuda_provider_is_skipped_for_a_cuda_vae(vae, cfg, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    backend = make_decode_backend(vae, cfg, prefer=("onnxruntime", "torch"), cache_dir=tmp_path)
    assert backend.name == "torch" and "the VAE is on cuda" in backend.skipped["onnxruntime"]
