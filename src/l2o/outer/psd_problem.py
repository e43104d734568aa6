"""The inner problem of meta-training PSD's LSTM by Persistent ES: Predicted Step Descent with
policy weights θ run on instances of an MLP task, all population members at once.

θ is the flattened subset ``train_keys`` of ω (:data:`l2o.learned.psd.TRAINED_KEYS` by default:
W_ih, W_hh, b, W_out, b_out); every other entry of ω, including the frozen input normalisation
(in_mean, in_std) and output scale, stays as in the starting checkpoint. :meth:`PSDProblem.net`
turns a θ back into a full ω, which :func:`l2o.learned.psd.save_policy` writes as a PSD checkpoint.

A run is one optimizee trajectory: x₀ = ``task.init_params(seed)`` (seeds ≥ 10⁶, as for mlp-lopt),
then at step t: f̂_t, ∇f̂_t on a mini-batch, Ψ_t per coordinate, x_{t+1} = x_t + μ^π_θ(Ψ_t). Ψ_t is
computed by the same functions :class:`l2o.learned.psd.PredictedStepDescent` calls at test time:
the checkpoint's feature set's ``step`` (e.g. ``scale-free``) or, for ``paper2017``,
:func:`l2o.features.conv2017.observation_step` on the last iterates, gradient and loss. Those
features are element-wise over coordinates, so running them on all coordinates of the net at once
(rather than per parameter tensor, as the optimizer does) gives the same numbers; they read the
step count t, which differs between particles (staggered PES), so they are computed per particle
(its two antithetic branches together). The LSTM is one batched matmul (``baddbmm``) over all
2N members, each with its own weights. The loss at step t is f̂_t(x_t), as in
:class:`l2o.outer.lopt.MLPLOptProblem` (whose mini-batch convention, with-replacement batches
shared by the two branches of a particle, this follows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from l2o.features.conv2017 import observation_step
from l2o.features.sets import FeatureSet, get_feature_set
from l2o.learned.psd import BASE_KEYS, NET_KEYS, TRAINED_KEYS, base_step, check_net, input_size
from l2o.outer.base import State
from l2o.outer.lopt import SEED_BASE, branch_value_and_grad
from l2o.tasks.base import Task, flatten

PAPER_MEMORY = ("x_prev", "x_prev2", "g_prev")
"""Per-coordinate memory of the paper's Ψ (:func:`observation_step`), besides the previous loss."""


def feature_set_of(name: str, net: Mapping[str, Tensor]) -> FeatureSet | None:
    """The feature set ``name`` (None for ``paper2017``, whose Ψ PSD computes with
    :func:`observation_step`); ω's input size must match its observation size."""
    fs = get_feature_set(name)
    if input_size(net) != fs.obs_dim:
        raise ValueError(f"ω reads {input_size(net)} features but the feature set {name!r} has {fs.obs_dim}")
    return None if name == "paper2017" else fs


