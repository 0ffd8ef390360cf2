"""MAGI-1 transformer VAE: model (:class:`MagiVAE`), tiling, weights and the pipeline codec.

Submodules: :mod:`stages.vae.model`, :mod:`stages.vae.modules`, :mod:`stages.vae.tiling`,
:mod:`stages.vae.weights` (``load_vae``, ``write_tiny_checkpoint``),
:mod:`stages.vae.codec` (``VaeCodec``), :mod:`stages.vae.export` (fixed-shape ONNX export, cached),
:mod:`stages.vae.runtime` (decode backends and ``make_decode_backend`` / ``make_codec``),
:mod:`stages.vae.trt` (TensorRT engines; imports tensorrt lazily).
"""

from stages.vae.model import MagiVAE

__all__ = ["MagiVAE"]
