"""MAGI-1 transformer VAE: model (:class:`MagiVAE`), tiling, weights and the pipeline codec.

Submodules: :mod:`stages.vae.model`, :mod:`stages.vae.modules`, :mod:`stages.vae.tiling`,
:mod:`stages.vae.weights` (``load_vae``, ``write_tiny_checkpoint``),
:mod:`stages.vae.codec` (``VaeCodec``).
"""

from stages.vae.model import MagiVAE

__all__ = ["MagiVAE"]
