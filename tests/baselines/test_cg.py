"""Nonlinear conjugate gradient: finite termination on quadratics, Rosenbrock, torch.optim API."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from l2o.baselines.cg import ConjugateGradient

F64 = torch.float64


def spd_quadratic(n: int = 10, cond: float = 100.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Q diag(logspace(0, log10 cond)) Q^T, b random (float64)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    a = q @ torch.diag(torch.logspace(0.0, math.log10(cond), n, dtype=F64)) @ q.T
    return a, torch.randn(n, generator=gen, dtype=F64)


def linear_cg_iterates(a: torch.Tensor, b: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Textbook linear CG (N&W Alg. 5.2) from x = 0."""
    x = torch.zeros_like(b)
    r = a @ x - b
    p = -r
    out = []
    for _ in range(steps):
        ap = a @ p
        alpha = (r @ r) / (p @ ap)
        x = x + alpha * p
        r_new = r + alpha * ap
        p = -r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
        out.append(x.clone())
    return out


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def make_closure(opt: torch.optim.Optimizer, loss_fn, counter: list[int] | None = None):
    def closure() -> torch.Tensor:
        if counter is not None:
            counter[0] += 1
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("beta", ["PR+", "FR", "HS"])
def test_exact_line_search_terminates_in_n_steps_on_quadratic(beta: str) -> None:
    """CG with exact line searches is linear CG: finite termination in n steps.

    In float64 at condition number 100 even textbook linear CG only reaches ~1e-8 relative
    residual at step n (rounding erodes conjugacy: 8e-9..6e-8 over seeds 0-4), so we check
    the iterates against linear CG, a drop to <= 1e-6 at step n and <= 1e-8 at step n + 1.
    """
    n = 10
    a, b = spd_quadratic(n)
    x = torch.zeros(n, dtype=F64, requires_grad=True)
    opt = ConjugateGradient([x], line_search="exact", beta=beta)
    closure = make_closure(opt, lambda: 0.5 * x @ a @ x - b @ x)
    reference = linear_cg_iterates(a, b, n)
    g0 = b.norm()
    rel = []
    for k in range(n + 1):
        opt.step(closure)
        assert opt.state["line_search"]["success"] or k == n
        xk = x.detach()
        if k < n:
            torch.testing.assert_close(xk, reference[k], rtol=1e-6, atol=1e-7)
        rel.append(float((a @ xk - b).norm() / g0))
    assert rel[n - 2] > 1e-3  # not converged before the n-th step ...
    assert rel[n - 1] <= 1e-6  # ... but (to rounding) at it
    assert rel[n] <= 1e-8
    torch.testing.assert_close(x.detach(), torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)


def test_rosenbrock_strong_wolfe() -> None:
    """PR+ with strong Wolfe (c2 = 0.1) from (-1.2, 1): (1, 1) to 1e-5 within 60 steps (~32)."""
    x = torch.tensor([-1.2, 1.0], dtype=F64, requires_grad=True)
    opt = ConjugateGradient([x])
    closure = make_closure(opt, lambda: rosenbrock(x))
    for k in range(60):
        opt.step(closure)
        if float((x.detach() - 1.0).abs().max()) <= 1e-5:
            break
    assert float((x.detach() - 1.0).abs().max()) <= 1e-5, f"not converged after {k + 1} steps: {x}"


@pytest.mark.parametrize("beta", ["FR", "HS"])
def test_rosenbrock_other_betas_make_progress(beta: str) -> None:
    x = torch.tensor([-1.2, 1.0], dtype=F64, requires_grad=True)
    opt = ConjugateGradient([x], beta=beta)
    closure = make_closure(opt, lambda: rosenbrock(x))
    for _ in range(60):  # ~32 steps measured (in 2-D the default restart every n = 2 steps)
        opt.step(closure)
        if float(rosenbrock(x.detach())) < 1e-6:
            break
    assert float(rosenbrock(x.detach())) < 1e-6


def test_counters_and_return_value() -> None:
    x = torch.tensor([-1.2, 1.0], dtype=F64, requires_grad=True)
    opt = ConjugateGradient([x])
    count = [0]
    returned: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        count[0] += 1
        opt.zero_grad()
        loss = rosenbrock(x)
        loss.backward()
        if len(returned) < count[0]:
            returned.append(loss)
        return loss

    for k in range(5):
        before = count[0]
        out = opt.step(closure)
        assert out is returned[before]  # the loss at the START of the step
        assert count[0] - before == 1 + opt.state["line_search"]["evals"]
    assert opt.state["func_evals"] == count[0]
    assert opt.state["n_iter"] == 5


def test_restart_every_one_is_steepest_descent() -> None:
    x = torch.tensor([-1.2, 1.0], dtype=F64, requires_grad=True)
    opt = ConjugateGradient([x], restart_every=1)
    closure = make_closure(opt, lambda: rosenbrock(x))
    for _ in range(4):
        with torch.enable_grad():
            closure()
        g = x.grad.detach().clone()
        opt.step(closure)
        torch.testing.assert_close(opt.state[x]["d"], -g, rtol=0, atol=0)


