"""The coordinate-wise LSTM of Andrychowicz et al. (2016): preprocessing formula and the step."""

from __future__ import annotations

import math

import pytest
import torch

from l2o.learned.l2l import (
    Hidden,
    check_net,
    init_hidden,
    init_net,
    preprocess_gradient,
    step,
)


def test_preprocessing_on_hand_picked_values():
    p = 10.0
    thr = math.exp(-p)
    g = torch.tensor([1.0, -1.0, math.e, -(math.e**5), 1e-2, thr, -thr, 1e-6, -1e-6, 0.0, -0.0, 2e-5], dtype=torch.float64)
    out = preprocess_gradient(g, p)
    expected = torch.tensor([
        [0.0, 1.0],                 # log 1 = 0
        [0.0, -1.0],
        [0.1, 1.0],                 # log e / 10
        [0.5, -1.0],                # log e^5 / 10, negative sign
        [math.log(1e-2) / p, 1.0],
        [-1.0, 1.0],                # boundary |g| = e^-p: first branch, log e^-p / p = -1
        [-1.0, -1.0],
        [-1.0, 1e-6 * math.exp(p)], # small: (-1, e^p g)
        [-1.0, -1e-6 * math.exp(p)],
        [-1.0, 0.0],                # zero
        [-1.0, 0.0],
        [-1.0, 2e-5 * math.exp(p)], # 2e-5 < e^-10 ≈ 4.54e-5
    ], dtype=torch.float64)
    assert out.shape == (12, 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # continuity across the boundary: just below gives (−1, ≈ sign g)
    below = preprocess_gradient(torch.tensor([thr * (1 - 1e-9)], dtype=torch.float64), p)
    torch.testing.assert_close(below, torch.tensor([[-1.0, 1.0]], dtype=torch.float64), atol=1e-8, rtol=0)


def test_preprocessing_other_p_and_shapes_and_finite_gradients():
    g = torch.tensor([[1e-3, 0.0], [-5.0, 1e-4]], dtype=torch.float64, requires_grad=True)
    out = preprocess_gradient(g, p=5.0)
    assert out.shape == (2, 2, 2)
    assert float(out.detach()[0, 0, 1]) == pytest.approx(1e-3 * math.exp(5.0))  # 1e-3 < e^-5 ≈ 6.7e-3
    assert float(out.detach()[1, 0, 0]) == pytest.approx(math.log(5.0) / 5.0)
    out.sum().backward()
    assert torch.isfinite(g.grad).all()  # differentiable at 0 too (second-order meta-gradients)


def test_step_shapes_scale_and_state():
    net = init_net(0, dtype=torch.float64)
    assert check_net(net) == 20
    grad = torch.randn(3, 4, 5, dtype=torch.float64)
    h = init_hidden(grad.numel(), dtype=torch.float64)
    upd, h2 = step(net, h, grad, output_scale=0.1)
    assert upd.shape == grad.shape and isinstance(h2, Hidden) and h2.h1.shape == (60, 20)
    upd2, _ = step(net, h, grad, output_scale=0.2)
    torch.testing.assert_close(upd2, 2 * upd)
    # a scalar parameter works too
    u0, _ = step(net, init_hidden(1, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64))
    assert u0.shape == ()


def test_step_is_coordinatewise():
    net = init_net(1, dtype=torch.float64)
    g = torch.randn(50, dtype=torch.float64)
    perm = torch.randperm(50)
    h = init_hidden(50, dtype=torch.float64)
    u, h1 = step(net, h, g)
    up, h1p = step(net, Hidden(*(t[perm] for t in h)), g[perm])
    torch.testing.assert_close(up, u[perm], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(h1p.c2, h1.c2[perm], rtol=1e-13, atol=1e-15)


def test_check_net_rejects_wrong_weights():
    net = init_net(0)
    with pytest.raises(ValueError, match="missing"):
        check_net({k: v for k, v in net.items() if k != "b2"})
    with pytest.raises(ValueError, match="W_out"):
        check_net({**net, "W_out": torch.zeros(2, 20)})
