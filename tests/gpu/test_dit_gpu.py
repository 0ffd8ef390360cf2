"""The DiT and the engine on CUDA against the golden data (``gpu`` marker; skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from cluster.engine import Engine
from tests.model.dit_fixtures import case_job, forward_window, model_config, run_case, run_config_name, sf_case
from tests.shared_data import golden_params

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SF_CASES = golden_params("golden_dit.json", where=lambda c: c["kind"] == "single_forward")
E2E_CASES = golden_params("golden_dit.json", where=lambda c: c["kind"] == "e2e_walk")


@pytest.mark.parametrize("case", SF_CASES)
def test_single_forward_on_cuda_matches_reference(case, golden_index, golden_tensors, golden_models, tiny_configs):
    sf = sf_case(case, golden_index, golden_tensors, tiny_configs)
    model = copy.deepcopy(golden_models[sf.model]).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    out = forward_window(model, **{k: None if v is None else v.cuda() for k, v in sf.inputs.items()})
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), golden_tensors[f"{case}/out"][0], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("case", E2E_CASES)
def test_engine_golden_case_on_cuda(case, golden_index, golden_tensors, golden_models, tiny_configs):
    meta = golden_index["cases"][case]
    dit = copy.deepcopy(golden_models[meta["model_config_name"]]).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    mc = model_config(meta, tiny_configs["run_configs"][run_config_name(case, tiny_configs)], dit.cfg)
    run = run_case(Engine(mc, dit, device="cuda", max_active_jobs=1), case_job(case, meta, golden_tensors, mc),
                   golden_tensors[f"{case}/noise"])
    assert [c.index for c in run.chunks] == meta["yielded_chunk_indices"]
    for c in run.chunks:
        torch.testing.assert_close(c.latent, golden_tensors[f"{case}/chunk_{c.index}"][0], atol=1e-3, rtol=1e-2)
