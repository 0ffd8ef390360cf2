"""One job's path from prompt to MP4, without Ray: text encode -> DiT engine -> VAE decode -> mux.

:class:`Pipeline` (:mod:`cluster.pipeline.flow`) owns the job flow and yields the protobuf
messages of ``Generate``; it reaches the stages through :class:`Stages` (async callables).
Two adapters: the gRPC ingress's (Serve deployment handles, :mod:`cluster.serve.ingress`) and
:class:`LocalStages` (the stages and an :class:`cluster.engine.AsyncEngine` in this process,
:mod:`cluster.pipeline.local`), which ``bench/e2e.py``, ``magi generate --in-process`` and the
tests use. :mod:`cluster.pipeline.stream` builds the messages, muxes chunks and keeps TTFC/TPOC.
"""

from cluster.pipeline.flow import Pipeline, Stages
from cluster.pipeline.stream import ChunkMuxer, StreamClock

__all__ = ["ChunkMuxer", "Pipeline", "Stages", "StreamClock"]
