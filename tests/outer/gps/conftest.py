"""Shared random-problem factories for the GPS tests (exposed as fixtures)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from l2o.outer.gps import LinearGaussianDynamics, LinearGaussianPolicy, QuadraticCost

DT = torch.float64


def spd(n: int, g: torch.Generator, scale: float = 1.0, jitter: float = 0.5) -> torch.Tensor:
    M = torch.randn(n, n, dtype=DT, generator=g)
    return scale * (M @ M.T / n + jitter * torch.eye(n, dtype=DT))


def stable(n: int, g: torch.Generator, radius: float = 0.9) -> torch.Tensor:
    M = torch.randn(n, n, dtype=DT, generator=g)
    return radius * M / torch.linalg.matrix_norm(M, ord=2)


def random_dynamics(T: int, D: int, d: int, g: torch.Generator, noise: float = 0.1) -> LinearGaussianDynamics:
    A = torch.stack([stable(D, g) for _ in range(T - 1)])
    B = torch.randn(T - 1, D, d, dtype=DT, generator=g) / d**0.5
    c = 0.3 * torch.randn(T - 1, D, dtype=DT, generator=g)
    F = torch.stack([spd(D, g, noise**2) for _ in range(T - 1)])
    return LinearGaussianDynamics(A, B, c, F)


def random_policy(T: int, D: int, d: int, g: torch.Generator, gain: float = 0.3, var: float = 1.0) -> LinearGaussianPolicy:
    K = gain * torch.randn(T, d, D, dtype=DT, generator=g)
    k = gain * torch.randn(T, d, dtype=DT, generator=g)
    G = torch.stack([spd(d, g, var) for _ in range(T)])
    return LinearGaussianPolicy(K, k, G)


def random_cost(T: int, D: int, d: int, g: torch.Generator) -> QuadraticCost:
    n = D + d
    C = torch.stack([spd(n, g) for _ in range(T)])
    lin = torch.randn(T, n, dtype=DT, generator=g)
    h = torch.randn(T, dtype=DT, generator=g)
    return QuadraticCost(C, lin, h, D)


@pytest.fixture
def rp() -> SimpleNamespace:
    """Random problem factories: rp.dynamics, rp.policy, rp.cost, rp.spd, rp.stable."""
    return SimpleNamespace(dynamics=random_dynamics, policy=random_policy, cost=random_cost, spd=spd, stable=stable)
