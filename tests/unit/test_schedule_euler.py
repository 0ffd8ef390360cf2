"""euler_step: the flow-matching Euler update per chunk (reference ``SampleTransport.integrate``)."""

from __future__ import annotations

import pytest
import torch

from stages.errors import InvalidInput
from stages.sampling import euler_step, init_t


def _window(k: int, width: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, k * width, 4, 4, generator=g)
    v = torch.randn(1, 16, k * width, 4, 4, generator=g)
    return x, v


def test_scalar_step_is_x_plus_v_dt_in_float32():
    x, v = _window(1)
    t = init_t(8)
    out = euler_step(x, v, t[3].item(), t[4].item())
    assert out.dtype == torch.float32
    assert torch.equal(out, x + v * (t[4] - t[3]))


def test_per_chunk_steps_match_a_chunk_by_chunk_loop():
    x, v = _window(3, width=2)
    t = init_t(16)
    ks = [9, 5, 1]  # oldest chunk first, as in a staggered window
    out = euler_step(x, v, [t[k].item() for k in ks], [t[k + 1].item() for k in ks])
    for j, k in enumerate(ks):
        sl = slice(2 * j, 2 * j + 2)
        assert torch.equal(out[:, :, sl], x[:, :, sl] + v[:, :, sl] * (t[k + 1] - t[k]))


def test_tensor_timesteps_accepted_and_input_untouched():
    x, v = _window(2)
    x0 = x.clone()
    t = init_t(8)
    out = euler_step(x, v, t[[4, 0]], t[[5, 1]])
    assert torch.equal(x, x0)
    assert torch.equal(out[:, :, 2:], x[:, :, 2:] + v[:, :, 2:] * (t[1] - t[0]))


def test_constant_velocity_walks_noise_to_data():
    # x_t = (1 - t) x0 + t x1 with v = x1 - x0: Euler is exact for a straight path
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(16, 6, 4, 4, generator=g), torch.randn(16, 6, 4, 4, generator=g)
    t = init_t(32).tolist()
    x = x0
    for a, b in zip(t, t[1:]):
        x = euler_step(x, x1 - x0, a, b)
    torch.testing.assert_close(x, x1, atol=1e-5, rtol=1e-5)


def test_zero_step_is_identity():
    x, v = _window(2)
    assert torch.equal(euler_step(x, v, [0.3, 0.1], [0.3, 0.1]), x)


def test_shape_errors_name_the_field():
    x, v = _window(3)
    with pytest.raises(InvalidInput) as err:
        euler_step(x, v[:, :, :4], 0.0, 0.1)
    assert err.value.field == "velocity"
    with pytest.raises(InvalidInput) as err:
        euler_step(x, v, [0.0, 0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4])  # T=6 is not 4 chunks
    assert err.value.field == "x"
    with pytest.raises(InvalidInput) as err:
        euler_step(x, v, [0.0, 0.1, 0.2], [0.1, 0.2])
    assert err.value.field == "t_next"
