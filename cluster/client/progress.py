"""Terminal progress bar of a ``Generate`` stream (tqdm, on stderr)."""

from __future__ import annotations

from tqdm import tqdm

from magi.v1 import generate_pb2 as pb


class ProgressView:
    """One bar over denoising steps (num_chunks x num_steps) with received chunks in the label.

    The position is the oldest in-flight chunk's progress (chunk * num_steps + step);
    chunks are staggered, so later chunks are already partly denoised when it advances.
    """

    def __init__(self, disable: bool = False):
        self._disable = disable
        self._bar: tqdm | None = None
        self._chunks = 0
        self._num_chunks = 0

    def update(self, msg: pb.GenerateResponse) -> None:
        kind = msg.WhichOneof("event")
        if kind == "accepted":
            a = msg.accepted
            self._num_chunks = a.num_chunks
            self._bar = tqdm(total=a.num_chunks * a.num_steps, unit="step", disable=self._disable,
                             desc=self._label(), leave=True)
        elif self._bar is None:
            return
        elif kind == "progress":
            p = msg.progress
            self._advance(p.chunk * p.num_steps + p.step)
        elif kind == "chunk" and msg.chunk.last_part:
            self._chunks += 1
            self._bar.set_description(self._label())
        elif kind == "done":
            self._advance(self._bar.total)

    def _advance(self, position: int) -> None:
        position = min(position, self._bar.total)
        if position > self._bar.n:
            self._bar.update(position - self._bar.n)

    def _label(self) -> str:
        return f"chunks {self._chunks}/{self._num_chunks}"

    def __enter__(self) -> "ProgressView":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
