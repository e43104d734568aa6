"""The MDP of Convolutional GPS (Li & Malik 2017, §3.5–3.6): rollouts of an optimizer on a task,
recorded per coordinate group.

Per coordinate j the state is s_t^j = (x_t^j, Φ_t^j) (77 numbers), the observation o_t^j = Ψ_t^j
(3), the action a_t^j = Δx^j and x_{t+1} = x_t + a_t. A controller acts on *all* coordinates at
once (features are computed vectorised over coordinates, never in a Python loop over them); for
fitting, every trajectory records a fixed random subsample of ``coords_per_group`` coordinates of
each group (the coordinates of a group are exchangeable samples of one per-group problem, so a
subsample estimates the same per-group statistics at a fraction of the memory).

Each rollout also records, for the telescoped cost model of :mod:`l2o.outer.gps.conv_cost`:
* the true objective f(x_t) every ``eval_every`` steps (and at t = T), for the costs ψ and π
  actually incur;
* per group g, the effective curvature along the step taken, h_{g,t} = a_gᵀ(∇²f̂ a)_g / a_gᵀa_g,
  every ``curvature_every`` steps (a Hessian–vector product on that step's mini-batch). Summed
  over groups, ½ Σ_g h_{g,t}|a_g|² = ½ aᵀ∇²f̂ a, the exact second-order term of the step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from l2o.features.sets import FeatureSet, Paper2017Features
from l2o.tasks.base import Task, flatten, unflatten

from .linear_gaussian import DTYPE

PRECONDITIONERS = ("none", "adam")
"""Action spaces of ψ: a itself, or u = p·a with p² ∝ √v̂ (see :func:`rollout`)."""
GRAD_FEATURE = Paper2017Features().grad_feature
"""Index in s_t^j of Φ2_0 = ḡ_t/(|ḡ_{max(t−5, t mod 5)}| + 1), the state's current-gradient feature
(after x_t^j and the 25 objective-change features)."""


class Controller(Protocol):
    """Chooses a_t for every coordinate (flat, in group order)."""

    needs_states: bool
    """Whether :meth:`act` needs the states s_t (computing Φ for every coordinate costs time)."""

    def reset(self, n: int) -> None: ...

    def act(self, t: int, states: Tensor | None, observations: Tensor, generator: torch.Generator) -> Tensor:
        """states [n, D] (or None), observations [n, P] → actions [n]."""
        ...


@dataclass
class Rollout:
    """One trajectory. Per group g (in task order): ``states[g]`` [T, S_g, D], ``actions[g]``
    [T, S_g], ``observations[g]`` [T, S_g, P] for the subsampled coordinates ``coords[g]``.
    ``true_loss`` [len(eval_steps)] is f(x_t) at ``eval_steps``; ``batch_loss`` [T] is f̂_t;
    ``curvature`` [len(curvature_steps), G] is h_{g,t}; ``action_rms`` [T, G] the RMS step per
    group; ``grad_moments`` [len(eval_steps), G, 2] holds Σ_j ∇_j f·Φ2_0^j and Σ_j (Φ2_0^j)² over the
    group's coordinates at the evaluated steps (true gradient ∇f on the full training set), from
    which the trainer regresses the true gradient on the state's gradient feature. ``diverged`` is set (and the arrays are NaN from that step on) if f̂ or a step was not
    finite."""

    seed: int
    states: list[Tensor]
    actions: list[Tensor]
    observations: list[Tensor]
    coords: list[Tensor]
    eval_steps: Tensor
    true_loss: Tensor
    batch_loss: Tensor
    curvature_steps: Tensor
    curvature: Tensor
    action_rms: Tensor
    diverged: bool
    grad_moments: Tensor | None = None
    history: tuple[Tensor, Tensor, Tensor] | None = None
    """(xs [T+1, n], gs [T+1, n], fs [T+1]) when requested: iterates, mini-batch gradients and
    objective values (gs[T], fs[T] are zero: no gradient is taken at x_T)."""
    scales: list[Tensor] | None = None
    """Per group [T, S_g]: the action scale p of the recorded coordinates (ones unless the rollout
    was preconditioned; ``actions`` hold u = p·a then)."""


    def auc(self) -> float:
        """Mean of f(x_t) over the evaluated steps t ≥ 1 (the AUC criterion of the benchmarks)."""
        return float(self.true_loss[1:].mean())


def _group_slices(task: Task) -> list[slice]:
    out, i = [], 0
    for g in task.groups:
        out.append(slice(i, i + g.numel))
        i += g.numel
    return out


def rollout(
    task: Task,
    controller: Controller,
    seed: int,
    horizon: int,
    coords_per_group: int,
    eval_every: int = 10,
    curvature_every: int = 20,
    record_states: bool = True,
    dtype: torch.dtype = torch.float32,
    return_history: bool = False,
    features: FeatureSet | None = None,
    curvature_along: str = "step",
    curvature_batch: str = "same",
    precondition: str = "none",
) -> Rollout:
    """Run ``controller`` on ``task`` from x⁽⁰⁾(seed) for ``horizon`` steps with mini-batches drawn
    by a generator seeded from ``seed``; exploration noise uses a third seeded generator, so a
    rollout is a deterministic function of (controller, seed). ``features`` (default: the paper's,
    :class:`l2o.features.sets.Paper2017Features`) makes the states s_t and observations Ψ_t.
    ``curvature_along``: measure h_{g,t} along the step taken (``"step"``) or along the controller's
    mean action (``"mean"``, for a controller that sets ``last_mean``; ψ's exploration noise points
    in random directions, whose curvature differs from that along the descent direction).
    ``curvature_batch``: the mini-batch whose Hessian gives h_{g,t}: the step's own (``"same"``,
    the original behaviour) or an independent one (``"independent"``). A step built from a
    mini-batch's gradient points where that batch curves most, so its own Hessian overstates the
    true curvature along it (on mnist:48-48:b64 under AdaGrad, 2.4× over 100 steps, enough to flip
    the sign of the modelled change of f: ``scripts/curvature_bias.py``); an independent batch is
    unbiased for the true Hessian.

    ``precondition = "adam"``: ψ (a controller that reads states) acts in the preconditioned action
    u_j = p_j a_j with p_j = (√v̂_j + 10⁻⁸)^½, v̂ Adam's bias-corrected second moment (β = 0.999),
    on the state s'_j = [p_j s_j; s_j[grad]/p_j] (D + 1 numbers); the curvature becomes
    κ_{g,t} = a_gᵀ(∇²f̂ a)_g / Σ_j p_j² a_j², so that ½ κ Σ_j u_j² is again exact for the step taken,
    and per coordinate the model's curvature is κ·p_j² ∝ √v̂_j (Adam's diagonal curvature estimate)
    instead of one number per group. ``Rollout.scales`` records p. Controllers that read only Ψ (π)
    act in a as before."""
    if curvature_along not in ("step", "mean"):
        raise ValueError(f"curvature_along must be 'step' or 'mean', got {curvature_along!r}")
    if curvature_batch not in ("same", "independent"):
        raise ValueError(f"curvature_batch must be 'same' or 'independent', got {curvature_batch!r}")
    if precondition not in PRECONDITIONERS:
        raise ValueError(f"precondition must be one of {PRECONDITIONERS}, got {precondition!r}")
    features = Paper2017Features() if features is None else features
    pre = precondition != "none"
    D, P = features.state_dim + int(pre), features.obs_dim
    T = int(horizon)
    if T < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    groups = task.groups
    slices = _group_slices(task)
    n = task.dim
    x = flatten(task.init_params(seed, dtype), groups).detach().clone()
    batch_gen = torch.Generator().manual_seed(1_000_003 + seed)
    noise_gen = torch.Generator().manual_seed(2_000_003 + seed)
    pick_gen = torch.Generator().manual_seed(3_000_003 + seed)
    curv_gen = torch.Generator().manual_seed(4_000_003 + seed)
    coords = [torch.randperm(s.stop - s.start, generator=pick_gen)[: min(coords_per_group, s.stop - s.start)].sort().values
              for s in slices]
    flat_coords = [c + s.start for c, s in zip(coords, slices)]

    xs = torch.zeros(T + 1, n, dtype=dtype)
    gs = torch.zeros(T + 1, n, dtype=dtype)
    fs = torch.zeros(T + 1, dtype=dtype)
    rec_s = [torch.full((T, len(c), D), math.nan, dtype=dtype) for c in coords] if record_states else []
    rec_a = [torch.full((T, len(c)), math.nan, dtype=dtype) for c in coords]
    rec_o = [torch.full((T, len(c), P), math.nan, dtype=dtype) for c in coords]
    rec_p = [torch.ones(T, len(c), dtype=dtype) for c in coords]
    v2 = torch.zeros(n, dtype=dtype)  # Adam's second moment, for precondition = "adam"
    eval_steps = torch.tensor(sorted(set(range(0, T + 1, eval_every)) | {T}), dtype=torch.long)
    curv_steps = torch.arange(0, T, curvature_every, dtype=torch.long)
    true_loss = torch.full((len(eval_steps),), math.nan, dtype=torch.float64)
    curvature = torch.full((len(curv_steps), len(groups)), math.nan, dtype=torch.float64)
    batch_loss = torch.full((T,), math.nan, dtype=torch.float64)
    action_rms = torch.full((T, len(groups)), math.nan, dtype=torch.float64)
    grad_moments = torch.full((len(eval_steps), len(groups), 2), math.nan, dtype=torch.float64) if record_states else None
    eval_pos = {int(t): i for i, t in enumerate(eval_steps)}
    curv_pos = {int(t): i for i, t in enumerate(curv_steps)}

    controller.reset(n)
    mem = features.init(n, T, dtype)
    diverged = False
    for t in range(T + 1):
        if t in eval_pos:
            with torch.no_grad():
                true_loss[eval_pos[t]] = task.true_loss(unflatten(x, groups))
        if t == T:
            break
        idx = task.sample_batch(batch_gen)
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = task.loss(unflatten(xg, groups), idx)
            need_hvp = t in curv_pos
            (g,) = torch.autograd.grad(loss, xg, create_graph=need_hvp)
        f_val = float(loss.detach())
        if not (math.isfinite(f_val) and bool(torch.isfinite(g).all())):
            diverged = True
            break
        batch_loss[t] = f_val
        xs[t], gs[t], fs[t] = x, g.detach(), f_val
        S, obs, mem = features.step(mem, t, x, gs[t], fs[t], need_state=controller.needs_states or record_states)
        p = None
        if pre:
            v2 = 0.999 * v2 + 0.001 * gs[t] * gs[t]
            p = ((v2 / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8).sqrt()
            if S is not None:
                S_raw = S
                S = torch.cat([p.unsqueeze(-1) * S, (S[:, features.grad_feature] / p).unsqueeze(-1)], dim=-1)
        a = controller.act(t, S if controller.needs_states else None, obs, noise_gen).detach().to(dtype)
        u = a
        if p is not None and controller.needs_states:
            a = u / p
        if a.shape != (n,) or not bool(torch.isfinite(a).all()):
            diverged = True
            break
        if grad_moments is not None and t in eval_pos:
            xt = x.clone().requires_grad_(True)
            with torch.enable_grad():
                (g_true,) = torch.autograd.grad(task.loss(unflatten(xt, groups), None), xt)
            feat = (S_raw if pre else S)[:, features.grad_feature]
            for gi, s in enumerate(slices):
                grad_moments[eval_pos[t], gi, 0] = float((g_true[s] * feat[s]).sum())
                grad_moments[eval_pos[t], gi, 1] = float(feat[s].square().sum())
        for gi, (c, s) in enumerate(zip(flat_coords, slices)):
            if record_states:
                rec_s[gi][t] = S[c]
            rec_a[gi][t] = u[c]
            rec_o[gi][t] = obs[c]
            if p is not None:
                rec_p[gi][t] = p[c]
            action_rms[t, gi] = float(u[s].square().mean().sqrt())
        if need_hvp:
            v = a
            if curvature_along == "mean" and getattr(controller, "last_mean", None) is not None:
                v = controller.last_mean.to(dtype)
                v = v / p if p is not None and controller.needs_states else v
            if curvature_batch == "independent":
                xc = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    (gc,) = torch.autograd.grad(task.loss(unflatten(xc, groups), task.sample_batch(curv_gen)), xc,
                                                create_graph=True)
                    (hv,) = torch.autograd.grad(gc, xc, grad_outputs=v)
            else:
                (hv,) = torch.autograd.grad(g, xg, grad_outputs=v)
            w = v if p is None else v * p
            for gi, s in enumerate(slices):
                den = float(w[s].square().sum())
                curvature[curv_pos[t], gi] = float((v[s] * hv[s]).sum()) / den if den > 0 else math.nan
        x = x + a
    xs[T] = x
    return Rollout(seed, rec_s, rec_a, rec_o, coords, eval_steps, true_loss, batch_loss, curv_steps, curvature,
                   action_rms, diverged or not bool(torch.isfinite(true_loss).all()), grad_moments,
                   (xs, gs, fs) if return_history else None, rec_p)


def seeded_rollout(task: Task, controller: Controller, kwargs: dict[str, Any], threads: int, seed: int) -> Rollout:
    """One trajectory of ``task`` under ``controller`` from ``seed`` (a picklable, deterministic job
    for executors; the thread count is pinned so that every backend computes the same)."""
    torch.set_num_threads(threads)
    return rollout(task, controller, seed, **kwargs)


class GroupLinearGaussianController:
    """ψ for every group: a_t^j = K_t^g s_t^j + k_t^g (+ N(0, G_t^g) noise), one time-varying
    linear-Gaussian policy per coordinate group shared by the group's coordinates."""

    needs_states = True

    def __init__(self, task: Task, policies: Sequence, noise: bool = True) -> None:
        if len(policies) != len(task.groups):
            raise ValueError(f"need one policy per coordinate group ({len(task.groups)}), got {len(policies)}")
        self.slices = _group_slices(task)
        self.policies = list(policies)
        self.noise = noise

    def reset(self, n: int) -> None:
        self.last_mean: Tensor | None = None

    def act(self, t: int, states: Tensor | None, observations: Tensor, generator: torch.Generator) -> Tensor:
        assert states is not None
        out = torch.empty(states.shape[0], dtype=torch.float64)
        self.last_mean = torch.empty_like(out)
        for s, pol in zip(self.slices, self.policies):
            mean = states[s].to(torch.float64) @ pol.K[t, 0] + pol.k[t, 0]
            self.last_mean[s] = mean
            if self.noise:
                mean = mean + float(pol.cov[t, 0, 0]) ** 0.5 * torch.randn(mean.shape, generator=generator, dtype=torch.float64)
            out[s] = mean
        return out


