"""π of Predicted Step Descent (Li & Malik 2017, §4): one LSTM layer of 128 cells, per coordinate.

Every coordinate j of the optimizee is one batch row: its input is the observation o_t^j = Ψ_t^j
(3 features, :mod:`l2o.features.conv2017`), its output the mean step μ^π(o_t^j) = Δx^j. All
coordinates of all coordinate groups share one set of weights ω: the paper shares π's parameters
within a group; sharing them across groups too is our choice, because a learned optimizer must run
on networks whose number and kinds of groups differ from the meta-training net's (four groups
there: W₁, b₁, W₂, b₂). Group-specific behaviour is still available to π through Ψ, whose
statistics differ by group, and ψ (which is per group) supplies per-group targets.

Inputs are standardised with fixed statistics stored beside ω (``in_mean``, ``in_std``, set from
the first batch of regression data and then frozen) and the output is scaled by ``out_scale``
(the spread of ψ's actions at that point), so the LSTM works on O(1) numbers although gradients
and steps are ~1e-3. :func:`step` is pure: ω is a ``{name: tensor}`` mapping, no state is held.
:class:`FusedPolicy` is the same step for inference, in place on row chunks (what
:class:`l2o.PredictedStepDescent` runs); :func:`step` stays the reference it is tested against.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from l2o.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from l2o.features.conv2017 import PSI_DIM

HIDDEN_SIZE = 128
"""LSTM cells (Li & Malik 2017, §4)."""

NET_KEYS = ("W_ih", "W_hh", "b", "W_out", "b_out", "in_mean", "in_std", "out_scale")
"""Names of the tensors of ω; the last three are fixed normalisation statistics, not trained."""
TRAINED_KEYS = ("W_ih", "W_hh", "b", "W_out", "b_out")
"""The entries of ω that the π-step regresses."""


class Hidden(NamedTuple):
    """LSTM state (h, c), each [N, H] for N coordinates."""

    h: Tensor
    c: Tensor

    def detach(self) -> Hidden:
        return Hidden(self.h.detach(), self.c.detach())


def init_net(seed: int = 0, hidden_size: int = HIDDEN_SIZE, dtype: torch.dtype = torch.float32,
             input_size: int = PSI_DIM) -> dict[str, Tensor]:
    """A seeded ω for observations of ``input_size`` features (the paper's Ψ has 3): LSTM weights
    U(−1/√H, 1/√H) (PyTorch's default), forget-gate bias +1, a zero output layer (the initial π takes
    no step), identity input normalisation, unit output scale."""
    g = torch.Generator().manual_seed(seed)
    k = 1.0 / math.sqrt(hidden_size)
    H4 = 4 * hidden_size

    def u(*shape: int) -> Tensor:
        return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * k

    net = {
        "W_ih": u(H4, input_size), "W_hh": u(H4, hidden_size), "b": u(H4),
        "W_out": torch.zeros(1, hidden_size, dtype=torch.float64), "b_out": torch.zeros(1, dtype=torch.float64),
        "in_mean": torch.zeros(input_size, dtype=torch.float64), "in_std": torch.ones(input_size, dtype=torch.float64),
        "out_scale": torch.ones(1, dtype=torch.float64),
    }
    net["b"][hidden_size : 2 * hidden_size] += 1.0  # gate order i, f, g, o
    return {name: t.to(dtype) for name, t in net.items()}


def check_net(net: Mapping[str, Tensor]) -> int:
    """Validate ω's names, shapes and values; return the hidden size H (the input size is W_ih's
    second dimension, :func:`input_size`)."""
    missing, extra = set(NET_KEYS) - set(net), set(net) - set(NET_KEYS)
    if missing or extra:
        raise ValueError(f"PSD policy weights: missing {sorted(missing)}, unexpected {sorted(extra)}")
    H = net["W_hh"].shape[-1]
    P = input_size(net)
    expected = {"W_ih": (4 * H, P), "W_hh": (4 * H, H), "b": (4 * H,), "W_out": (1, H), "b_out": (1,),
                "in_mean": (P,), "in_std": (P,), "out_scale": (1,)}
    for name, shape in expected.items():
        if tuple(net[name].shape) != shape:
            raise ValueError(f"PSD policy weight {name!r} has shape {tuple(net[name].shape)}, expected {shape}")
        if not torch.isfinite(net[name]).all():
            raise ValueError(f"PSD policy weight {name!r} has non-finite entries")
    if (net["in_std"] <= 0).any():
        raise ValueError("PSD policy weight 'in_std' must be positive")
    return H


def input_size(net: Mapping[str, Tensor]) -> int:
    """P, the number of observation features ω reads (3 for the paper's Ψ)."""
    w = net["W_ih"]
    if w.dim() != 2:
        raise ValueError(f"PSD policy weight 'W_ih' must be a matrix, got shape {tuple(w.shape)}")
    return int(w.shape[1])


def init_hidden(n: int, hidden_size: int = HIDDEN_SIZE, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Hidden:
    """Zero LSTM state for ``n`` coordinates."""
    return Hidden(*(torch.zeros(n, hidden_size, dtype=dtype, device=device) for _ in range(2)))


def step(net: Mapping[str, Tensor], hidden: Hidden, obs: Tensor) -> tuple[Tensor, Hidden]:
    """μ^π for one time step: ``obs`` [N, 3] (Ψ per coordinate) → step [N] and the new state.

    Pure and differentiable w.r.t. ``net`` and ``hidden`` (the π-step backpropagates through time).
    """
    if obs.dim() != 2 or obs.shape[-1] != net["W_ih"].shape[-1]:
        raise ValueError(f"PSD policy input must be [N, {net['W_ih'].shape[-1]}] (Ψ per coordinate), "
                         f"got {tuple(obs.shape)}")
    x = (obs - net["in_mean"]) / net["in_std"]
    gates = torch.addmm(net["b"], x, net["W_ih"].T) + hidden.h @ net["W_hh"].T
    i, f, gg, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * hidden.c + torch.sigmoid(i) * torch.tanh(gg)
    h = torch.sigmoid(o) * torch.tanh(c)
    out = torch.addmm(net["b_out"], h, net["W_out"].T).squeeze(-1)
    return net["out_scale"] * out, Hidden(h, c)


class FusedPolicy:
    """ω prepared for the inference step in place: one ``addmm`` of [x, h] against the stacked
    [W_ih; W_hh]ᵀ per row chunk, one in-place sigmoid over all four gates, work buffers reused
    across calls. tanh is evaluated as 2σ(2z) − 1 (torch's CPU sigmoid is several times faster than
    its tanh); the cell-input gate's weights are stored doubled (exact in floating point) so its
    σ(2z) comes from the same sigmoid. Same result as :func:`step` up to float rounding."""

    def __init__(self, net: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device | str) -> None:
        def cast(t: Tensor) -> Tensor:
            return t.detach().to(dtype=dtype, device=device)

        self.H = int(net["W_hh"].shape[-1])
        self.P = input_size(net)
        H = self.H
        self.w = torch.cat([cast(net["W_ih"]), cast(net["W_hh"])], dim=1).T.contiguous()  # [P+H, 4H]
        self.b = cast(net["b"]).clone()
        self.w[:, 2 * H : 3 * H] *= 2  # the g gate's pre-activation doubled: tanh(z) = 2σ(2z) − 1
        self.b[2 * H : 3 * H] *= 2
        self.w_out = cast(net["W_out"]).T.contiguous()  # [H, 1]
        self.b_out = cast(net["b_out"])
        self.in_mean, self.in_std, self.out_scale = cast(net["in_mean"]), cast(net["in_std"]), cast(net["out_scale"])
        self.dtype, self.device = dtype, device
        self._bufs: tuple[Tensor, Tensor, Tensor] | None = None

    def _buffers(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        if self._bufs is None or self._bufs[0].shape[0] < rows:
            kw = {"dtype": self.dtype, "device": self.device}
            self._bufs = (torch.empty(rows, self.P + self.H, **kw), torch.empty(rows, 4 * self.H, **kw),
                          torch.empty(rows, self.H, **kw))
        return self._bufs

    @torch.no_grad()
    def step_(self, h: Tensor, c: Tensor, obs: Tensor, out: Tensor, chunk: int) -> None:
        """Overwrite ``h``, ``c`` [N, H] with the new state and ``out`` [N] with μ^π(obs), ``obs`` [N, P],
        ``chunk`` rows at a time (all four contiguous)."""
        n, H, P = obs.shape[0], self.H, self.P
        xh, gates, tmp = self._buffers(min(chunk, n))
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            r = e - s
            x, g, t, hc, cc = xh[:r], gates[:r], tmp[:r], h[s:e], c[s:e]
            torch.sub(obs[s:e], self.in_mean, out=x[:, :P])
            x[:, :P].div_(self.in_std)
            x[:, P:].copy_(hc)
            torch.addmm(self.b, x, self.w, out=g)
            g.sigmoid_()  # σ(i), σ(f), σ(2g), σ(o)
            gg, o = g[:, 2 * H : 3 * H], g[:, 3 * H :]
            gg.mul_(2).sub_(1)  # tanh(g)
            cc.mul_(g[:, H : 2 * H]).addcmul_(g[:, :H], gg)  # c = σ(f) c + σ(i) tanh(g)
            torch.mul(cc, 2, out=t).sigmoid_()
            torch.neg(o, out=hc).addcmul_(o, t, value=2)  # h = σ(o) (2σ(2c) − 1) = σ(o) tanh(c)
            torch.addmm(self.b_out, hc, self.w_out, out=out[s:e].unsqueeze(1))
        out.mul_(self.out_scale)


def run_sequence(net: Mapping[str, Tensor], obs: Tensor, hidden: Hidden | None = None) -> tuple[Tensor, Hidden]:
    """μ^π along whole sequences: ``obs`` [T, N, 3] → steps [T, N] (teacher forcing on Ψ)."""
    if obs.dim() != 3:
        raise ValueError(f"sequence input must be [T, N, P], got {tuple(obs.shape)}")
    H = net["W_hh"].shape[-1]
    hidden = init_hidden(obs.shape[1], H, obs.dtype, obs.device) if hidden is None else hidden
    outs = []
    for t in range(obs.shape[0]):
        a, hidden = step(net, hidden, obs[t])
        outs.append(a)
    return torch.stack(outs), hidden


POLICY_KIND = "l2o-psd-policy"
"""Checkpoint kind of a PSD policy ω (what :class:`l2o.PredictedStepDescent` loads)."""


def save_policy(path: str | os.PathLike, net: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ω as a safe checkpoint (safetensors + JSON metadata + digest) and a JSON description
    with the file's sha256 beside it (same stem), e.g. the command and config that produced it."""
    check_net(net)
    path = save_checkpoint(path, {k: net[k].detach().to(torch.float32) for k in NET_KEYS},
                           {"hidden_size": int(net["W_hh"].shape[-1]), **meta}, kind=POLICY_KIND)
    info = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "hidden_size": int(net["W_hh"].shape[-1]), **meta}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path.with_suffix(".json"))
    return path


def load_policy(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify ω and its metadata; a corrupt, tampered or wrong-kind file raises
    :class:`l2o.checkpoint.CheckpointError`."""
    tensors, meta = load_checkpoint(path, kind=POLICY_KIND)
    try:
        check_net(tensors)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    return dict(tensors), meta
