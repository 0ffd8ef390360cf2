"""The DiT and the engine on CUDA (``gpu`` marker; skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from tests.model.dit_fixtures import run_case, sf_case_input

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("case", ["sf_base", "sf_glu"])
def test_single_forward_on_cuda_matches_reference(case, golden_index, golden_tensors, golden_models):
    import copy

    model = copy.deepcopy(golden_models["glu" if "glu" in case else "base"]).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    out = model(sf_case_input(case, golden_index, golden_tensors))
    assert out.velocity.is_cuda
    torch.testing.assert_close(out.velocity.cpu(), golden_tensors[f"{case}/out"][0], atol=1e-4, rtol=1e-3)


def test_engine_golden_case_on_cuda(golden_index, golden_tensors, golden_models, tiny_configs):
    import copy


    gpu_models = {k: copy.deepcopy(v).cuda() for k, v in golden_models.items()}
    _, events, _ = run_case("e2e_t2v_base_cfg3", golden_index, golden_tensors, gpu_models, tiny_configs)
    chunks = [e for e in events if hasattr(e, "latent")]
    for c in chunks:
        torch.testing.assert_close(c.latent, golden_tensors[f"e2e_t2v_base_cfg3/chunk_{c.index}"][0], atol=1e-3, rtol=1e-2)
