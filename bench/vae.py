"""VAE chunk decode: ONNX Runtime (and TensorRT when present) vs eager PyTorch, magi-tiny.

Decodes one magi-tiny latent chunk (C=16, chunk_width=6, 16, 16) -> 24 x 128 x 128
frames through ``VaeCodec`` (same tiling and blending for every backend) and prints
the median wall time of each backend after warm-up and their ratio, measured in
the same run with the runs interleaved. CPU: eager vs ONNX Runtime; with a CUDA
GPU and the tensorrt module: eager CUDA vs TensorRT (fp16) too.

    PYTHONPATH=.:proto .venv/bin/python bench/vae.py [--runs 9] [--warmup 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "proto")]

from stages.config import magi_tiny  # noqa: E402
from stages.vae import tiling  # noqa: E402
from stages.vae.codec import VaeCodec  # noqa: E402
from stages.vae.runtime import make_codec  # noqa: E402
from stages.vae.weights import load_vae, write_tiny_checkpoint  # noqa: E402


def _median_times(fns: dict, chunk: torch.Tensor, runs: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn(chunk)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):  # interleaved, so load drift hits both alike
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(chunk)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _max_float_diff(eager: VaeCodec, other: VaeCodec, chunk: torch.Tensor) -> float:
    p = next(eager.vae.parameters())
    z = (chunk / eager.cfg.scale_factor).to(p.device)[None]
    kw = dict(spatial_factor=8, temporal_factor=4, **eager.tile_kwargs)
    with torch.no_grad():
        a = tiling.tiled_decode(z, eager.decode_backend, **kw)
        b = tiling.tiled_decode(z, other.decode_backend, **kw)
    return (a.float() - b.float()).abs().max().item()


def _compare(label: str, eager: VaeCodec, other: VaeCodec, chunk: torch.Tensor, args) -> None:
    med = _median_times({"eager": eager.decode, "other": other.decode}, chunk, args.runs, args.warmup)
    print(f"{label}: eager {med['eager'] * 1e3:.1f} ms, {other.decode_backend.name} {med['other'] * 1e3:.1f} ms "
          f"per chunk (median of {args.runs}); eager / {other.decode_backend.name} = "
          f"{med['eager'] / med['other']:.2f}x; max |diff| {_max_float_diff(eager, other, chunk):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    model = magi_tiny()
    chunk = torch.randn(model.vae.z_chans, model.sampling.chunk_width, model.height // 8, model.width // 8,
                        generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_checkpoint(model.vae, Path(tmp) / "vae")
        vae = load_vae(Path(tmp) / "vae", model.vae)
        print(f"magi-tiny chunk {tuple(chunk.shape)} -> {model.sampling.frames_per_chunk} frames "
              f"{model.height}x{model.width}; torch threads {torch.get_num_threads()}; "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        start = time.perf_counter()
        ort = make_codec(vae, model, prefer=("onnxruntime",), cache_dir=Path(tmp) / "cache")
        cold = time.perf_counter() - start
        start = time.perf_counter()
        ort = make_codec(vae, model, prefer=("onnxruntime",), cache_dir=Path(tmp) / "cache")
        print(f"onnxruntime set-up: {cold:.2f} s exporting {len(ort.decode_backend.cache.reused)} tile shapes, "
              f"{time.perf_counter() - start:.2f} s from the disk cache")
        _compare("CPU", VaeCodec(vae, model.vae, fps=model.sampling.fps), ort, chunk, args)
        if not torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is None:
            print("TensorRT: skipped (needs a CUDA GPU and the tensorrt module)")
            return
        gpu_vae = vae.cuda()
        trt = make_codec(gpu_vae, model, prefer=("tensorrt",), cache_dir=Path(tmp) / "cache")
        _compare("CUDA", VaeCodec(gpu_vae, model.vae, fps=model.sampling.fps), trt, chunk, args)


if __name__ == "__main__":
    main()
