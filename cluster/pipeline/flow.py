"""The job flow of ``Generate`` (DESIGN.md section 2), Ray-free: spec -> protobuf messages.

    Accepted -> encode_text (|| encode_image / encode_video)
             -> run(job) ~~> [Queued position ...] Progress ..., LatentChunk k ...
                 each LatentChunk k: decode(k) starts at once (a task), while the engine's
                 stream keeps being consumed (decode k || DiT on k+1)
             -> per chunk, in order: mux (fMP4 segment or raw RGB) -> Chunk parts
             -> Done (TTFC, TPOC)

Events go out in the order the engine produced them; a chunk takes its place in the stream at
the moment its latent was produced and waits only for its own decode; at most
``max_pending_decodes`` decodes are in flight. A consumer that leaves early (or a failure)
closes the engine's stream, asks ``cancel(job_id)`` (explicit, not only via the stream) and
cancels the pending decodes. Errors of the stages propagate unchanged to the caller (the
ingress maps them to gRPC statuses).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncGenerator, AsyncIterator, Protocol, Sequence

from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, Progress, QueuePosition
from cluster.pipeline import stream
from magi.v1 import generate_pb2 as pb
from stages.config import ModelConfig

EngineEvent = QueuePosition | Progress | LatentChunk


class Stages(Protocol):
    """What :class:`Pipeline` calls (each an async callable; tensors on CPU)."""

    async def encode_text(self, texts: Sequence[str]) -> list[CaptionEmbedding]:
        """One caption embedding per text (float32 (L, D), int64 mask (L,))."""

    async def encode_image(self, image: Any) -> Any:
        """I2V: uint8 (H, W, 3) -> scaled latent float32 (C, 1, h, w)."""

    async def encode_video(self, frames: Any) -> Any:
        """V2V: uint8 (F, H, W, 3) -> scaled latent float32 (C, F/4, h, w)."""

    def run(self, job: EngineJob) -> AsyncGenerator[EngineEvent, None]:
        """Submit ``job`` and yield its engine events; closing the generator stops the job."""

    async def cancel(self, job_id: str) -> bool:
        """Stop the job in the engine; whether the engine held it."""

    async def decode(self, latent: Any, job_id: str) -> Any:
        """Scaled latent float32 (C, T, h, w) -> uint8 frames (F, H, W, 3)."""


class Pipeline:
    """Runs jobs through ``stages`` and yields their ``Generate`` messages.

    Args:
        stages: the adapter to the text encoder, engine and VAE (:class:`Stages`).
        model: the served model (frames per chunk, fps).
        max_pending_decodes: decodes in flight per job at most (>= 1).
        max_message_bytes: largest ``Chunk.data`` of one message (bytes).
    """

    def __init__(self, stages: Stages, model: ModelConfig, max_pending_decodes: int, max_message_bytes: int):
        self._stages, self._model = stages, model
        self._max_pending, self._max_bytes = max_pending_decodes, max_message_bytes
        self._background: set[asyncio.Task] = set()  # fire-and-forget cancels

    async def generate(self, spec: JobSpec, clock: stream.StreamClock | None = None
                       ) -> AsyncIterator[pb.GenerateResponse]:
        """The messages of one job: Accepted, Queued / Progress, Chunk parts, Done.

        ``clock``: started when the request arrived (default: now). Raises whatever a stage
        raises (e.g. :class:`stages.errors.InvalidInput`, :class:`cluster.engine.EngineBusy`).
        """
        clock = clock or stream.StreamClock()
        yield stream.accepted(spec, self._model)
        job = await self._engine_job(spec)
        async for message in self._run(job, clock):
            yield message

    async def _engine_job(self, spec: JobSpec) -> EngineJob:
        """Caption embeddings (+ the conditioning latent) of a job, fetched concurrently."""
        calls = [self._stages.encode_text([seg.text for seg in spec.prompt_segments])]
        if spec.image is not None:
            calls.append(self._stages.encode_image(spec.image))
        elif spec.prefix_video is not None:
            calls.append(self._stages.encode_video(spec.prefix_video))
        embeddings, *prefix = await asyncio.gather(*calls)
        return EngineJob(
            spec=spec,
            captions=tuple((seg.start_chunk, emb) for seg, emb in zip(spec.prompt_segments, embeddings)),
            prefix_latent=prefix[0] if prefix else None,
        )

    async def _run(self, job: EngineJob, clock: stream.StreamClock) -> AsyncIterator[pb.GenerateResponse]:
        spec = job.spec
        queue: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self._max_pending)
        pump = asyncio.create_task(self._pump(job, queue, slots))
        muxer = stream.ChunkMuxer(spec, self._model.sampling.fps)
        decode, finished = None, False
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, pb.GenerateResponse):
                    yield item
                    continue
                index, decode = item
                frames = await decode
                data = await asyncio.to_thread(muxer.mux, frames, index == spec.num_chunks - 1)
                slots.release()
                clock.chunk_sent(len(frames))
                for part in stream.chunk_parts(index, len(frames), data, spec.output_format, self._max_bytes):
                    yield part
            finished = True
            yield clock.done()
        finally:
            if not finished and not pump.done():  # the engine's stream is open: stop its work
                self._cancel_soon(spec.job_id)
            pump.cancel()
            _cancel_decodes(decode, queue)

    async def _pump(self, job: EngineJob, queue: asyncio.Queue, slots: asyncio.Semaphore) -> None:
        """Consume the engine's stream into ``queue``: messages and (index, decode task)."""
        try:
            async with contextlib.aclosing(self._stages.run(job)) as events:
                async for event in events:
                    if isinstance(event, Progress):
                        queue.put_nowait(stream.progress(event))
                    elif isinstance(event, QueuePosition):
                        queue.put_nowait(pb.GenerateResponse(queued=pb.Queued(position=event.position)))
                    elif isinstance(event, LatentChunk):
                        await slots.acquire()
                        decode = asyncio.ensure_future(self._stages.decode(event.latent, event.job_id))
                        queue.put_nowait((event.index, decode))
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  (re-raised by the consumer)
            queue.put_nowait(exc)

    def _cancel_soon(self, job_id: str) -> None:
        task = asyncio.ensure_future(self._stages.cancel(job_id))
        self._background.add(task)
        task.add_done_callback(_forget(self._background))


def _forget(tasks: set) -> Any:
    def done(task: asyncio.Future) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failed cancel is not worth a warning

    return done


def _cancel_decodes(current: asyncio.Future | None, queue: asyncio.Queue) -> None:
    """Cancel the decode being awaited and those still queued (a no-op for finished ones)."""
    pending = [current] + [item[1] for item in _drain(queue) if isinstance(item, tuple)]
    for task in pending:
        if task is not None:
            task.cancel()


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
