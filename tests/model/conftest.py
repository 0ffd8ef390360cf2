"""Shared fixtures for the DiT and engine tests: the reference golden data (``shared/golden``).

Fixtures skip the test when the golden folder is absent (see ``dit_fixtures.GOLDEN_DIR``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.model.dit_fixtures import GOLDEN_DIR, dit_config_from_reference, golden_available


@pytest.fixture(scope="session")
def golden_index() -> dict:
    if not golden_available():
        pytest.skip(f"golden data not found at {GOLDEN_DIR}")
    return json.loads((GOLDEN_DIR / "golden_dit.json").read_text())


@pytest.fixture(scope="session")
def golden_tensors() -> dict[str, torch.Tensor]:
    if not golden_available():
        pytest.skip(f"golden data not found at {GOLDEN_DIR}")
    return load_file(str(GOLDEN_DIR / "golden_dit.safetensors"))


@pytest.fixture(scope="session")
def tiny_configs() -> dict:
    """``tiny_dit_config.json`` as a dict."""
    if not golden_available():
        pytest.skip(f"golden data not found at {GOLDEN_DIR}")
    return json.loads((GOLDEN_DIR / "tiny_dit_config.json").read_text())


@pytest.fixture(scope="session")
def golden_models(tiny_configs):
    """{"base": MagiDiT, "glu": MagiDiT} loaded from the golden tiny weights (float32, eval)."""
    from stages.dit.weights import load_dit

    models = {}
    for name, file in (("base", "tiny_dit.safetensors"), ("glu", "tiny_dit_glu.safetensors")):
        cfg = dit_config_from_reference(tiny_configs[name]["model_config"])
        models[name] = load_dit(GOLDEN_DIR / file, cfg).eval()
    return models


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
