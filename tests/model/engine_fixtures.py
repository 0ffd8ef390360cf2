"""Helpers shared by the multi-job engine tests (magi-tiny DiT with random tiny weights, 64x64
video and 4 steps so every run takes a fraction of a second). No tests here."""

from __future__ import annotations

import pytest
import torch

from cluster.engine import Engine
from cluster.messages import CaptionEmbedding, EngineJob, JobSpec, LatentChunk, PromptSegment
from stages.config import magi_tiny
from stages.dit.weights import load_dit, write_tiny_checkpoint

SIZE = 64  # pixels: 8x8 latents, 96 tokens per chunk
STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(ModelConfig magi-tiny, its MagiDiT with deterministic random weights)."""
    cfg = magi_tiny()
    path = tmp_path_factory.mktemp("engine_dit")
    write_tiny_checkpoint(cfg.dit, path, seed=0)
    return cfg, load_dit(path, cfg.dit)


def caption(seed: int, valid: int = 7, length: int = 64, channels: int = 64) -> CaptionEmbedding:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(length, dtype=torch.int64)
    mask[:valid] = 1
    return CaptionEmbedding(torch.randn(length, channels, generator=gen), mask)


def make_job(job_id: str, num_chunks: int | None, seed: int, prompt: int = 1, prefix=None, steps: int = STEPS) -> EngineJob:
    spec = JobSpec(job_id=job_id, prompt_segments=(PromptSegment(0, "p"),), num_chunks=num_chunks, height=SIZE,
                   width=SIZE, seed=seed, num_steps=steps)
    return EngineJob(spec, ((0, caption(prompt)),), prefix_latent=prefix)


def image_latent(seed: int = 3) -> torch.Tensor:
    return torch.randn(16, 1, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def drain(engine: Engine, on_step=None) -> dict[str, dict[int, torch.Tensor]]:
    """Step ``engine`` until idle; returns job -> chunk index -> latent. ``on_step(i, engine)``
    runs before step i (to submit, cancel or update between steps)."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    i = 0
    while True:
        if on_step is not None:
            on_step(i, engine)
        if not engine.has_work:
            return out
        for e in engine.step():
            if isinstance(e, LatentChunk):
                out.setdefault(e.job_id, {})[e.index] = e.latent
        i += 1


def run_alone(engine: Engine, job: EngineJob) -> dict[int, torch.Tensor]:
    engine.submit(job)
    return drain(engine)[job.spec.job_id]


def max_diff(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)