def test_restart_when_not_descent() -> None:
    """A direction with g'd >= 0 is replaced by steepest descent."""
    x = torch.tensor([-1.2, 1.0], dtype=F64, requires_grad=True)
    opt = ConjugateGradient([x], beta="FR")
    closure = make_closure(opt, lambda: rosenbrock(x))
    opt.step(closure)
    with torch.enable_grad():
        closure()
    g = x.grad.detach().clone()
    st = opt.state[x]
    st["d"] = g.clone()  # uphill previous direction ...
    st["g"] = 1e-3 * g  # ... with a huge FR beta, so -g + beta d points uphill
    opt.step(closure)
    torch.testing.assert_close(st["d"], -g, rtol=0, atol=0)


def test_curvature_pair_uses_one_minibatch() -> None:
    """Stochastic quadratics f_B = 0.5 x'A_B x - b_B'x: stored y must equal A_B s of step's batch."""
    n = 6
    x = torch.zeros(n, dtype=F64, requires_grad=True)
    opt = ConjugateGradient([x])
    for k in range(5):
        a, b = spd_quadratic(n, cond=10.0, seed=100 + k)
        x_before = x.detach().clone()
        opt.step(make_closure(opt, lambda: 0.5 * x @ a @ x - b @ x))
        st = opt.state[x]
        torch.testing.assert_close(st["y"], a @ (x.detach() - x_before), rtol=1e-10, atol=1e-12)


def mlp_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.randn(32, 4), torch.randint(0, 3, (32,))


def test_mlp_multiple_tensors_loss_decreases() -> None:
    model, xb, yb = mlp_and_data()
    opt = ConjugateGradient(model.parameters())
    closure = make_closure(opt, lambda: nn.functional.cross_entropy(model(xb), yb))
    first = opt.step(closure).item()
    losses = [opt.step(closure).item() for _ in range(49)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * first
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))  # fixed batch: monotone


@pytest.mark.parametrize("line_search", ["strong_wolfe", "exact"])
def test_state_dict_round_trip_is_bitwise(line_search: str) -> None:
    """Save after k steps, load into a fresh optimizer on copied params: identical continuation."""

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 + step)
        return torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)

    def run(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
        out = []
        for k in steps:
            xb, yb = batch(k)
            out.append(opt.step(make_closure(opt, lambda: nn.functional.cross_entropy(model(xb), yb))).item())
        return out

    model, _, _ = mlp_and_data()
    opt = ConjugateGradient(model.parameters(), line_search=line_search, restart_every=7)
    run(model, opt, range(5))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = copy.deepcopy(model)
    opt2 = ConjugateGradient(model2.parameters(), line_search=line_search, restart_every=7)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    assert opt2.state["func_evals"] == opt.state["func_evals"]
    losses1 = run(model, opt, range(5, 10))
    losses2 = run(model2, opt2, range(5, 10))
    assert losses1 == losses2
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)
    assert opt.state["func_evals"] == opt2.state["func_evals"]


def test_closure_required() -> None:
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="closure"):
        ConjugateGradient([x]).step()


def test_nonfinite_loss_raises_floating_point_error() -> None:
    x = torch.zeros(2, requires_grad=True)
    opt = ConjugateGradient([x])
    with pytest.raises(FloatingPointError):
        opt.step(make_closure(opt, lambda: (x * math.nan).sum()))
    with pytest.raises(FloatingPointError):
        opt.step(make_closure(opt, lambda: (x + math.inf).sum()))


def test_parameter_group_and_sparse_errors() -> None:
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="single parameter group"):
        ConjugateGradient([{"params": [a]}, {"params": [b]}])
    opt = ConjugateGradient([a])
    with pytest.raises(ValueError, match="single parameter group"):
        opt.add_param_group({"params": [b]})
    with pytest.raises(ValueError):
        ConjugateGradient([a], beta="DY")
    emb = nn.Embedding(5, 2, sparse=True)
    opt = ConjugateGradient(emb.parameters())
    with pytest.raises(ValueError, match="sparse"):
        opt.step(make_closure(opt, lambda: emb(torch.tensor([0, 3])).pow(2).sum()))


def test_failed_line_search_does_not_move() -> None:
    """A gradient pointing the wrong way gives no decrease: params restored bit for bit."""
    x = torch.tensor([0.3, -0.7], requires_grad=True)
    opt = ConjugateGradient([x], max_evals=6)

    def closure() -> torch.Tensor:
        loss = (x.detach() ** 2).sum()
        x.grad = -2.0 * x.detach().clone()  # wrong sign: -g is uphill
        return loss

    x0 = x.detach().clone()
    opt.step(closure)
    assert torch.equal(x.detach(), x0)
    assert opt.state["line_search"] == {"success": False, "evals": 6, "step": 0.0}
    assert "d" not in opt.state[x]  # next step restarts
