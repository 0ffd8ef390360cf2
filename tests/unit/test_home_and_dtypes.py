"""One resolution of ``$MAGI_HOME`` and one dtype-name map (issue 10, point 6)."""

from __future__ import annotations

import typing

import pytest
import torch

from stages.config import DiTConfig, DTypeName, TextEncoderConfig, magi_home
from stages.dtypes import DTYPES, torch_dtype
from stages.model_store import default_root
from stages.vae.export import default_cache_dir


def test_magi_home_moves_every_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGI_HOME", str(tmp_path))
    assert magi_home() == tmp_path
    assert default_root().parent == tmp_path and default_cache_dir().parent == tmp_path
    monkeypatch.delenv("MAGI_HOME")
    assert default_root().parent == magi_home() == default_cache_dir().parent != tmp_path


def test_every_config_dtype_name_maps_to_a_torch_dtype():
    names = typing.get_args(DTypeName)
    assert set(names) == set(DTYPES)
    for cfg_cls, name in ((DiTConfig, "params_dtype"), (TextEncoderConfig, "dtype")):
        assert set(typing.get_args(cfg_cls.model_fields[name].annotation)) == set(names)
    assert {torch_dtype(n) for n in names} == {torch.float32, torch.bfloat16, torch.float16}
    with pytest.raises(ValueError, match="float64"):
        torch_dtype("float64")
