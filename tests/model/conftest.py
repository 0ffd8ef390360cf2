"""Fixtures of the model tests: the tiny VAE (the golden DiT fixtures are in tests/conftest.py)."""

from __future__ import annotations

import pytest


# ----- the tiny VAE (magi-tiny, deterministic random weights), shared by the VAE tests -----


@pytest.fixture(scope="session")
def tiny_vae_cfg():
    """``magi_tiny().vae``."""
    from stages.config import magi_tiny

    return magi_tiny().vae


@pytest.fixture(scope="session")
def tiny_vae_ckpt(tiny_vae_cfg, tmp_path_factory):
    """Folder with the tiny VAE checkpoint (``write_tiny_checkpoint``, seed 0)."""
    from stages.vae.weights import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny_vae")
    write_tiny_checkpoint(tiny_vae_cfg, folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def tiny_vae(tiny_vae_cfg, tiny_vae_ckpt):
    """The tiny VAE loaded on CPU (float32); one per test module (tests may register hooks)."""
    from stages.vae.weights import load_vae

    return load_vae(tiny_vae_ckpt, tiny_vae_cfg)
