"""Feature sets: what a learned optimizer and its guiding policy see of one coordinate.

A :class:`FeatureSet` turns the stream (x_t, ∇f̂_t, f̂_t) into, per coordinate j,
* the state s_t^j (``state_dim`` numbers) on which the linear-Gaussian ψ of GPS acts, and
* the observation o_t^j = Ψ_t^j (``obs_dim`` numbers) that the policy π reads at test time.

Features are computed online and vectorised over coordinates (no Python loop over them); the
running memory is a ``{name: tensor}`` dict, so an optimizer can keep it in its ``state`` and a
rollout can carry it. ``grad_feature`` is the index in s_t of the (mini-batch) gradient, which
the telescoped cost model of Convolutional GPS reads. Sets are looked up by name
(:func:`get_feature_set`), and a checkpoint records the name of the set it was trained on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

Memory = dict[str, Tensor]


class FeatureSet(ABC):
    """Online per-coordinate features: s_t (for ψ) and Ψ_t (for π)."""

    name: str
    state_dim: int
    obs_dim: int
    grad_feature: int
    state_names: tuple[str, ...] = ()
    obs_names: tuple[str, ...] = ()
    obs_directions: tuple[int, ...] = ()
    """Indices of the Ψ features that are update directions (odd in the gradient: they flip sign with
    it), which a linear base step may combine; the others (noise ratios, loss change, step count) may not."""

    def state_index(self, name: str | None) -> int:
        """Index in s_t of the state feature ``name`` (the gradient feature when None or empty)."""
        if not name:
            return self.grad_feature
        if name not in self.state_names:
            raise ValueError(f"{name!r} is not a state feature of {self.name!r}; known: {list(self.state_names)}")
        return self.state_names.index(name)

    @abstractmethod
    def init(self, n: int, horizon: int, dtype: torch.dtype = torch.float32) -> Memory:
        """The memory before step 0 for ``n`` coordinates (``horizon``: at most that many steps)."""

    @abstractmethod
    def step(self, mem: Memory, t: int, x: Tensor, g: Tensor, f: Tensor,
             need_state: bool = True) -> tuple[Tensor | None, Tensor, Memory]:
        """Read x_t, ∇f̂_t [n] and f̂_t (scalar tensor) at step t; return s_t [n, D] (None unless
        ``need_state``), Ψ_t [n, P] and the memory for step t + 1."""


class Paper2017Features(FeatureSet):
    """The paper's features, exactly (Li & Malik 2017, §3.6; :mod:`l2o.features.conv2017`):
    s_t = (x_t, Φ_t) with 77 numbers per coordinate, Ψ_t with 3. Φ reads lagged averages up to
    125 steps back, so the memory holds the whole history ([horizon + 1, n])."""

    name = "paper2017"

    def __init__(self) -> None:
        from l2o.features.conv2017 import N_OBJ, PSI_DIM, STATE_DIM

        # Φ2_0 = ḡ_t/(|ḡ_{max(t−5, t mod 5)}| + 1) follows x_t and the 25 objective changes.
        self.state_dim, self.obs_dim, self.grad_feature = STATE_DIM, PSI_DIM, 1 + N_OBJ

    def init(self, n: int, horizon: int, dtype: torch.dtype = torch.float32) -> Memory:
        T1 = int(horizon) + 1
        return {"xs": torch.zeros(T1, n, dtype=dtype), "gs": torch.zeros(T1, n, dtype=dtype),
                "fs": torch.zeros(T1, dtype=dtype)}

    def step(self, mem: Memory, t: int, x: Tensor, g: Tensor, f: Tensor,
             need_state: bool = True) -> tuple[Tensor | None, Tensor, Memory]:
        from l2o.features.conv2017 import observation_step, state_features

        xs, gs, fs = mem["xs"], mem["gs"], mem["fs"]
        if t >= xs.shape[0]:
            raise ValueError(f"step {t} is beyond the horizon {xs.shape[0] - 1} this memory was made for")
        xs[t], gs[t], fs[t] = x, g, f
        obs = observation_step(fs[t], fs[t - 1] if t >= 1 else None, gs[t], gs[t - 1] if t >= 1 else None,
                               xs[t], xs[t - 1] if t >= 1 else None, xs[t - 2] if t >= 2 else None)
        S = None
        if need_state:
            phi = state_features(xs[: t + 1], gs[: t + 1], fs[: t + 1], times=torch.tensor([t]))[0]
            S = torch.cat([x.unsqueeze(-1), phi], dim=-1)
        return S, obs, mem


def get_feature_set(name: str) -> FeatureSet:
    """The feature set called ``name`` (``paper2017`` or ``scale-free``)."""
    if name == Paper2017Features.name:
        return Paper2017Features()
    from l2o.features.scale_free import ScaleFreeFeatures

    if name == ScaleFreeFeatures.name:
        return ScaleFreeFeatures()
    raise ValueError(f"unknown feature set {name!r}; known: {FEATURE_SETS}")


FEATURE_SETS: tuple[str, ...] = ("paper2017", "scale-free")