class PSDProblem:
    """Runs of PSD with θ [D] (the ``train_keys`` of ω, flattened) on ``task``; ``net`` is the
    starting ω (it supplies the entries not trained), ``features`` the name of its feature set."""

    def __init__(self, task: Task, net: Mapping[str, Tensor], features: str,
                 train_keys: Sequence[str] = TRAINED_KEYS, dtype: torch.dtype = torch.float32) -> None:
        if task.batch_size is None:
            raise ValueError("psd-pes meta-training needs a mini-batch task (bfull is not supported)")
        check_net(net)
        trainable = TRAINED_KEYS + tuple(k for k in BASE_KEYS[:2] if k in net)
        bad = [k for k in train_keys if k not in trainable]
        if bad or not train_keys or len(set(train_keys)) != len(train_keys):
            raise ValueError(f"psd-pes: train must be a non-empty list of distinct keys of {list(trainable)}, "
                             f"got {list(train_keys)!r}")
        self.task, self.dtype, self.features_name = task, dtype, features
        self.features = feature_set_of(features, net)
        self.base = {k: net[k].detach().to(dtype).clone() for k in (*NET_KEYS, *BASE_KEYS) if k in net}
        self.train_keys = tuple(k for k in trainable if k in train_keys)  # fixed order
        self.shapes = {k: tuple(self.base[k].shape) for k in self.train_keys}
        self.dim = sum(self.base[k].numel() for k in self.train_keys)
        self.H = int(self.base["W_hh"].shape[-1])
        self.P = input_size(self.base)
        self.n = task.dim
        self.groups, a = [], 0
        for gr in task.groups:
            self.groups.append((gr.name, gr.shape, a, a + gr.numel))
            a += gr.numel
        if self.features is None:
            self.mem_keys = PAPER_MEMORY
        else:
            self.mem_keys = tuple(k for k in self.features.init(1, 0, dtype) if k != "f_prev")

    # -- θ <-> ω -------------------------------------------------------------------------------

    def theta0(self) -> Tensor:
        """The starting θ [D]: the ``train_keys`` of the starting ω."""
        return torch.cat([self.base[k].reshape(-1) for k in self.train_keys])

    def split(self, theta: Tensor) -> dict[str, Tensor]:
        """θ [..., D] → ω's trained entries, each [..., *shape] (views)."""
        out, i = {}, 0
        lead = theta.shape[:-1]
        for k in self.train_keys:
            n = self.base[k].numel()
            out[k] = theta[..., i:i + n].reshape(*lead, *self.shapes[k])
            i += n
        return out

    def net(self, theta: Tensor) -> dict[str, Tensor]:
        """The full ω of one θ [D] (the entries not trained from the starting ω)."""
        if theta.shape != (self.dim,):
            raise ValueError(f"θ must be [{self.dim}], got {tuple(theta.shape)}")
        return {**{k: v.clone() for k, v in self.base.items()},
                **{k: v.detach().clone() for k, v in self.split(theta).items()}}

    # -- runs ----------------------------------------------------------------------------------

    def init_runs(self, n: int, gen: torch.Generator) -> State:
        seeds = torch.randint(SEED_BASE, 2**31 - 1, (n,), generator=gen)
        x = torch.stack([flatten(self.task.init_params(int(s), self.dtype), self.task.groups) for s in seeds])
        state: State = {"x": x, "f_prev": torch.zeros(n, 1, dtype=self.dtype),
                        "h": torch.zeros(n, self.n, self.H, dtype=self.dtype),
                        "c": torch.zeros(n, self.n, self.H, dtype=self.dtype)}
        for k in self.mem_keys:
            state[f"mem.{k}"] = torch.zeros_like(x)
        return state

    def observe(self, t: int, x: Tensor, g: Tensor, f: Tensor, mem: dict[str, Tensor]
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Ψ_t [R, n, P] and the new memory for R runs that are all at step ``t``: ``x``, ``g`` [R, n],
        ``f`` [R, 1], ``mem`` the ``mem.*`` tensors [R, n] and ``f_prev`` [R, 1]."""
        if self.features is None:
            first = t == 0
            obs = observation_step(f, None if first else mem["f_prev"], g, None if first else mem["g_prev"], x,
                                   None if first else mem["x_prev"], None if t <= 1 else mem["x_prev2"])
            new = {"x_prev2": mem["x_prev"], "x_prev": x, "g_prev": g, "f_prev": f}
            return obs, new
        _, obs, new = self.features.step(mem, t, x, g, f, need_state=False)
        return obs, new

    def lstm(self, theta: Tensor, obs: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """μ^π for M members with their own θ [M, D]: ``obs`` [M, n, P], ``h``, ``c`` [M, n, H] →
        steps [M, n] and the new (h, c). The function of :func:`l2o.learned.psd.step`, batched, with
        tanh(z) = 2σ(2z) − 1 as in :class:`l2o.learned.psd.FusedPolicy` (torch's CPU sigmoid is
        several times faster than its tanh)."""
        M, H = theta.shape[0], self.H
        w = {**{k: v.unsqueeze(0).expand(M, *v.shape) for k, v in self.base.items()}, **self.split(theta)}
        xin = (obs - self.base["in_mean"]) / self.base["in_std"]
        W = torch.cat([w["W_ih"], w["W_hh"]], dim=2).transpose(1, 2)  # [M, P+H, 4H]
        gates = torch.baddbmm(w["b"].unsqueeze(1), torch.cat([xin, h], dim=2), W)
        gates[..., 2 * H:3 * H] *= 2
        gates.sigmoid_()  # σ(i), σ(f), σ(2g), σ(o)
        i, f, gg, o = gates.chunk(4, dim=-1)
        c = f * c + i * (2 * gg - 1)
        h = o * (2 * torch.sigmoid(2 * c) - 1)
        out = self.base["out_scale"] * torch.baddbmm(w["b_out"].unsqueeze(1), h, w["W_out"].transpose(1, 2)).squeeze(-1)
        base = base_step(w, obs)  # each member's own base, if ω has one
        return (out if base is None else out + base), h, c

    def step(self, theta: Tensor, state: State, t: Tensor, gen: torch.Generator) -> tuple[Tensor, State]:
        two, N = theta.shape[0], theta.shape[1]
        M = two * N
        x, loss, grads = branch_value_and_grad(self.task, self.groups, state["x"], gen)
        g = torch.cat([grads[name].reshape(M, -1) for name, _, _, _ in self.groups], dim=1).view(two, N, self.n)
        f = loss.detach().to(self.dtype).view(two, N, 1)
        obs = torch.empty(two, N, self.n, self.P, dtype=self.dtype)
        new: State = {k: torch.empty_like(v) for k, v in state.items() if k not in ("h", "c")}
        keys = (*self.mem_keys, "f_prev")
        for i in range(N):  # the features read the step count, which differs between particles
            mem = {k: state[k if k == "f_prev" else f"mem.{k}"][:, i] for k in keys}
            o, m = self.observe(int(t[i]), state["x"][:, i], g[:, i], f[:, i], mem)
            obs[:, i] = o
            for k in keys:
                new[k if k == "f_prev" else f"mem.{k}"][:, i] = m[k]
        delta, h, c = self.lstm(theta.reshape(M, -1).to(self.dtype), obs.view(M, self.n, self.P),
                                state["h"].reshape(M, self.n, self.H), state["c"].reshape(M, self.n, self.H))
        new["x"] = (x + delta).view(two, N, self.n)
        new["h"], new["c"] = h.view(two, N, self.n, self.H), c.view(two, N, self.n, self.H)
        return loss.reshape(two, N), new
