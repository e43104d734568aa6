"""Separable quadratics with a known best step-size schedule: the ground truth for outer trainers.

f(x) = ½ Σ_j h_j x_j², one coordinate group, curvatures h_j drawn log-uniformly from [h_min, h_max]
by the instance seed, x⁽⁰⁾ ~ N(0, I) by the run seed. The "mini-batch" objective adds unbiased
gradient noise: f̂(x) = f(x) + σ ξᵀx with ξ ~ N(0, I) drawn per step (∇f̂ = h⊙x + σξ).

Under the step a_t = −k_t ∇f̂_t, per coordinate E[x_{t+1}²] = (1 − k_t h)² E[x_t²] + k_t² σ², so
the expected mean objective over steps 1..T, J(k) = (1/T) Σ_{t=1}^{T} ½ Σ_j h_j E[x_{j,t}²], is a
smooth closed-form function of the schedule k (:func:`expected_mean_loss`); :func:`best_schedule`
minimises it (shared/design/beyond-the-paper.md §3). Without noise the best constant step of a
single h is 1/h; with noise the best schedule decays.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from l2o.tasks.base import Group, Task


class SeparableQuadratic(Task):
    """f(x) = ½ Σ_j h_j x_j² with per-step gradient noise of std ``noise`` (see the module docstring)."""

    def __init__(self, dim: int = 1000, h_min: float = 0.1, h_max: float = 1.0, noise: float = 0.0,
                 instance: int = 0) -> None:
        if dim < 1 or not 0 < h_min <= h_max or noise < 0:
            raise ValueError("need dim >= 1, 0 < h_min <= h_max and noise >= 0")
        self.name = f"separable-quadratic:{dim}:h{h_min:g}-{h_max:g}:s{noise:g}"
        self.groups = (Group("x", (dim,)),)
        self.noise = float(noise)
        self.batch_size = None if noise == 0 else 1
        self.num_examples = 2 ** 31 - 1  # sample_batch draws a noise seed from [0, 2³¹ − 1)
        gen = torch.Generator().manual_seed(9_000_011 + instance)
        u = torch.rand(dim, generator=gen, dtype=torch.float64)
        self.h = torch.exp(torch.log(torch.tensor(h_min, dtype=torch.float64)) * (1 - u)
                           + torch.log(torch.tensor(h_max, dtype=torch.float64)) * u)

    def init_params(self, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(int(seed))
        return {"x": torch.randn(self.groups[0].shape, generator=gen, dtype=torch.float64).to(dtype)}

    def sample_batch(self, generator: torch.Generator) -> Tensor | None:
        if self.batch_size is None:
            return None
        return torch.randint(0, self.num_examples, (1,), generator=generator)

    def loss(self, params: Mapping[str, Tensor], indices: Tensor | None = None) -> Tensor:
        x = params["x"]
        f = 0.5 * (self.h.to(x.dtype) * x.square()).sum()
        if indices is None or self.noise == 0:
            return f
        xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(indices.reshape(-1)[0])),
                         dtype=torch.float64).to(x.dtype)
        return f + self.noise * (xi * x).sum()


def expected_mean_loss(k: Tensor, h: Tensor, noise: float = 0.0) -> Tensor:
    """J(k) = (1/T) Σ_{t=1}^{T} E f(x_t) for a_t = −k_t ∇f̂_t from x⁽⁰⁾ ~ N(0, I) (differentiable in k)."""
    e = torch.ones_like(h, dtype=k.dtype)
    hk = h.to(k.dtype)
    total = torch.zeros((), dtype=k.dtype)
    for kt in k:
        e = (1 - kt * hk).square() * e + kt.square() * noise ** 2
        total = total + 0.5 * (hk * e).sum()
    return total / len(k)


def best_schedule(h: Tensor, horizon: int, noise: float = 0.0, constant: bool = False,
                  iterations: int = 500) -> tuple[Tensor, float]:
    """The schedule k (length ``horizon``; one shared value if ``constant``) minimising
    :func:`expected_mean_loss`, by L-BFGS from k = 1/mean(h); returns (k, J(k))."""
    h = h.to(torch.float64)
    k0 = 1.0 / float(h.mean())
    p = torch.full((1 if constant else horizon,), k0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([p], lr=1.0, max_iter=iterations, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def sched() -> Tensor:
        return p.expand(horizon) if constant else p

    def closure() -> Tensor:
        opt.zero_grad()
        loss = expected_mean_loss(sched(), h, noise)
        loss.backward()
        return loss

    opt.step(closure)
    k = sched().detach().clone()
    return k, float(expected_mean_loss(k, h, noise))
