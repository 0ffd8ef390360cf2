"""Checks of a job that :class:`cluster.engine.loop.Engine` makes beyond the job's own fields
(those are :mod:`cluster.engine.prepare`'s): whether it can ever fit the KV pool, and where a
prompt update may start. Plain Python; each raises InvalidInput or returns None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.errors import InvalidInput

if TYPE_CHECKING:  # pragma: no cover
    from cluster.engine.prepare import JobState


def check_fits(st: JobState, pool_blocks: int, keep_all: bool) -> None:
    """Raises InvalidInput when the job needs more KV-pool blocks than the pool's ``pool_blocks``:
    the field is what makes it large (num_chunks with keep_all KV, the V2V prefix, or the size)."""
    if st.blocks <= pool_blocks:
        return
    if keep_all:
        name = "num_chunks"
    else:
        name = "prefix_latent" if st.ctx.chunk_offset >= st.areas.history else "height"
    raise InvalidInput(name, f"the job needs {st.blocks} KV-pool blocks, the engine's pool has {pool_blocks} "
                             "(Engine kv_pool_blocks)")


def check_start_chunk(st: JobState, start_chunk: int) -> None:
    """A prompt update of ``st`` may start at generated chunk ``start_chunk``.

    Raises:
        InvalidInput("start_chunk"): not an integer >= 0, a chunk that has already entered the
            window (its denoising started), or past the job's last chunk.
    """
    ctx = st.ctx
    if isinstance(start_chunk, bool) or not isinstance(start_chunk, int) or start_chunk < 0:
        raise InvalidInput("start_chunk", f"must be an integer >= 0, got {start_chunk!r}")
    earliest = ctx.max_started - ctx.chunk_offset + 1
    if start_chunk < earliest:
        raise InvalidInput("start_chunk", f"chunk {start_chunk} is already in flight or done (chunks 0..{earliest - 1} "
                                          f"have started); the earliest chunk a new prompt can start at is {earliest}")
    n = st.sched.num_chunks
    if n is not None and start_chunk >= n - ctx.chunk_offset:
        raise InvalidInput("start_chunk", f"chunk {start_chunk} is past the job's last chunk {n - ctx.chunk_offset - 1}")
