"""State features Φ and observation features Ψ of Convolutional GPS (Li & Malik 2017, §3.6).

Histories are tensors over time: iterates ``xs`` [T+1, n], mini-batch gradients ``gs`` [T+1, n]
and mini-batch objective values ``fs`` [T+1] (f̂(x⁽ⁱ⁾) for i = 0..T). Everything is element-wise
over the n coordinates and vectorised over time; no Python loop runs over coordinates or steps.

Average recent quantities (window of the last min(i+1, 3) values):
  x̄⁽ⁱ⁾ = mean_{j=max(i−2,0)}^{i} x⁽ʲ⁾, and likewise ḡ⁽ⁱ⁾ and f̄⁽ⁱ⁾.
State features Φ_t (76 per coordinate), lagged at stride 5:
  Φ1_i = (f̄⁽ᵗ⁻⁵ⁱ⁾ − f̄⁽ᵗ⁻⁵⁽ⁱ⁺¹⁾⁾) / d(f̄⁽ᵗ⁻⁵⁽ⁱ⁺¹⁾⁾),                           i = 0..24 (25)
  Φ2_i = ḡ⁽ᵗ⁻⁵ⁱ⁾ / (|ḡ⁽ᵐᵃˣ⁽ᵗ⁻⁵⁽ⁱ⁺¹⁾, ᵗ ᵐᵒᵈ ⁵⁾⁾| + 1),                            i = 0..25 (26)
  Φ3_i = |x̄⁽ᵐᵃˣ⁽ᵗ⁻⁵⁽ⁱ⁺¹⁾, ᵗ ᵐᵒᵈ ⁵ ⁺ ⁵⁾⁾ − x̄⁽ᵐᵃˣ⁽ᵗ⁻⁵⁽ⁱ⁺²⁾, ᵗ ᵐᵒᵈ ⁵⁾⁾|
         / (|x̄⁽ᵗ⁻⁵ⁱ⁾ − x̄⁽ᵗ⁻⁵⁽ⁱ⁺¹⁾⁾| + 0.1),                                       i = 0..24 (25)
A term is the zero vector when it is undefined, i.e. when a time index it needs is negative:
Φ1_i and Φ3_i need t − 5(i+1) ≥ 0, Φ2_i needs t − 5i ≥ 0. (For Φ3 this also excludes the one
case where the max() index t mod 5 + 5 would lie in the future, t < 5.)
Observation features Ψ_t (3 per coordinate):
  Ψ1 = (f̂⁽ᵗ⁾ − f̂⁽ᵗ⁻¹⁾) / d(f̂⁽ᵗ⁻¹⁾)  (0 at t = 0)
  Ψ2 = ∇f̂⁽ᵗ⁾ / (|∇f̂⁽ᵐᵃˣ⁽ᵗ⁻¹,⁰⁾⁾| + 1)
  Ψ3 = |x⁽ᵐᵃˣ⁽ᵗ⁻¹,¹⁾⁾ − x⁽ᵐᵃˣ⁽ᵗ⁻²,⁰⁾⁾| / (|x⁽ᵗ⁾ − x⁽ᵗ⁻¹⁾| + 0.1)  (0 at t = 0)
The paper divides by the previous objective value itself; here the denominator is
d(f) = max(|f|, δ) with δ = ``LOSS_FLOOR`` = 1e-8, so a loss of exactly 0 (a hinge loss, or
cross-entropy underflowing) or a negative loss gives a finite feature whose sign still says
whether the objective went down. For f ≥ δ (every objective the shipped policies were trained
on) d(f) = f and the features are bit for bit the paper's.
The state s_t of a coordinate is (x_t, Φ_t): ``STATE_DIM`` = 77 (see /shared/design/gps.md §1).
"""

from __future__ import annotations

import torch
from torch import Tensor

N_OBJ, N_GRAD, N_STEP = 25, 26, 25
PHI_DIM = N_OBJ + N_GRAD + N_STEP  # 76
STATE_DIM = PHI_DIM + 1  # the iterate's coordinate, then Φ
PSI_DIM = 3
STRIDE = 5
LOSS_FLOOR = 1e-8
"""δ of the loss-change denominator d(f) = max(|f|, δ) (see the module docstring)."""


def loss_denominator(f: Tensor) -> Tensor:
    """d(f) = max(|f|, δ): equals f for f ≥ δ; finite and positive for f ≤ 0."""
    return f.abs().clamp(min=LOSS_FLOOR)


def average_recent(h: Tensor) -> Tensor:
    """x̄⁽ⁱ⁾ = mean of h⁽ʲ⁾ for j = max(i−2, 0)..i, along dim 0 (works for [T+1] and [T+1, n])."""
    c = torch.cumsum(h, dim=0)
    lagged = torch.zeros_like(c)
    lagged[3:] = c[:-3]
    counts = torch.clamp(torch.arange(1, h.shape[0] + 1, device=h.device), max=3).to(h.dtype)
    return (c - lagged) / counts.view(-1, *([1] * (h.dim() - 1)))


def _check(xs: Tensor, gs: Tensor, fs: Tensor) -> None:
    if xs.dim() != 2 or gs.shape != xs.shape:
        raise ValueError(f"xs and gs must both be [T+1, n]; got {tuple(xs.shape)} and {tuple(gs.shape)}")
    if fs.shape != xs.shape[:1]:
        raise ValueError(f"fs must be [T+1] = [{xs.shape[0]}], got {tuple(fs.shape)}")


