"""TensorRT decode backend: engines built from the fixed-shape decoder ONNX files, cached on disk.

``tensorrt`` is imported only when this backend is constructed (never on CPU
machines: :func:`stages.vae.runtime.make_decode_backend` first checks that
the VAE is on a CUDA device). One engine per latent tile shape (static shapes, batch 1),
built in fp16 or bf16 (normalisation and reduction layers are kept in fp32
where TensorRT allows it, against fp16 overflow in the variance), and cached::

    <cache_dir>/tensorrt/<weights digest[:16]>/
        decoder_t{t}_h{h}_w{w}_sm{major}{minor}_{dtype}_trt{version}_opset{opset}_v{EXPORT_FORMAT}.engine

so the key covers the GPU architecture (compute capability), the tile shape,
the precision, the TensorRT version and the weights (digest); a restarted
replica on the same kind of GPU deserialises the engine instead of rebuilding it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from stages.config import VaeConfig
from stages.vae.export import (EXPORT_FORMAT, INPUT_NAME, OUTPUT_NAME, OnnxCache, TileShape, check_tile_shape,
                               file_lock)
from stages.vae.model import MagiVAE
from stages.vae.backend import TRT_DTYPES, BackendUnavailable, check_tile_input, tile_output_shape

log = logging.getLogger(__name__)


def import_tensorrt():
    """``import tensorrt``, or :class:`BackendUnavailable` saying why not."""
    try:
        import tensorrt  # noqa: PLC0415
    except ImportError as exc:
        raise BackendUnavailable(f"the tensorrt module is not importable ({exc})") from None
    if not hasattr(tensorrt.IExecutionContext, "execute_async_v3"):
        raise BackendUnavailable(f"tensorrt {tensorrt.__version__} is too old (needs execute_async_v3, 8.5+)")
    return tensorrt


def _keep_fp32(trt, network) -> None:
    """Ask for fp32 in normalisation and reduction layers (fp16 variance overflows on large activations)."""
    kinds = {trt.LayerType.NORMALIZATION, trt.LayerType.REDUCE}
    floats = {trt.float32, trt.float16} | ({trt.bfloat16} if hasattr(trt, "bfloat16") else set())
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in kinds and layer.get_output(0).dtype in floats:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def build_engine(trt, logger, onnx_path: Path, dtype: str) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine in ``dtype`` (``fp16``, ``bf16`` or ``fp32``).

    Raises:
        RuntimeError: the parser's errors, or an empty build.
    """
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if dtype != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if dtype == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        _keep_fp32(trt, network)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    return bytes(serialized)


class TensorRTDecodeBackend:
    """Per-tile decode through TensorRT engines (one per tile shape) on the current CUDA stream.

    Args:
        vae: the model, on a CUDA device (the engines run there).
        cfg: its configuration.
        cache: the ONNX file cache of ``vae.decoder`` (engines are built from its files).
        cache_dir: engine cache root (default ``cache.cache_dir``).
        dtype: ``"fp16"`` (default), ``"bf16"`` or ``"fp32"``.

    Attributes:
        built: tile shapes whose engine this object built; reused: shapes loaded from disk.
    Raises:
        BackendUnavailable: no CUDA device, the VAE not on CUDA, or tensorrt missing / too old.
        ValueError: naming ``dtype`` for an unknown precision.
    """

    name = "tensorrt"

    def __init__(self, vae: MagiVAE, cfg: VaeConfig, cache: OnnxCache, *, cache_dir: Path | None = None,
                 dtype: str = "fp16"):
        if dtype not in TRT_DTYPES:
            raise ValueError(f"dtype: expected one of {TRT_DTYPES}, got {dtype!r}")
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device")
        self.trt = import_tensorrt()
        self.cfg, self.cache, self.dtype = cfg, cache, dtype
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache.cache_dir
        self.device = next(vae.parameters()).device
        if self.device.type != "cuda":
            raise BackendUnavailable(f"the VAE is on {self.device}, not on a CUDA device")
        self.capability = torch.cuda.get_device_capability(self.device)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self._contexts: dict[TileShape, tuple[object, object]] = {}
        self.built: list[TileShape] = []
        self.reused: list[TileShape] = []
        self.skipped: dict[str, str] = {}

    def engine_path(self, tile_shape: Sequence[int]) -> Path:
        """Cache file of the engine for ``tile_shape`` on this GPU architecture, precision and TensorRT."""
        t, h, w = check_tile_shape(tile_shape)
        major, minor = self.capability
        name = (f"decoder_t{t}_h{h}_w{w}_sm{major}{minor}_{self.dtype}_trt{self.trt.__version__}"
                f"_opset{self.cache.opset}_v{EXPORT_FORMAT}.engine")
        return self.cache_dir / "tensorrt" / self.cache.digest[:16] / name

    def prepare(self, tile_shapes: Sequence[TileShape]) -> None:
        for shape in tile_shapes:
            self._context(tuple(shape))

    def _load(self, path: Path):
        with torch.cuda.device(self.device):
            return self.runtime.deserialize_cuda_engine(path.read_bytes())

    def _engine(self, shape: TileShape):
        path = self.engine_path(shape)
        engine = self._load(path) if path.is_file() else None
        if engine is not None:
            self.reused.append(shape)
            return engine
        with file_lock(path):
            engine = self._load(path) if path.is_file() else None
            if engine is not None:  # another process built it meanwhile
                self.reused.append(shape)
                return engine
            log.info("building a TensorRT %s engine for latent tile %s -> %s", self.dtype, shape, path)
            with torch.cuda.device(self.device):
                data = build_engine(self.trt, self.logger, self.cache.get(shape), self.dtype)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self.built.append(shape)
        engine = self._load(path)
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize the engine it just built: {path}")
        return engine

    def _context(self, shape: TileShape):
        if shape not in self._contexts:
            engine = self._engine(shape)
            self._contexts[shape] = (engine, engine.create_execution_context())
        return self._contexts[shape][1]

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        check_tile_input(z, self.cfg)
        shape = tuple(z.shape[2:])
        context = self._context(shape)
        x = z.detach().to(self.device, torch.float32).contiguous()
        out = torch.empty(tile_output_shape(self.cfg, shape, x.shape[0]), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        for i in range(x.shape[0]):
            context.set_tensor_address(INPUT_NAME, x[i : i + 1].data_ptr())
            context.set_tensor_address(OUTPUT_NAME, out[i : i + 1].data_ptr())
            if not context.execute_async_v3(stream):
                raise RuntimeError(f"TensorRT execution failed for latent tile {shape}")
        return out.to(z.device, z.dtype)
