"""Per-tile VAE decode backends (TensorRT, ONNX Runtime, PyTorch) and their selection.

A decode backend is a callable with the interface of the PyTorch per-tile decode
``vae.decoder`` (reference ``ViTDecoder.forward``): latent tile float
(B, C=z_chans, t, h, w) -> pixel tile (B, 3, t*pT, h*pH, w*pW), same device and
dtype as the input. :class:`stages.vae.codec.VaeCodec` takes any of them
(``decode_backend=``) and runs it through the same tiling and blending.

* ``torch``: the eager decoder.
* ``onnxruntime``: fixed-shape ONNX files (:mod:`stages.vae.export`), one
  session per tile shape; CUDAExecutionProvider when the VAE is on CUDA and ORT
  has it, else CPUExecutionProvider.
* ``tensorrt``: engines built from the same ONNX files (:mod:`stages.vae.trt`),
  imported lazily, only when the VAE is on a CUDA device.

:func:`make_decode_backend` tries them in the ``prefer`` order, logs the one it
picked and why each earlier one was skipped; :func:`make_codec` is the one call
a serving replica makes.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from stages.config import ModelConfig, VaeConfig
from stages.vae.backend import TRT_DTYPES, BackendUnavailable, DecodeBackend, check_tile_input, tile_output_shape
from stages.vae.codec import VaeCodec
from stages.vae.export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, OnnxCache, TileShape, decode_tile_shapes
from stages.vae.model import MagiVAE

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "onnxruntime", "torch")
DEFAULT_PREFER = BACKENDS
class TorchDecodeBackend:
    """The eager PyTorch decoder (``vae.decoder``) under ``torch.no_grad``."""

    name = "torch"

    def __init__(self, vae: MagiVAE):
        self.decoder = vae.decoder
        self.skipped: dict[str, str] = {}

    def prepare(self, tile_shapes: Sequence[TileShape]) -> None:
        """Nothing to prepare."""

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.decoder(z)


class OnnxRuntimeDecodeBackend:
    """ONNX Runtime sessions over the fixed-shape decoder ONNX files, one per tile shape.

    I/O goes through ORT's I/O binding on the input tensor's memory (CPU or CUDA),
    float32; the batch is decoded one item at a time (the export has batch 1).

    Args:
        vae: the model (its device picks the execution provider).
        cfg: its configuration.
        cache: the ONNX file cache of ``vae.decoder``.
        threads: intra-op threads for CPU sessions (default ``torch.get_num_threads()``).
        spin: let ORT's idle threads busy-wait (off by default: between tiles torch runs the
            blending on the same cores, and spinning ORT threads made a magi-tiny chunk
            decode 3.6x slower on 2 cores, 264 ms vs 72 ms).
    Raises:
        BackendUnavailable: onnxruntime is not importable, or the VAE is on CUDA
            and this ORT build has no CUDAExecutionProvider.
    """

    name = "onnxruntime"

    def __init__(self, vae: MagiVAE, cfg: VaeConfig, cache: OnnxCache, threads: int | None = None,
                 spin: bool = False):
        self._ort = _import_onnxruntime()
        self.cfg, self.cache = cfg, cache
        self.device = next(vae.parameters()).device
        self.providers = _ort_providers(self._ort, self.device)
        self.threads, self.spin = threads or torch.get_num_threads(), spin
        self._sessions: dict[TileShape, object] = {}
        self.skipped: dict[str, str] = {}

    def prepare(self, tile_shapes: Sequence[TileShape]) -> None:
        for shape in tile_shapes:
            self._session(tuple(shape))

    def _session(self, shape: TileShape):
        if shape not in self._sessions:
            path = self.cache.get(shape)
            try:
                self._sessions[shape] = self._open(path)
            except Exception as exc:  # noqa: BLE001 - a damaged cache file: export again once
                log.warning("onnxruntime could not load %s (%s); exporting it again", path, exc)
                self.cache.invalidate(shape)
                self._sessions[shape] = self._open(self.cache.get(shape))
        return self._sessions[shape]

    def _open(self, path: Path):
        opts = self._ort.SessionOptions()
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        return self._ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        check_tile_input(z, self.cfg)
        shape = tuple(z.shape[2:])
        session = self._session(shape)
        x = z.detach().to(self.device, torch.float32).contiguous()
        out = torch.empty(tile_output_shape(self.cfg, shape, x.shape[0]), dtype=torch.float32, device=self.device)
        kind, index = self.device.type, self.device.index or 0
        for i in range(x.shape[0]):
            binding = session.io_binding()
            xi, oi = x[i : i + 1], out[i : i + 1]
            binding.bind_input(INPUT_NAME, kind, index, np.float32, tuple(xi.shape), xi.data_ptr())
            binding.bind_output(OUTPUT_NAME, kind, index, np.float32, tuple(oi.shape), oi.data_ptr())
            if kind == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            session.run_with_iobinding(binding)
        return out.to(z.device, z.dtype)


def _import_onnxruntime():
    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime is not importable ({exc})") from None
    return onnxruntime


def _ort_providers(ort, device: torch.device) -> list:
    """CUDAExecutionProvider on the VAE's GPU, or CPUExecutionProvider for a CPU VAE."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise BackendUnavailable(f"the VAE is on {device} but this onnxruntime has only {available}")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0})]


