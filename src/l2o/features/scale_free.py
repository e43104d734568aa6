"""Scale-free features: the directions of the adaptive baselines, so that they are linear policies.

Per coordinate, with g_t the mini-batch gradient (element-wise; shared/design/beyond-the-paper.md §1):
  G_t = Σ_{i≤t} g_i²                          (AdaGrad's accumulator)
  v^β_t = β v^β_{t−1} + (1−β) g_t²,  m^β_t = β m^β_{t−1} + (1−β) g_t,   m̂, v̂ = bias-corrected.

State s_t for ψ (``STATE_NAMES``) holds the exact update directions of torch's optimizers, so
each baseline is a_t = −α·s_t[d] for one index d at any step size α:
  SGD: g;  momentum μ=0.9 / 0.99: m^μ/(1−μ) (torch's buf = μ·buf + g);
  AdaGrad: g/(√G + 1e-10);  RMSprop (alpha β): g/(√v^β + 1e-8);  Adam: m̂^0.9/(√v̂^0.999 + 1e-8).
A time-varying gain K_t on them is a learned schedule, and mixing them a learned combination.

Observation Ψ_t for π (``OBS_NAMES``) has only ratios of quantities of the same degree in g (no ε
constants: x/y is 0 where y = 0), so multiplying the objective by c > 0 leaves every Ψ feature
unchanged: normalised gradients and momenta, two noise-sensing ratios (|m̂|/√v̂ ∈ [0, 1] is large
when successive gradients agree, small when noise dominates), the relative loss change
(f_t − f_{t−1})/(|f_t| + |f_{t−1}|) ∈ [−1, 1] (0 when both are 0: a zero or negative loss is
legitimate), and a step-count embedding tanh(t/τ) that does not assume the horizon.
Memory is O(n): six accumulators per coordinate and the previous loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2o.features.sets import FeatureSet, Memory

ADAGRAD_EPS = 1e-10
"""torch.optim.Adagrad's default ε."""
ADAM_EPS = 1e-8
"""torch.optim.Adam's and RMSprop's default ε."""
BETAS_V = (0.9, 0.99, 0.999)
BETAS_M = (0.9, 0.99)
TAUS = (10.0, 100.0, 1000.0)

STATE_NAMES: tuple[str, ...] = (
    "g", "adagrad", "rmsprop0.9", "rmsprop0.99", "rmsprop0.999", "adam", "momentum0.9", "momentum0.99",
    "m0.9/sqrtG", "loss_change",
)
OBS_NAMES: tuple[str, ...] = (
    "g/sqrtG", "g/sqrtv0.9", "g/sqrtv0.99", "g/sqrtv0.999", "mhat0.9/sqrtvhat0.999", "mhat0.99/sqrtvhat0.999",
    "m0.9/sqrtG", "|mhat0.9|/sqrtvhat0.9", "sqrtvhat0.9/(sqrtvhat0.9+sqrtvhat0.999)", "loss_change",
    *(f"tanh(t/{int(tau)})" for tau in TAUS),
)
STATE_INDEX = {name: i for i, name in enumerate(STATE_NAMES)}
"""Index of each state feature (e.g. ``STATE_INDEX['adagrad']`` is where ψ₀ = AdaGrad puts −α)."""


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (no ε, so the ratio is exactly scale-free)."""
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num))


def loss_change(f: Tensor, f_prev: Tensor | None) -> Tensor:
    """(f_t − f_{t−1}) / (|f_t| + |f_{t−1}|) ∈ [−1, 1]; 0 at t = 0 and when both losses are 0."""
    if f_prev is None:
        return torch.zeros_like(f)
    return safe_div(f - f_prev, f.abs() + f_prev.abs())


class ScaleFreeFeatures(FeatureSet):
    """See the module docstring: s_t has ``len(STATE_NAMES)`` = 10 numbers, Ψ_t 13."""

    name = "scale-free"
    state_dim = len(STATE_NAMES)
    obs_dim = len(OBS_NAMES)
    grad_feature = STATE_INDEX["g"]
    state_names = STATE_NAMES
    obs_names = OBS_NAMES
    obs_directions = tuple(range(7))  # g/√G … m^0.9/√G; the rest are even in g or do not depend on it

    def init(self, n: int, horizon: int = 0, dtype: torch.dtype = torch.float32) -> Memory:
        z = torch.zeros(n, dtype=dtype)
        mem = {"G": z.clone(), "f_prev": torch.zeros((), dtype=dtype)}
        for b in BETAS_V:
            mem[f"v{b}"] = z.clone()
        for b in BETAS_M:
            mem[f"m{b}"] = z.clone()
        return mem

    def step(self, mem: Memory, t: int, x: Tensor, g: Tensor, f: Tensor,
             need_state: bool = True) -> tuple[Tensor | None, Tensor, Memory]:
        if t < 0:
            raise ValueError(f"step count must be >= 0, got {t}")
        f = torch.as_tensor(f, dtype=g.dtype)
        new: Memory = {"G": mem["G"] + g * g, "f_prev": f.detach().clone()}
        for b in BETAS_V:
            new[f"v{b}"] = b * mem[f"v{b}"] + (1 - b) * g * g
        for b in BETAS_M:
            new[f"m{b}"] = b * mem[f"m{b}"] + (1 - b) * g
        k = t + 1  # number of gradients seen, for the bias corrections 1 − β^k
        vhat = {b: new[f"v{b}"] / (1 - b ** k) for b in BETAS_V}
        mhat = {b: new[f"m{b}"] / (1 - b ** k) for b in BETAS_M}
        sqrtG = new["G"].sqrt()
        dl = loss_change(f, mem["f_prev"] if t > 0 else None).expand_as(g)
        S = None
        if need_state:
            cols = [g, g / (sqrtG + ADAGRAD_EPS)]
            cols += [g / (new[f"v{b}"].sqrt() + ADAM_EPS) for b in BETAS_V]
            cols.append(mhat[0.9] / (vhat[0.999].sqrt() + ADAM_EPS))
            cols += [new[f"m{b}"] / (1 - b) for b in BETAS_M]
            cols += [new["m0.9"] / (sqrtG + ADAGRAD_EPS), dl]
            S = torch.stack(cols, dim=-1)
        sv = {b: vhat[b].sqrt() for b in BETAS_V}
        obs = [safe_div(g, sqrtG)]
        obs += [safe_div(g, new[f"v{b}"].sqrt()) for b in BETAS_V]
        obs += [safe_div(mhat[0.9], sv[0.999]), safe_div(mhat[0.99], sv[0.999]), safe_div(new["m0.9"], sqrtG),
                safe_div(mhat[0.9].abs(), sv[0.9]), safe_div(sv[0.9], sv[0.9] + sv[0.999]), dl]
        obs += [torch.full_like(g, float(torch.tanh(torch.tensor(t / tau)))) for tau in TAUS]
        return S, torch.stack(obs, dim=-1), new
