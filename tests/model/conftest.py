"""Shared fixtures for the DiT and engine tests: the reference golden data (``../shared/golden``,
through the ``golden_dir`` fixture of tests/conftest.py: skipped when absent, failed under
MAGI_REQUIRE_GOLDEN=1).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.model.dit_fixtures import WEIGHTS, dit_config_from_reference


@pytest.fixture(scope="session")
def golden_index(golden_dir) -> dict:
    """``golden_dit.json``."""
    return json.loads((golden_dir / "golden_dit.json").read_text())


@pytest.fixture(scope="session")
def golden_tensors(golden_dir) -> dict[str, torch.Tensor]:
    """``golden_dit.safetensors``."""
    return load_file(str(golden_dir / "golden_dit.safetensors"))


@pytest.fixture(scope="session")
def tiny_configs(golden_dir) -> dict:
    """``tiny_dit_config.json`` as a dict."""
    return json.loads((golden_dir / "tiny_dit_config.json").read_text())


@pytest.fixture(scope="session")
def golden_models(golden_dir, tiny_configs):
    """{"base": MagiDiT, "glu": MagiDiT} loaded from the golden tiny weights (float32, eval)."""
    from stages.dit.weights import load_dit

    return {name: load_dit(golden_dir / file, dit_config_from_reference(tiny_configs[name]["model_config"])).eval()
            for name, file in WEIGHTS.items()}


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
