"""Fixtures for every test: the shared golden and inputs folders (see tests/shared_data.py) and
the golden DiT data (golden_dit.*, tiny_dit_config.json and the tiny golden models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import shared_data


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``../shared/golden`` (skips, or fails under MAGI_REQUIRE_GOLDEN=1, when absent)."""
    return shared_data.need(shared_data.golden_dir(), "golden data")


@pytest.fixture(scope="session")
def inputs_dir() -> Path:
    """``../shared/inputs`` (skips, or fails under MAGI_REQUIRE_GOLDEN=1, when absent)."""
    return shared_data.need(shared_data.inputs_dir(), "shared inputs")


# ----- golden DiT data (tests/model, tests/gpu) -----


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
    from tests.model.dit_fixtures import WEIGHTS, dit_config_from_reference

    return {name: load_dit(golden_dir / file, dit_config_from_reference(tiny_configs[name]["model_config"])).eval()
            for name, file in WEIGHTS.items()}
