"""Video and image I/O: validated decoding of uploads, chunk-wise fMP4 encoding of outputs."""

from stages.video.fmp4 import Fmp4ChunkEncoder, RawFramesEncoder
from stages.video.images import ALLOWED_FORMATS, decode_image, fit_image
from stages.video.videos import ALLOWED_DEMUXERS, decode_video

__all__ = [
    "ALLOWED_DEMUXERS", "ALLOWED_FORMATS", "Fmp4ChunkEncoder", "RawFramesEncoder",
    "decode_image", "decode_video", "fit_image",
]
