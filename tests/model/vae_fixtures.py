"""Golden-data helpers for the VAE tests (reference outputs in ``../shared/golden``, see its README;
found through tests/shared_data.py). Not a test module."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages.config import VaeConfig
from tests import shared_data

FLOAT_ATOL = 1e-5
FLOAT_RTOL = 1e-4


def golden_path(name: str) -> Path:
    """``<golden>/name``; skips (fails under MAGI_REQUIRE_GOLDEN=1) when absent."""
    return shared_data.golden_file(name)


@lru_cache(maxsize=None)
def golden_vae_config() -> VaeConfig:
    """The golden tiny ddconfig + scale_factor as a VaeConfig."""
    data = json.loads(golden_path("tiny_vae_config.json").read_text())
    return VaeConfig(**data["ddconfig"], scale_factor=data["scale_factor"])


@lru_cache(maxsize=None)
def golden_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(golden_path("golden_vae.safetensors")))


@lru_cache(maxsize=None)
def golden_cases() -> dict:
    return json.loads(golden_path("golden_vae.json").read_text())["cases"]


def golden_kwargs(case: str) -> dict:
    return dict(golden_cases()[case]["kwargs"])


def golden_video() -> torch.Tensor:
    """(1, 3, 24, 48, 48) float video in [-1, 1], exactly as the reference computes it."""
    return golden_tensors()["video_u8"].float() / 127.5 - 1


def assert_close_float(actual: torch.Tensor, name: str) -> None:
    expected = golden_tensors()[name]
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=FLOAT_ATOL, rtol=FLOAT_RTOL, msg=lambda m: f"{name}: {m}")


def assert_close_uint8(actual: torch.Tensor, expected: torch.Tensor, name: str, max_fraction: float = 1e-3) -> None:
    """At most off-by-one, on at most ``max_fraction`` of the values (float truncation ties)."""
    assert actual.shape == expected.shape and actual.dtype == torch.uint8, (name, actual.shape, actual.dtype)
    diff = (actual.int() - expected.int()).abs()
    assert diff.max().item() <= 1, f"{name}: max uint8 difference {diff.max().item()}"
    assert (diff > 0).float().mean().item() <= max_fraction, f"{name}: {(diff > 0).sum().item()} values off by one"