def _precheck(name: str, vae: MagiVAE) -> None:
    """Cheap reasons a backend cannot run (before hashing weights or exporting anything)."""
    device = next(vae.parameters()).device
    if name == "onnxruntime":
        _ort_providers(_import_onnxruntime(), device)
    elif name == "tensorrt":
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device")
        if device.type != "cuda":
            raise BackendUnavailable(f"the VAE is on {device}, not on a CUDA device")
        if importlib.util.find_spec("tensorrt") is None:  # find_spec does not import it
            raise BackendUnavailable("the tensorrt module is not installed")


def _build(name: str, vae: MagiVAE, cfg: VaeConfig, cache: OnnxCache | None, trt_dtype: str) -> DecodeBackend:
    if name == "torch":
        return TorchDecodeBackend(vae)
    if name == "onnxruntime":
        return OnnxRuntimeDecodeBackend(vae, cfg, cache)
    from stages.vae.trt import TensorRTDecodeBackend  # noqa: PLC0415 - imports tensorrt lazily

    return TensorRTDecodeBackend(vae, cfg, cache, dtype=trt_dtype)


def make_decode_backend(vae: MagiVAE, cfg: VaeConfig, prefer: Sequence[str] = DEFAULT_PREFER, *,
                        cache_dir: Path | None = None, tile_shapes: Sequence[TileShape] = (),
                        trt_dtype: str = "fp16", opset: int = DEFAULT_OPSET) -> DecodeBackend:
    """Pick the first backend in ``prefer`` that works here, ready for ``tile_shapes``.

    Each candidate is built and prepared for ``tile_shapes`` (ONNX export /
    engine build, cached under ``cache_dir``); any failure moves on to the next.
    The choice and each skip reason are logged (INFO) and kept in ``skipped``.

    Args:
        vae: the model (its device decides CUDA vs CPU runtimes).
        cfg: its configuration (must equal ``vae.cfg``).
        prefer: backend names in order of preference, from ``BACKENDS``.
        cache_dir: ONNX / engine cache root; None = ``stages.vae.export.default_cache_dir()``.
        tile_shapes: latent tile shapes (t, h, w) to prepare now (others are prepared on first use).
        trt_dtype: TensorRT precision, ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        opset: ONNX opset of the exported files.
    Returns:
        a :class:`DecodeBackend`.
    Raises:
        ValueError: naming ``prefer`` (empty or unknown names), ``cfg`` or ``trt_dtype``.
        RuntimeError: no backend in ``prefer`` works (the message lists each reason).
    """
    prefer = tuple(prefer)
    unknown = [p for p in prefer if p not in BACKENDS]
    if not prefer or unknown:
        raise ValueError(f"prefer: expected a non-empty sequence of {BACKENDS}, got {prefer!r}")
    if cfg != vae.cfg:
        raise ValueError("cfg: differs from the configuration the VAE was built with")
    if trt_dtype not in TRT_DTYPES:
        raise ValueError(f"trt_dtype: expected one of {TRT_DTYPES}, got {trt_dtype!r}")
    cache = None
    skipped: dict[str, str] = {}
    for name in prefer:
        try:
            _precheck(name, vae)
            if name != "torch" and cache is None:
                cache = OnnxCache(vae.decoder, cfg, cache_dir, opset)
            backend = _build(name, vae, cfg, cache, trt_dtype)
            backend.prepare(list(tile_shapes))
        except Exception as exc:  # noqa: BLE001 - every failure is a reason to fall back
            skipped[name] = str(exc) if isinstance(exc, BackendUnavailable) else f"{type(exc).__name__}: {exc}"
            continue
        backend.skipped = skipped
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
        log.info("VAE decode backend: %s (skipped: %s)", name, why)
        return backend
    raise RuntimeError("no VAE decode backend works here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))


def make_codec(vae: MagiVAE, model: ModelConfig, *, prefer: Sequence[str] = DEFAULT_PREFER,
               cache_dir: Path | None = None, height: int | None = None, width: int | None = None,
               trt_dtype: str = "fp16") -> VaeCodec:
    """One call for a serving replica: a :class:`VaeCodec` decoding through the best backend.

    The tile shapes of one chunk (C, chunk_width, height/8, width/8) at the model's
    default geometry are exported / built up front (cached on disk, so a
    restarted replica only loads them); other geometries are prepared on first use.

    Args:
        vae: the loaded VAE; model: the model configuration (``model.vae == vae.cfg``).
        prefer, cache_dir, trt_dtype: as :func:`make_decode_backend`.
        height, width: video size in pixels to prepare for (default ``model.height``/``width``).
    Returns:
        ``VaeCodec(vae, model.vae, fps=model.sampling.fps, decode_backend=...)``.
    Raises:
        as :func:`make_decode_backend`.
    """
    plain = VaeCodec(vae, model.vae, fps=model.sampling.fps)
    ps = model.vae.patch_size
    latent = (model.sampling.chunk_width, (height or model.height) // ps, (width or model.width) // ps)
    shapes = decode_tile_shapes(latent, model.vae, plain.tile_kwargs)
    backend = make_decode_backend(vae, model.vae, prefer, cache_dir=cache_dir, tile_shapes=shapes,
                                  trt_dtype=trt_dtype)
    return VaeCodec(vae, model.vae, fps=model.sampling.fps, decode_backend=backend)
