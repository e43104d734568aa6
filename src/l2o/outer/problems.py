"""Inner problems with known answers, for testing outer trainers against closed forms.

- :class:`QuadraticProblem`: L(θ) = ½θᵀAθ + bᵀθ (one step, no state): ∇L = Aθ + b, and the
  smoothed objective E L(θ+ε) = L(θ) + ½σ² tr A has the same gradient.
- :class:`AccumulatorProblem`: s_{t+1} = s_t + θ, s_0 = 0, loss ½(s_{t+1} − c)² at step t; the total
  loss over T steps Σ_{t=1}^{T} ½(tθ − c)² has gradient Σ_t t(tθ − c) (:meth:`total_loss_grad`), while
  a truncated window (kW, (k+1)W] whose carried-in state is held fixed has gradient
  Σ_{t in window} (t − kW)(tθ − c) (:meth:`truncated_grad`): truncated ES is biased towards it.
- :class:`SeparableQuadraticStepSize`: f(x) = ½·mean_j h_j x_j², h_j ~ U[h_lo, h_hi] i.i.d.,
  x_0 ~ N(0, I), x_{t+1} = x_t − k ∇f-per-coordinate i.e. x_j ← (1 − k h_j) x_j with θ = k;
  meta-objective (1/T) Σ_{t=0}^{T−1} f(x_t), expectation ½·(1/T) Σ_t E_h[h (1 − kh)^{2t}]
  (:func:`expected_step_size_objective`), minimised by :func:`best_constant_step_size`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from l2o.outer.base import State


class QuadraticProblem:
    """One-step problem: loss ½θᵀAθ + bᵀθ per run (state-free)."""

    def __init__(self, A: Tensor, b: Tensor) -> None:
        self.A, self.b = A, b
        self.dim = b.numel()

    def init_runs(self, n: int, gen: torch.Generator) -> State:
        return {"dummy": torch.zeros(n, 1, dtype=self.b.dtype)}

    def loss(self, theta: Tensor) -> Tensor:
        return 0.5 * torch.einsum("...i,ij,...j->...", theta, self.A, theta) + theta @ self.b

    def step(self, theta: Tensor, state: State, t: Tensor, gen: torch.Generator) -> tuple[Tensor, State]:
        return self.loss(theta), state

    def grad(self, theta: Tensor) -> Tensor:
        return self.A @ theta + self.b


class AccumulatorProblem:
    """s_{t+1} = s_t + θ (θ scalar), loss ½(s_{t+1} − c)² at 0-based step t."""

    dim = 1

    def __init__(self, c: float = 10.0, dtype: torch.dtype = torch.float64) -> None:
        self.c, self.dtype = c, dtype

    def init_runs(self, n: int, gen: torch.Generator) -> State:
        return {"s": torch.zeros(n, 1, dtype=self.dtype)}

    def step(self, theta: Tensor, state: State, t: Tensor, gen: torch.Generator) -> tuple[Tensor, State]:
        s = state["s"] + theta
        return 0.5 * (s[..., 0] - self.c) ** 2, {"s": s}

    def total_loss_grad(self, theta: float, T: int) -> float:
        """d/dθ Σ_{t=1}^{T} ½(tθ − c)²."""
        return sum(t * (t * theta - self.c) for t in range(1, T + 1))

    def truncated_grad(self, theta: float, T: int, W: int) -> float:
        """Σ over windows k of d/dθ' Σ_{t in (kW,(k+1)W]} ½(kWθ + (t−kW)θ' − c)² at θ' = θ."""
        return sum((t - (t - 1) // W * W) * (t * theta - self.c) for t in range(1, T + 1))


class SeparableQuadraticStepSize:
    """A learned constant step size k = θ₀ on random separable quadratics (d coordinates per run)."""

    dim = 1

    def __init__(self, d: int = 20, h_lo: float = 0.1, h_hi: float = 1.0, dtype: torch.dtype = torch.float64) -> None:
        self.d, self.h_lo, self.h_hi, self.dtype = d, h_lo, h_hi, dtype

    def init_runs(self, n: int, gen: torch.Generator) -> State:
        h = self.h_lo + (self.h_hi - self.h_lo) * torch.rand(n, self.d, generator=gen, dtype=self.dtype)
        x = torch.randn(n, self.d, generator=gen, dtype=self.dtype)
        return {"h": h, "x": x}

    def step(self, theta: Tensor, state: State, t: Tensor, gen: torch.Generator) -> tuple[Tensor, State]:
        h, x = state["h"], state["x"]
        loss = 0.5 * (h * x * x).mean(-1)
        x = x - theta * (h * x)
        return loss, {"h": h, "x": x}


def expected_step_size_objective(k: float | np.ndarray, T: int, h_lo: float, h_hi: float, nodes: int = 64) -> float | np.ndarray:
    """½·(1/T) Σ_{t=0}^{T−1} E_h[h (1 − kh)^{2t}], h ~ U[h_lo, h_hi], for a step size k or an array of
    them (Gauss–Legendre quadrature: exact for these polynomials of degree ≤ 4T − 1 in h when
    2·nodes − 1 ≥ 4T − 1)."""
    nodes = max(nodes, 2 * T)
    z, w = np.polynomial.legendre.leggauss(nodes)
    h = 0.5 * (h_hi - h_lo) * z + 0.5 * (h_hi + h_lo)
    w = w / 2.0
    kk = np.asarray(k, dtype=np.float64)[..., None]
    r = (1 - kk * h) ** 2
    acc, power = np.zeros_like(r), np.ones_like(r)
    for _ in range(T):
        acc += power
        power = power * r
    value = 0.5 * (acc * (w * h)).sum(-1) / T
    return float(value) if np.ndim(k) == 0 else value


def best_constant_step_size(T: int, h_lo: float, h_hi: float, lo: float = 0.0, hi: float | None = None) -> float:
    """argmin_k of :func:`expected_step_size_objective`: brute force on a grid of 20,001 points, then
    golden-section refinement inside the bracketing grid cells."""
    hi = hi if hi is not None else 2.5 / h_hi
    grid = np.linspace(lo, hi, 20001)
    i = int(np.argmin(expected_step_size_objective(grid, T, h_lo, h_hi)))
    a, b = float(grid[max(0, i - 1)]), float(grid[min(len(grid) - 1, i + 1)])
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - phi * (b - a), a + phi * (b - a)
        if expected_step_size_objective(c, T, h_lo, h_hi) < expected_step_size_objective(d, T, h_lo, h_hi):
            b = d
        else:
            a = c
    return 0.5 * (a + b)
