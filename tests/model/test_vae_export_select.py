"""Decode backend selection (TensorRT -> ONNX Runtime -> PyTorch) and the one-call codec, on CPU."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from stages.config import magi_tiny
from stages.vae.codec import VaeCodec
from stages.vae.runtime import make_codec, make_decode_backend

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks")


@no_gpu
def test_default_order_falls_back_to_onnxruntime_without_tensorrt(tiny_vae, tiny_vae_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="stages.vae.runtime"):
        backend = make_decode_backend(tiny_vae, tiny_vae_cfg, cache_dir=tmp_path, tile_shapes=[(3, 4, 4)])
    assert backend.name == "onnxruntime"
    assert list(backend.skipped) == ["tensorrt"] and "CUDA" in backend.skipped["tensorrt"]
    assert "VAE decode backend: onnxruntime" in caplog.text and "tensorrt: no CUDA device" in caplog.text
    assert "tensorrt" not in sys.modules  # the import is lazy: CPU machines never load it


@no_gpu
def test_falls_back_to_torch_when_onnxruntime_is_not_wanted(tiny_vae, tiny_vae_cfg, tmp_path):
    backend = make_decode_backend(tiny_vae, tiny_vae_cfg, prefer=("tensorrt", "torch"), cache_dir=tmp_path)
    assert backend.name == "torch" and list(backend.skipped) == ["tensorrt"]
    z = torch.randn(1, 16, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(backend(z), tiny_vae.decoder(z))
    assert not any(tmp_path.iterdir())  # torch needs no export


def test_failing_backend_falls_through_with_its_reason(tiny_vae, tiny_vae_cfg, tmp_path):
    """An export that cannot succeed (an unsupported opset) is a skip reason, not a crash."""
    backend = make_decode_backend(tiny_vae, tiny_vae_cfg, prefer=("onnxruntime", "torch"), cache_dir=tmp_path,
                                  tile_shapes=[(3, 4, 4)], opset=1)
    assert backend.name == "torch" and "onnxruntime" in backend.skipped


@no_gpu
def test_no_working_backend_names_every_reason(tiny_vae, tiny_vae_cfg, tmp_path):
    with pytest.raises(RuntimeError, match="tensorrt: no CUDA device"):
        make_decode_backend(tiny_vae, tiny_vae_cfg, prefer=("tensorrt",), cache_dir=tmp_path)


def test_bad_arguments_are_named(tiny_vae, tiny_vae_cfg, tmp_path):
    with pytest.raises(ValueError, match="prefer"):
        make_decode_backend(tiny_vae, tiny_vae_cfg, prefer=("tensorrt", "openvino"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="prefer"):
        make_decode_backend(tiny_vae, tiny_vae_cfg, prefer=(), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="trt_dtype"):
        make_decode_backend(tiny_vae, tiny_vae_cfg, trt_dtype="int4", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="cfg"):
        make_decode_backend(tiny_vae, tiny_vae_cfg.model_copy(update={"scale_factor": 1.0}), cache_dir=tmp_path)


def test_make_codec_prepares_the_chunk_tiles_and_decodes_like_eager(tiny_vae, tiny_vae_cfg, tmp_path):
    model = magi_tiny()
    codec = make_codec(tiny_vae, model, prefer=("onnxruntime", "torch"), cache_dir=tmp_path)
    backend = codec.decode_backend
    assert backend.name == "onnxruntime"
    assert backend.cache.exported == [(3, 4, 4), (3, 4, 1), (3, 1, 4), (3, 1, 1)]
    chunk = torch.randn(16, 6, 16, 16, generator=torch.Generator().manual_seed(3))
    frames = codec.decode(chunk)
    seen = []  # the tile shapes the eager codec feeds its decoder: exactly the prepared ones
    handle = tiny_vae.decoder.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[2:])))
    try:
        eager = VaeCodec(tiny_vae, tiny_vae_cfg, fps=model.sampling.fps).decode(chunk)
    finally:
        handle.remove()
    assert list(dict.fromkeys(seen)) == backend.cache.exported
    diff = np.abs(frames.astype(int) - eager.astype(int))
    assert frames.shape == (24, 128, 128, 3) and diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert backend.cache.exported == [(3, 4, 4), (3, 4, 1), (3, 1, 4), (3, 1, 1)]  # nothing exported lazily