class LSTMController:
    """π: the PSD LSTM on Ψ for every coordinate (deterministic mean action)."""

    needs_states = False

    def __init__(self, net: dict[str, Tensor]) -> None:
        from l2o.learned import psd

        self.net = {k: v.detach() for k, v in net.items()}
        self._psd = psd
        self.hidden = None

    def reset(self, n: int) -> None:
        self.hidden = self._psd.init_hidden(n, self.net["W_hh"].shape[-1], self.net["W_hh"].dtype)

    @torch.no_grad()
    def act(self, t: int, states: Tensor | None, observations: Tensor, generator: torch.Generator) -> Tensor:
        a, self.hidden = self._psd.step(self.net, self.hidden, observations.to(self.net["W_hh"].dtype))
        return a


def group_samples(samples: list[Rollout], group: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stack the group's recorded coordinates of all trajectories as samples: states [N, T, D],
    actions [N, T, 1] (float64), observations [N, T, P] (float32) and action scales p [N, T, 1]
    (float64), N = M·S."""
    S = torch.cat([r.states[group].transpose(0, 1) for r in samples]).to(DTYPE)
    A = torch.cat([r.actions[group].transpose(0, 1) for r in samples]).to(DTYPE).unsqueeze(-1)
    O = torch.cat([r.observations[group].transpose(0, 1) for r in samples]).to(torch.float32)
    Pc = torch.cat([(r.scales[group] if r.scales is not None else torch.ones_like(r.actions[group])).transpose(0, 1)
                    for r in samples]).to(DTYPE).unsqueeze(-1)
    return S, A, O, Pc
