"""L-BFGS: Rosenbrock, quadratic termination, same-batch curvature pairs, torch.optim API."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn

from l2o.baselines.lbfgs import LBFGS

F64 = torch.float64


def spd_quadratic(n: int = 10, cond: float = 100.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    a = q @ torch.diag(torch.logspace(0.0, math.log10(cond), n, dtype=F64)) @ q.T
    return a, torch.randn(n, generator=gen, dtype=F64)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def make_closure(opt: torch.optim.Optimizer, loss_fn):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


def run_rosenbrock(x0: list[float], max_steps: int, tol: float) -> tuple[torch.Tensor, int]:
    x = torch.tensor(x0, dtype=F64, requires_grad=True)
    opt = LBFGS([x])
    closure = make_closure(opt, lambda: rosenbrock(x))
    for k in range(max_steps):
        opt.step(closure)
        if float((x.detach() - 1.0).abs().max()) <= tol:
            return x.detach(), k + 1
    return x.detach(), max_steps


def scipy_lbfgsb(x0: list[float]) -> np.ndarray:
    res = scipy.optimize.minimize(
        scipy.optimize.rosen, np.array(x0), jac=scipy.optimize.rosen_der, method="L-BFGS-B",
        options={"maxiter": 5000, "ftol": 1e-20, "gtol": 1e-12},
    )
    return res.x


def test_rosenbrock_2d() -> None:
    """From (-1.2, 1): (1, 1) to 1e-6 within 50 steps (36 measured)."""
    x, steps = run_rosenbrock([-1.2, 1.0], 50, 1e-6)
    assert float((x - 1.0).abs().max()) <= 1e-6, f"{x} after {steps} steps"
    np.testing.assert_allclose(x.numpy(), scipy_lbfgsb([-1.2, 1.0]), atol=1e-5)


def test_rosenbrock_chain_50() -> None:
    """n = 50 chained Rosenbrock from 0: all ones to 1e-6 within 400 steps (~254 measured)."""
    x0 = [0.0] * 50
    x, steps = run_rosenbrock(x0, 400, 1e-6)
    assert float((x - 1.0).abs().max()) <= 1e-6, f"not converged after {steps} steps"
    np.testing.assert_allclose(x.numpy(), scipy_lbfgsb(x0), atol=1e-5)


def test_quadratic_exact_search_full_history_terminates() -> None:
    """history >= n and exact searches: L-BFGS coincides with CG, solves in <= n + 1 steps."""
    n = 10
    a, b = spd_quadratic(n)
    x = torch.zeros(n, dtype=F64, requires_grad=True)
    opt = LBFGS([x], history_size=n, line_search="exact")
    closure = make_closure(opt, lambda: 0.5 * x @ a @ x - b @ x)
    for _ in range(n + 1):
        opt.step(closure)
    assert float((a @ x.detach() - b).norm() / b.norm()) <= 1e-8
    torch.testing.assert_close(x.detach(), torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)


def test_quadratic_strong_wolfe_converges() -> None:
    n = 10
    a, b = spd_quadratic(n)
    x = torch.zeros(n, dtype=F64, requires_grad=True)
    opt = LBFGS([x], history_size=n)
    closure = make_closure(opt, lambda: 0.5 * x @ a @ x - b @ x)
    for _ in range(60):
        opt.step(closure)
    torch.testing.assert_close(x.detach(), torch.linalg.solve(a, b), rtol=1e-6, atol=1e-6)


def test_curvature_pairs_use_one_minibatch() -> None:
    """Stochastic quadratics f_B = 0.5 x'A_B x - b_B'x: every stored y equals A_B s."""
    n = 6
    x = torch.zeros(n, dtype=F64, requires_grad=True)
    opt = LBFGS([x], history_size=3)
    mats = []
    for k in range(6):
        a, b = spd_quadratic(n, cond=10.0, seed=100 + k)
        mats.append(a)
        opt.step(make_closure(opt, lambda: 0.5 * x @ a @ x - b @ x))
        st = opt.state[x]
        assert len(st["old_s"]) == min(k + 1, 3)
        for j, (s, y) in enumerate(zip(st["old_s"], st["old_y"])):
            a_j = mats[k - len(st["old_s"]) + 1 + j]
            torch.testing.assert_close(y, a_j @ s, rtol=1e-10, atol=1e-12)


def test_curvature_condition_skips_bad_pairs() -> None:
    """Concave f = -|x|^2: the search stops at max_step (a decrease, so the step is taken)
    but s'y = -2|s|^2 < 0, so the pair is skipped."""
    x = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    opt = LBFGS([x], max_step=0.5)
    x0 = x.detach().clone()
    opt.step(make_closure(opt, lambda: -(x @ x)))
    assert opt.state["line_search"]["step"] == 0.5 and not opt.state["line_search"]["success"]
    assert not torch.equal(x.detach(), x0)
    assert opt.state[x]["old_s"] == [] and opt.state[x]["old_y"] == []


