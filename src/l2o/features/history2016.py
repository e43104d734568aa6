"""State features of Learning to Optimize (Li & Malik 2016): the recent history of the run.

For a run with iterates x⁽⁰⁾…x⁽ᵗ⁾ (n coordinates), gradients ∇f(x⁽ⁱ⁾) and objective values f(x⁽ⁱ⁾),
the features at step t over the last H iterations are
  objective changes  f(x⁽ᵗ⁾) − f(x⁽ᵗ⁻ⁱ⁾),      i = 1..H          (H values)
  gradients          ∇f(x⁽ᵗ⁻ⁱ⁾),               i = 0..H−1        (H·n values)
  steps              x⁽ᵗ⁻ⁱ⁾ − x⁽ᵗ⁻ⁱ⁻¹⁾,          i = 0..H−1        (H·n values)
with zeros wherever a time index is negative. The MDP state is (x⁽ᵗ⁾, features); the policy π sees
the features only, so the learned optimizer is invariant to translating the iterate.
"""

from __future__ import annotations

import torch
from torch import Tensor


def feature_dim(n: int, H: int) -> int:
    """Length of the feature vector for n coordinates and history H: H + 2Hn."""
    return H + 2 * H * n


def history_features(xs: Tensor, gs: Tensor, fs: Tensor, H: int) -> Tensor:
    """Features at every t = 0..T from full histories xs, gs [T+1, n] and fs [T+1]: [T+1, H + 2Hn]."""
    if xs.dim() != 2 or gs.shape != xs.shape or fs.shape != xs.shape[:1]:
        raise ValueError(f"need xs, gs [T+1, n] and fs [T+1]; got {tuple(xs.shape)}, {tuple(gs.shape)}, {tuple(fs.shape)}")
    T1, n = xs.shape
    t = torch.arange(T1).view(-1, 1)
    i = torch.arange(H).view(1, -1)

    lag = t - (i + 1)  # f(x_t) − f(x_{t−i}), i = 1..H
    dobj = torch.where(lag >= 0, fs.view(-1, 1) - fs[lag.clamp(min=0)], torch.zeros((), dtype=fs.dtype))

    lag = t - i  # ∇f(x_{t−i}), i = 0..H−1
    grads = torch.where((lag >= 0).unsqueeze(-1), gs[lag.clamp(min=0)], torch.zeros((), dtype=gs.dtype))

    steps_all = torch.zeros_like(xs)
    steps_all[1:] = xs[1:] - xs[:-1]  # step ending at i; the "step ending at 0" is undefined → 0
    steps = torch.where((lag >= 1).unsqueeze(-1), steps_all[lag.clamp(min=0)], torch.zeros((), dtype=xs.dtype))
    return torch.cat([dobj, grads.reshape(T1, -1), steps.reshape(T1, -1)], dim=1)


class HistoryTracker:
    """The same features online, from a rolling window (what the learned optimizer keeps)."""

    def __init__(self, n: int, H: int, dtype: torch.dtype = torch.float64) -> None:
        self.n, self.H = n, H
        self.fs = torch.zeros(H + 1, dtype=dtype)  # f(x_t), f(x_{t−1}), …
        self.gs = torch.zeros(H, n, dtype=dtype)
        self.steps = torch.zeros(H, n, dtype=dtype)
        self.x_prev: Tensor | None = None
        self.t = -1

    def update(self, x: Tensor, g: Tensor, f: Tensor | float) -> Tensor:
        """Record step t's (x, ∇f, f) and return its feature vector [H + 2Hn]."""
        self.t += 1
        self.fs = torch.roll(self.fs, 1)
        self.fs[0] = float(f)
        self.gs = torch.roll(self.gs, 1, dims=0)
        self.gs[0] = g.reshape(-1)
        self.steps = torch.roll(self.steps, 1, dims=0)
        self.steps[0] = 0.0 if self.x_prev is None else (x.reshape(-1) - self.x_prev)
        self.x_prev = x.reshape(-1).clone()
        valid = torch.arange(1, self.H + 1) <= self.t
        dobj = torch.where(valid, self.fs[0] - self.fs[1:], torch.zeros((), dtype=self.fs.dtype))
        return torch.cat([dobj, self.gs.reshape(-1), self.steps.reshape(-1)])

    def state_dict(self) -> dict[str, Tensor]:
        x_prev = torch.zeros(self.n, dtype=self.fs.dtype) if self.x_prev is None else self.x_prev
        return {"fs": self.fs, "gs": self.gs, "steps": self.steps, "x_prev": x_prev, "t": torch.tensor(self.t)}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self.fs, self.gs, self.steps = d["fs"].clone(), d["gs"].clone(), d["steps"].clone()
        self.t = int(d["t"])
        self.x_prev = None if self.t < 0 else d["x_prev"].clone()
