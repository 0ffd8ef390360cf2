"""Chunk / frame arithmetic (cluster.scheduler.chunks)."""

from __future__ import annotations

import json

import pytest

from cluster.scheduler.chunks import (
    I2V_PREFIX_LATENT_FRAMES,
    chunk_latent_range,
    job_layout,
    latent_frames,
    prefix_split,
    reference_layout,
    video_frames,
)
from stages.config import magi_tiny
from stages.errors import InvalidInput

from tests.shared_data import golden_params, run_config_name


def test_video_frames_of_shipped_chunks():
    assert video_frames(1, 6, 4) == 24  # one chunk = 24 frames = 1 s at 24 fps
    assert video_frames(10, 6) == 240
    s = magi_tiny().sampling
    assert video_frames(3, s.chunk_width, s.temporal_downsample_factor) == 3 * s.frames_per_chunk
    assert video_frames(0, 6) == 0


def test_latent_frames_roundtrip_and_errors():
    assert latent_frames(24) == 6 and latent_frames(0) == 0
    assert latent_frames(video_frames(7, 6)) == 42
    with pytest.raises(InvalidInput) as err:
        latent_frames(25, field="prefix_video")
    assert err.value.field == "prefix_video" and "multiple of 4" in str(err.value)
    with pytest.raises(InvalidInput):
        latent_frames(-4)


@pytest.mark.parametrize(
    "prefix, width, expected",
    [(0, 6, (0, 0)), (1, 6, (0, 1)), (5, 6, (0, 5)), (6, 6, (1, 0)), (13, 6, (2, 1)), (4, 2, (2, 0))],
)
def test_prefix_split(prefix, width, expected):
    assert prefix_split(prefix, width) == expected


def test_i2v_is_one_leftover_frame():
    assert prefix_split(I2V_PREFIX_LATENT_FRAMES, 6) == (0, 1)
    lay = job_layout(4, I2V_PREFIX_LATENT_FRAMES, 6)
    assert (lay.num_chunks, lay.chunk_offset, lay.leftover_frames, lay.num_generated) == (4, 0, 1, 4)


def test_v2v_job_layout_counts_prefix_chunks_globally():
    lay = job_layout(3, 13, 6)  # 2 whole prefix chunks + 1 leftover frame, 3 generated chunks
    assert (lay.num_chunks, lay.chunk_offset, lay.leftover_frames, lay.num_generated) == (5, 2, 1, 3)
    with pytest.raises(InvalidInput) as err:
        job_layout(0, 0, 6)
    assert err.value.field == "num_chunks"


@pytest.mark.parametrize("case", golden_params("golden_dit.json", where=lambda c: c["kind"] == "e2e_walk"))
def test_reference_layout_matches_golden_cases(case, golden_dir):
    """Chunks of every golden walk from its run config's ``num_frames`` (tiny_dit_config.json)."""
    spec = json.loads((golden_dir / "golden_dit.json").read_text())["cases"][case]
    tiny = json.loads((golden_dir / "tiny_dit_config.json").read_text())
    rt = tiny["run_configs"][run_config_name(case, tiny)]["runtime_config"]
    prefix = spec["prefix_frames"]
    lay = reference_layout(latent_frames(rt["num_frames"], rt["temporal_downsample_factor"]), prefix, spec["chunk_width"])
    assert lay.num_chunks == spec["chunk_num"]
    assert lay.num_generated == len(spec["yielded_chunk_indices"])
    assert lay.chunk_offset == prefix // spec["chunk_width"]


def test_reference_layout_i2v_adds_a_chunk():
    # num_frames 32 -> 8 latent frames, + 1 image frame, chunk_width 2 -> 5 chunks
    lay = reference_layout(8, 1, 2)
    assert (lay.num_chunks, lay.chunk_offset, lay.leftover_frames) == (5, 0, 1)


def test_chunk_latent_range():
    assert chunk_latent_range(0, 6) == (0, 6)
    assert chunk_latent_range(3, 6) == (18, 24)
    with pytest.raises(InvalidInput) as err:
        chunk_latent_range(-1, 6)
    assert err.value.field == "chunk"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_chunk_width_names_field(bad):
    with pytest.raises(InvalidInput) as err:
        prefix_split(3, bad)
    assert err.value.field == "chunk_width"