def test_counters_and_return_value() -> None:
    x = torch.tensor([-1.2, 1.0], dtype=F64, requires_grad=True)
    opt = LBFGS([x])
    calls: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = rosenbrock(x)
        loss.backward()
        calls.append(loss)
        return loss

    for _ in range(5):
        before = len(calls)
        out = opt.step(closure)
        assert out is calls[before]
        assert len(calls) - before == 1 + opt.state["line_search"]["evals"]
        assert isinstance(opt.state["line_search"]["success"], bool)
    assert opt.state["func_evals"] == len(calls)
    assert opt.state["n_iter"] == 5


def test_mlp_multiple_tensors_loss_decreases() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    xb, yb = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = LBFGS(model.parameters())
    closure = make_closure(opt, lambda: nn.functional.cross_entropy(model(xb), yb))
    first = opt.step(closure).item()
    losses = [opt.step(closure).item() for _ in range(49)]
    assert losses[-1] < 0.5 * first
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))  # fixed batch: monotone


def test_state_dict_round_trip_is_bitwise() -> None:
    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(2000 + step)
        return torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)

    def run(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
        out = []
        for k in steps:
            xb, yb = batch(k)
            out.append(opt.step(make_closure(opt, lambda: nn.functional.cross_entropy(model(xb), yb))).item())
        return out

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = LBFGS(model.parameters(), history_size=3)
    run(model, opt, range(6))
    assert len(opt.state[next(model.parameters())]["old_s"]) == 3
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = copy.deepcopy(model)
    opt2 = LBFGS(model2.parameters(), history_size=3)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    assert opt2.state["func_evals"] == opt.state["func_evals"]
    assert run(model, opt, range(6, 12)) == run(model2, opt2, range(6, 12))
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)
    assert opt.state["func_evals"] == opt2.state["func_evals"]
    assert opt.state["line_search"] == opt2.state["line_search"]


def test_closure_required() -> None:
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="closure"):
        LBFGS([x]).step()


def test_nonfinite_loss_raises_floating_point_error() -> None:
    x = torch.zeros(2, requires_grad=True)
    opt = LBFGS([x])
    with pytest.raises(FloatingPointError):
        opt.step(make_closure(opt, lambda: (x * math.nan).sum()))


def test_parameter_group_and_sparse_errors() -> None:
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="single parameter group"):
        LBFGS([{"params": [a]}, {"params": [b]}])
    with pytest.raises(ValueError):
        LBFGS([a], history_size=0)
    with pytest.raises(ValueError):
        LBFGS([a], line_search="armijo")
    with pytest.raises(ValueError):
        LBFGS([a, torch.zeros(2, dtype=F64, requires_grad=True)])
    emb = nn.Embedding(5, 2, sparse=True)
    opt = LBFGS(emb.parameters())
    with pytest.raises(ValueError, match="sparse"):
        opt.step(make_closure(opt, lambda: emb(torch.tensor([0, 3])).pow(2).sum()))


def test_failed_line_search_does_not_move_and_drops_history() -> None:
    x = torch.tensor([0.3, -0.7], dtype=F64, requires_grad=True)
    opt = LBFGS([x], max_evals=5)
    opt.step(make_closure(opt, lambda: (x**2).sum() + x.sum() ** 4))
    assert len(opt.state[x]["old_s"]) == 1

    def wrong_sign() -> torch.Tensor:
        loss = (x.detach() ** 2).sum()
        x.grad = -2.0 * x.detach().clone()
        return loss

    # force a -g search (history would otherwise rescale it): drop it by hand first
    opt.state[x]["old_s"], opt.state[x]["old_y"] = [], []
    x0 = x.detach().clone()
    opt.step(wrong_sign)
    assert torch.equal(x.detach(), x0)
    assert opt.state["line_search"] == {"success": False, "evals": 5, "step": 0.0}
    assert opt.state[x]["old_s"] == []