def state_features(xs: Tensor, gs: Tensor, fs: Tensor, times: Tensor | None = None) -> Tensor:
    """Φ_t for each t in ``times`` (default 0..T): [len(times), n, 76], in the order Φ1, Φ2, Φ3."""
    _check(xs, gs, fs)
    T1 = xs.shape[0]
    t = torch.arange(T1) if times is None else torch.as_tensor(times, dtype=torch.long)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T1):
        raise ValueError(f"times must lie in [0, {T1 - 1}]")
    xb, gb, fb = average_recent(xs), average_recent(gs), average_recent(fs)
    tc = t.view(-1, 1)
    tmod = tc % STRIDE

    i = torch.arange(N_OBJ).view(1, -1)
    a, b = tc - STRIDE * i, tc - STRIDE * (i + 1)
    ok = b >= 0
    fa, fbb = fb[a.clamp(min=0)], fb[b.clamp(min=0)]
    phi1 = torch.where(ok, (fa - fbb) / torch.where(ok, loss_denominator(fbb), torch.ones_like(fbb)), torch.zeros_like(fa))
    phi1 = phi1.unsqueeze(1).expand(-1, xs.shape[1], -1)

    i = torch.arange(N_GRAD).view(1, -1)
    a = tc - STRIDE * i
    den = torch.maximum(tc - STRIDE * (i + 1), tmod)
    ok = (a >= 0).unsqueeze(-1)
    phi2 = gb[a.clamp(min=0)] / (gb[den].abs() + 1.0)
    phi2 = torch.where(ok, phi2, torch.zeros_like(phi2)).transpose(1, 2)

    i = torch.arange(N_STEP).view(1, -1)
    a, b = tc - STRIDE * i, tc - STRIDE * (i + 1)
    n1 = torch.maximum(tc - STRIDE * (i + 1), tmod + STRIDE)
    n2 = torch.maximum(tc - STRIDE * (i + 2), tmod)
    ok = (b >= 0).unsqueeze(-1)
    bc = b.clamp(min=0)
    num = (xb[n1.clamp(max=T1 - 1)] - xb[n2]).abs()
    phi3 = num / ((xb[a.clamp(min=0)] - xb[bc]).abs() + 0.1)
    phi3 = torch.where(ok, phi3, torch.zeros_like(phi3)).transpose(1, 2)
    return torch.cat([phi1, phi2, phi3], dim=-1)


def states(xs: Tensor, gs: Tensor, fs: Tensor, times: Tensor | None = None) -> Tensor:
    """s_t = (x_t, Φ_t) per coordinate: [len(times), n, 77]."""
    t = torch.arange(xs.shape[0]) if times is None else torch.as_tensor(times, dtype=torch.long)
    return torch.cat([xs[t].unsqueeze(-1), state_features(xs, gs, fs, t)], dim=-1)


def observation_features(xs: Tensor, gs: Tensor, fs: Tensor) -> Tensor:
    """Ψ_t for every t = 0..T from full histories: [T+1, n, 3] (Ψ1, Ψ2, Ψ3)."""
    _check(xs, gs, fs)
    T1, n = xs.shape
    t = torch.arange(T1)
    prev = (t - 1).clamp(min=0)
    rel = torch.where(t > 0, (fs - fs[prev]) / torch.where(t > 0, loss_denominator(fs[prev]), torch.ones_like(fs)), torch.zeros_like(fs))
    psi2 = gs / (gs[prev].abs() + 1.0)
    num = (xs[(t - 1).clamp(min=1).clamp(max=T1 - 1)] - xs[(t - 2).clamp(min=0)]).abs()
    psi3 = num / ((xs - xs[prev]).abs() + 0.1)
    psi3 = torch.where((t > 0).view(-1, 1), psi3, torch.zeros_like(psi3))
    return torch.stack([rel.view(-1, 1).expand(-1, n), psi2, psi3], dim=-1)


def observation_step(f: Tensor, f_prev: Tensor | None, g: Tensor, g_prev: Tensor | None,
                     x: Tensor, x_prev: Tensor | None, x_prev2: Tensor | None) -> Tensor:
    """Ψ_t online from the last three iterates only (what PSD needs at test time): [..., 3].

    ``None`` marks an undefined past value: ``f_prev``/``g_prev``/``x_prev`` at t = 0, and
    ``x_prev2`` at t = 1, where the formula's indices max(t−1, 1) = 1, max(t−2, 0) = 0 make the
    numerator |x⁽¹⁾ − x⁽⁰⁾|.
    """
    if f_prev is None or x_prev is None or g_prev is None:  # t = 0
        return torch.stack([torch.zeros_like(g), g / (g.abs() + 1.0), torch.zeros_like(g)], dim=-1)
    rel = ((f - f_prev) / loss_denominator(f_prev)).expand_as(g)
    psi2 = g / (g_prev.abs() + 1.0)
    num = (x - x_prev).abs() if x_prev2 is None else (x_prev - x_prev2).abs()
    return torch.stack([rel, psi2, num / ((x - x_prev).abs() + 0.1)], dim=-1)
