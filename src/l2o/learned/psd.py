"""Predicted Step Descent (Li & Malik 2017, §4) as a ``torch.optim.Optimizer``.

At iteration t the closure evaluates the mini-batch objective f̂⁽ᵗ⁾ and its gradient ∇f̂⁽ᵗ⁾ at the
current iterate x⁽ᵗ⁾; PSD builds the observation Ψ_t (:func:`l2o.features.conv2017.observation_step`,
from f̂⁽ᵗ⁾, f̂⁽ᵗ⁻¹⁾, ∇f̂⁽ᵗ⁾, ∇f̂⁽ᵗ⁻¹⁾, x⁽ᵗ⁾, x⁽ᵗ⁻¹⁾, x⁽ᵗ⁻²⁾), runs the LSTM π one step per coordinate
(:func:`l2o.learned.psd.step`) and moves by its mean action: x⁽ᵗ⁺¹⁾ = x⁽ᵗ⁾ + μ^π(Ψ_t).
This is exactly ``run_sequence(ω, observation_features(xs, gs, fs))`` computed online.

Each parameter tensor is one coordinate group (any shape: matrices, biases, conv kernels) and
keeps its own state in ``self.state`` — LSTM (h, c) with one row per coordinate, the previous
gradient, the previous two iterates, the previous loss and the step count — so
``state_dict()``/``load_state_dict()`` round-trip exactly. ω is shared by all coordinates of all
groups, so one step runs the LSTM once over all coordinates of all parameters: their Ψ rows are
concatenated into one [N, P] matrix, (h, c) live in one flat [N, H] buffer of which each
parameter's ``state["h"]``/``state["c"]`` are row views, and :class:`~l2o.learned.psd.FusedPolicy`
updates it in place over row chunks (:func:`l2o.learned.psd.step` is the reference it is
tested against). By default ω is the checkpoint ``l2o/learned/weights/psd.safetensors``: on the
scale-free features, an AdaGrad-started base step plus the LSTM's correction, meta-trained by
Persistent ES (``configs/psd-pes-base-time.toml``; see the JSON beside it). The paper's PSD (paper
features, Convolutional GPS) is ``weights/psd-paper.safetensors``, harness name ``psd-paper``.

π of Predicted Step Descent (Li & Malik 2017, §4): one LSTM layer of 128 cells, per coordinate.

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
and steps are ~1e-3. ω may also carry a base step (:data:`BASE_KEYS`, :func:`init_base`): a learned
combination of Ψ's update directions with a log-linear step size, added to the LSTM's output, so
that π can start as exactly a tuned baseline (AdaGrad) and the LSTM learn a correction to it.
:func:`step` is pure: ω is a ``{name: tensor}`` mapping, no state is held.
:class:`FusedPolicy` is the same step for inference, in place on row chunks (what
:class:`l2o.PredictedStepDescent` runs); :func:`step` stays the reference it is tested against.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from l2o.baselines.registry import OptimizerEntry, register_optimizer
from l2o.learned.base import params_with_grad
from l2o.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from l2o.features.conv2017 import PSI_DIM, observation_step
from l2o.features.sets import FeatureSet, get_feature_set

HIDDEN_SIZE = 128
"""LSTM cells (Li & Malik 2017, §4)."""

NET_KEYS = ("W_ih", "W_hh", "b", "W_out", "b_out", "in_mean", "in_std", "out_scale")
"""Names of the tensors of ω; the last three are fixed normalisation statistics, not trained."""
TRAINED_KEYS = ("W_ih", "W_hh", "b", "W_out", "b_out")
"""The entries of ω that the π-step regresses."""
BASE_KEYS = ("base_u", "base_c", "base_mask")
"""Optional entries of ω (all or none): a base step exp(c₀ + c₁:·Ψ)·((u ⊙ m)ᵀΨ) on the raw Ψ added to
the LSTM's, i.e. a learned combination of Ψ's directions (the mask m, fixed, selects the features
that are update directions) with a learned log-linear step size (with the scale-free Ψ, u = −α·e₀
and c = 0 is AdaGrad at lr α). Absent: no base step (the paper's π)."""
BASE_CLAMP = 10.0
"""c₀ + c₁:·Ψ is clamped to ≤ 10 before exp (keeps a bad ω finite)."""


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
    missing, extra = set(NET_KEYS) - set(net), set(net) - set(NET_KEYS) - set(BASE_KEYS)
    if set(BASE_KEYS) & set(net):
        missing |= set(BASE_KEYS) - set(net)
    if missing or extra:
        raise ValueError(f"PSD policy weights: missing {sorted(missing)}, unexpected {sorted(extra)}")
    H = net["W_hh"].shape[-1]
    P = input_size(net)
    expected = {"W_ih": (4 * H, P), "W_hh": (4 * H, H), "b": (4 * H,), "W_out": (1, H), "b_out": (1,),
                "in_mean": (P,), "in_std": (P,), "out_scale": (1,), "base_u": (P,), "base_c": (P + 1,),
                "base_mask": (2, P)}
    for name, shape in ((k, v) for k, v in expected.items() if k in net):
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


def init_base(net: Mapping[str, Tensor], directions: Sequence[int], index: int, lr: float,
              schedule: Sequence[int] | None = None) -> dict[str, Tensor]:
    """ω with a base step over the Ψ features ``directions``, set to −``lr``·Ψ[``index``] (u = −lr·e_index,
    c = 0), and the LSTM's output layer zeroed: π takes exactly that step (e.g. AdaGrad, with the
    scale-free Ψ and index 0). The step size exp(c₀ + c·Ψ) reads the Ψ features ``schedule``
    (default all; e.g. only the step-count embedding, for a learned schedule in t)."""
    P = input_size(net)
    if not directions or any(not 0 <= i < P for i in directions) or index not in directions:
        raise ValueError(f"base directions {list(directions)} (with index {index}) must be among ω's {P} input features")
    schedule = range(P) if schedule is None else schedule
    if any(not 0 <= i < P for i in schedule):
        raise ValueError(f"base schedule features {list(schedule)} must be among ω's {P} input features")
    u = torch.zeros(P, dtype=net["W_hh"].dtype)
    u[index] = -float(lr)
    mask = torch.zeros(2, P, dtype=u.dtype)
    mask[0, list(directions)] = 1.0
    mask[1, list(schedule)] = 1.0
    return {**net, "W_out": torch.zeros_like(net["W_out"]), "b_out": torch.zeros_like(net["b_out"]),
            "base_u": u, "base_c": torch.zeros(P + 1, dtype=u.dtype), "base_mask": mask}


def base_step(net: Mapping[str, Tensor], obs: Tensor) -> Tensor | None:
    """exp(c₀ + (c₁: ⊙ m₁)·Ψ)·((u ⊙ m₀)ᵀΨ) for raw Ψ [..., n, P] → [..., n] (None when ω has no base;
    m = ``base_mask`` [2, P]: the directions, the step size's features). The base entries may have
    leading dimensions [..., P] matching Ψ's (one ω per population member, in PES)."""
    if "base_u" not in net:
        return None
    m = net["base_mask"]
    c, u = net["base_c"], (net["base_u"] * m[..., 0, :]).unsqueeze(-1)
    e = (obs @ (c[..., 1:] * m[..., 1, :]).unsqueeze(-1)).squeeze(-1) + c[..., :1]
    return torch.exp(e.clamp(max=BASE_CLAMP)) * (obs @ u).squeeze(-1)


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
    out = net["out_scale"] * torch.addmm(net["b_out"], h, net["W_out"].T).squeeze(-1)
    base = base_step(net, obs)
    return (out if base is None else out + base), Hidden(h, c)


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
        self.base = {k: cast(net[k]) for k in BASE_KEYS if k in net}
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
        if self.base:
            out.add_(base_step(self.base, obs))


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
    path = save_checkpoint(path, {k: net[k].detach().to(torch.float32) for k in (*NET_KEYS, *BASE_KEYS) if k in net},
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
    mask = tensors.get("base_mask")
    if mask is not None and mask.dim() == 1:  # written before the step size had its own mask: it read all of Ψ
        tensors = {**tensors, "base_mask": torch.stack([mask, torch.ones_like(mask)])}
    try:
        check_net(tensors)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    return dict(tensors), meta


DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "psd.safetensors"
"""The packaged meta-trained policy ω (issue 11: AdaGrad + LSTM correction by PES, scale-free Ψ)."""
PAPER_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "psd-paper.safetensors"
"""The paper's PSD: paper features, Convolutional GPS (``configs/psd.toml``); ``psd``'s default until
issue 11, harness name ``psd-paper``."""

CHUNK_ROWS = 1024
"""Coordinates per fused LSTM chunk: keeps the [rows, 4H] gate buffer in cache (measured on one CPU
thread: 1024 rows beat 512 and 2048, and 1–4k rows ran 2–3× faster than 32k-row chunks)."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The policy checkpoint file does not exist (a ``CheckpointError`` and a ``FileNotFoundError``)."""


class PredictedStepDescent(torch.optim.Optimizer):
    """x ← x + μ^π(Ψ_t) with the per-coordinate LSTM π of :mod:`l2o.learned.psd`.

    ``checkpoint``: a PSD policy checkpoint (kind ``l2o-psd-policy``); ``None`` or ``"default"``
    loads the packaged weights. Several param groups are allowed (PSD has no per-group
    hyperparameters); a parameter whose ``.grad`` is ``None`` is skipped (its state is left as is).

    Ψ needs the mini-batch loss, so :meth:`step` needs either a ``closure`` (torch convention: it
    zeroes and refills the gradients and returns the loss) or, with gradients already filled,
    ``step(loss=...)``. Any finite loss is legitimate, including exactly 0 and negative values
    (Ψ's loss change divides by max(|f̂⁽ᵗ⁻¹⁾|, δ), see :mod:`l2o.features.conv2017`). A NaN/inf
    loss, gradient or observation raises ``FloatingPointError`` before any parameter moves (the
    benchmark harness records that run as diverged).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 checkpoint: str | os.PathLike | None = None) -> None:
        default = checkpoint is None or checkpoint == "default"
        path = DEFAULT_CHECKPOINT if default else Path(checkpoint)
        if not path.is_file():
            if default:
                raise MissingCheckpointError(
                    f"the packaged PSD policy {path} is not there (it is written by meta-training PSD); "
                    "pass a policy file: PredictedStepDescent(params, checkpoint=PATH), or "
                    "'psd:checkpoint=PATH' in the benchmark harness")
            raise MissingCheckpointError(f"checkpoint {path} not found")
        net, meta = load_policy(path)
        self.features = _features_of(path, net, meta)
        self.checkpoint = str(path)
        self.policy_meta = meta
        self.hidden_size = int(net["W_hh"].shape[-1])
        self._net = {k: net[k] for k in (*NET_KEYS, *BASE_KEYS) if k in net}
        self._fused: dict[tuple[torch.dtype, torch.device], FusedPolicy] = {}
        self._flat: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor, list[int]]] = {}
        self._deltas: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Tensor | float | None = None) -> Any:  # type: ignore[override]
        """One PSD iteration for every parameter with a gradient; returns the loss.

        ``closure`` recomputes the mini-batch loss and fills ``.grad``; alternatively pass the loss
        of the gradients already in ``.grad`` as ``loss=`` (not both).
        """
        if closure is not None and loss is not None:
            raise ValueError("PredictedStepDescent.step: pass a closure or loss=, not both")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is None:
            raise ValueError(
                "PredictedStepDescent.step needs the mini-batch loss (its observation Ψ includes the relative "
                "change of the objective): call step(closure) with a closure that zeroes the gradients, runs "
                "forward and backward and returns the loss, or step(loss=loss) after loss.backward()")
        f = loss.detach() if isinstance(loss, Tensor) else torch.as_tensor(float(loss), dtype=torch.float64)
        if f.numel() != 1:
            raise ValueError(f"PredictedStepDescent.step: the loss must be a scalar, got shape {tuple(f.shape)}")
        f_value = float(f)
        if not math.isfinite(f_value):
            raise FloatingPointError(f"PredictedStepDescent: the mini-batch loss is {f_value}")

        # Per (dtype, device): all coordinates in one flat [N] iterate/gradient and one [N, P] Ψ, every
        # check done before any state changes or any parameter moves.
        work = list(params_with_grad(self, "PredictedStepDescent"))
        if not work:
            return loss
        kinds: dict[tuple[torch.dtype, torch.device], list[tuple[int, int, Tensor]]] = {}
        for item in work:
            kinds.setdefault((item[2].dtype, item[2].device), []).append(item)
        plans = []
        for (dtype, device), items in kinds.items():
            ps = [p for _, _, p in items]
            states = [self.state[p] if p in self.state else {} for p in ps]  # created only after every check
            sizes = [p.numel() for p in ps]
            x = torch.cat([p.detach().reshape(-1) for p in ps])  # a copy: x⁽ᵗ⁾ outlives the step
            g = torch.cat([p.grad.reshape(-1) for p in ps])
            if not torch.isfinite(g).all():
                bad = next(i for i, gi in enumerate(g.split(sizes)) if not torch.isfinite(gi).all())
                raise FloatingPointError(f"PredictedStepDescent: the gradient of {_where(items[bad])} has NaN/inf entries")
            ft = f.to(dtype=dtype, device=device).reshape(()).clone()
            obs, mems = self._observe(states, sizes, x, g, ft)
            if not torch.isfinite(obs).all():
                bad = next(i for i, o in enumerate(obs.split(sizes)) if not torch.isfinite(o).all())
                prev = states[bad].get("f_prev", states[bad].get("feat.f_prev"))
                raise FloatingPointError(
                    f"PredictedStepDescent: the observation Ψ of {_where(items[bad])} is not finite "
                    f"(previous mini-batch loss {None if prev is None else float(prev)}, current {f_value})")
            plans.append((dtype, device, items, sizes, obs, mems))

        # One fused LSTM pass per (dtype, device) over row chunks; steps are views into one flat buffer.
        steps = []
        for dtype, device, items, sizes, obs, mems in plans:
            ps = [p for _, _, p in items]
            h, c = self._hidden_for(ps, [self.state[p] for p in ps], dtype, device)
            delta = self._delta_buf(obs.shape[0], dtype, device)
            self._fused_for(dtype, device).step_(h, c, obs, delta, CHUNK_ROWS)
            if not torch.isfinite(delta).all():
                bad = next(i for i, d in enumerate(delta.split(sizes)) if not torch.isfinite(d).all())
                raise FloatingPointError(f"PredictedStepDescent: the policy's step for {_where(items[bad])} is not finite")
            steps.append((ps, delta.split(sizes), mems))

        for ps, deltas, mems in steps:
            for p, d, mem in zip(ps, deltas, mems):
                state = self.state[p]
                state.update(mem)
                p.add_(d.view_as(p))
                state["step"] += 1
        return loss

    def _observe(self, states: list[dict[str, Any]], sizes: list[int], x: Tensor, g: Tensor,
                 ft: Tensor) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Ψ_t [N, P] for the parameters of one (dtype, device), whose iterates and gradients are
        concatenated in ``x``, ``g`` [N], and each one's new memory entries (views into one flat
        buffer). Parameters at the same point of their history (step count, and the same previous
        loss) share one feature computation — normally all of them; a parameter that missed steps
        (no gradient) forms its own bucket."""
        buckets: dict[tuple, list[int]] = {}
        for i, st in enumerate(states):
            key = (st.get("step", 0), id(st.get("feat.f_prev"))) if self.features is not None else \
                ("x_prev" in st, "x_prev2" in st, id(st.get("f_prev")))
            buckets.setdefault(key, []).append(i)
        if len(buckets) == 1:
            return self._observe_bucket(states, sizes, x, g, ft)
        obs = torch.empty(x.numel(), self._net["W_ih"].shape[1], dtype=x.dtype, device=x.device)
        mems: list[dict[str, Tensor]] = [{}] * len(states)
        xs, gs, rows = x.split(sizes), g.split(sizes), obs.split(sizes)
        for idx in buckets.values():
            o, ms = self._observe_bucket([states[i] for i in idx], [sizes[i] for i in idx],
                                         torch.cat([xs[i] for i in idx]), torch.cat([gs[i] for i in idx]), ft)
            for i, oi, m in zip(idx, o.split([sizes[i] for i in idx]), ms):
                rows[i].copy_(oi)
                mems[i] = m
        return obs, mems

    def _observe_bucket(self, states: list[dict[str, Any]], sizes: list[int], x: Tensor, g: Tensor,
                        ft: Tensor) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Ψ_t and the new memories of parameters that share their point in history (see :meth:`_observe`)."""
        first = states[0]

        def cat(key: str) -> Tensor | None:
            if key not in first:
                return None
            return first[key] if first[key].dim() == 0 or len(states) == 1 else torch.cat([s[key] for s in states])

        if self.features is None:  # the paper's Ψ (3 features) from x⁽ᵗ⁻¹⁾, x⁽ᵗ⁻²⁾, ∇f̂⁽ᵗ⁻¹⁾, f̂⁽ᵗ⁻¹⁾
            obs = observation_step(ft, first.get("f_prev"), g, cat("g_prev"), x, cat("x_prev"), cat("x_prev2"))
            mems = [{"x_prev": xi, "g_prev": gi, "f_prev": ft} for xi, gi in zip(x.split(sizes), g.split(sizes))]
            for st, m in zip(states, mems):
                if "x_prev" in st:
                    m["x_prev2"] = st["x_prev"]
            return obs, mems
        # a named feature set, its O(n) memory kept as state["feat.*"] tensors
        old = {k[5:]: cat(k) for k in first if k.startswith("feat.")} or self.features.init(x.numel(), 0, x.dtype)
        _, obs, new = self.features.step(old, int(first.get("step", 0)), x, g, ft, need_state=False)
        parts = {k: v.split(sizes) if v.dim() > 0 else [v] * len(sizes) for k, v in new.items()}
        return obs, [{f"feat.{k}": parts[k][i] for k in parts} for i in range(len(sizes))]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the loaded state tensors are copies: the LSTM state is updated in place
        (row views into one flat buffer), which must not write into the source optimizer's state."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    st[k] = v.clone()

    def _fused_for(self, dtype: torch.dtype, device: torch.device) -> FusedPolicy:
        key = (dtype, device)
        if key not in self._fused:
            self._fused[key] = FusedPolicy(self._net, dtype, device)
        return self._fused[key]

    def _delta_buf(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        buf = self._deltas.get(key)
        if buf is None or buf.numel() != n:
            buf = self._deltas[key] = torch.empty(n, dtype=dtype, device=device)
        return buf

    def _hidden_for(self, params: list[Tensor], states: list[dict[str, Any]], dtype: torch.dtype,
                    device: torch.device) -> tuple[Tensor, Tensor]:
        """Flat [N, H] LSTM state of ``params`` (in order), whose ``state["h"]``/``state["c"]`` are
        row views into it. Reused as is when every state already is the expected view (O(#tensors)
        pointer checks); otherwise rebuilt once by copying (first step, a new set of parameters
        with gradients, or after ``load_state_dict``)."""
        key = (dtype, device)
        flat = self._flat.get(key)
        sizes = [p.numel() for p in params]
        if flat is not None and flat[2] == sizes:
            h, c = flat[0], flat[1]
            off, ok = 0, True
            for st, n in zip(states, sizes):
                sh, sc = st.get("h"), st.get("c")
                if sh is None or sc is None or sh.data_ptr() != h[off:].data_ptr() or \
                        sc.data_ptr() != c[off:].data_ptr() or sh.shape != (n, self.hidden_size) or \
                        sc.shape != (n, self.hidden_size):
                    ok = False
                    break
                off += n
            if ok:
                return h, c
        N, H = sum(sizes), self.hidden_size
        h = torch.zeros(N, H, dtype=dtype, device=device)
        c = torch.zeros(N, H, dtype=dtype, device=device)
        off = 0
        for st, n in zip(states, sizes):
            if "step" in st:
                h[off:off + n].copy_(st["h"])
                c[off:off + n].copy_(st["c"])
            else:
                st["step"] = 0
            st["h"], st["c"] = h[off:off + n], c[off:off + n]
            off += n
        self._flat[key] = (h, c, sizes)
        return h, c


def _where(item: tuple[int, int, Tensor]) -> str:
    gi, pi, p = item
    return f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"


def _features_of(path: Path, net: dict[str, Tensor], meta: dict[str, Any]) -> FeatureSet | None:
    """The feature set a policy checkpoint was trained on (None: the paper's Ψ); its observation
    size must match ω's input."""
    name = meta.get("features", "paper2017")
    if not isinstance(name, str):
        raise CheckpointError(f"checkpoint {path}: metadata 'features' must be a string, got {name!r}")
    try:
        features = get_feature_set(name)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    if input_size(net) != features.obs_dim:
        raise CheckpointError(f"checkpoint {path}: ω reads {input_size(net)} features but its feature set "
                              f"{name!r} has {features.obs_dim}")
    return None if name == "paper2017" else features


PES_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "psd-pes.safetensors"
"""The packaged PSD policy meta-trained by Persistent ES (``l2o meta-train psd-pes``; issue 12)."""
GPS_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "psd-gps.safetensors"
"""PSD on the scale-free features by Convolutional GPS from ψ₀ = AdaGrad, iteration 0's π
(``configs/psd-scale-free.toml``; the start of ``psd-pes``): issue 12's GPS × LSTM cell."""


def _factory(params: list[Tensor], hp: dict[str, Any], default: Path | None = None) -> torch.optim.Optimizer:
    checkpoint = hp.get("checkpoint")
    if default is not None and checkpoint in (None, "default"):
        checkpoint = default
    return PredictedStepDescent(params, checkpoint=checkpoint)


def _register(name: str, display: str, default: Path | None = None) -> None:
    factory = _factory if default is None else functools.partial(_factory, default=default)
    register_optimizer(OptimizerEntry(name, display, factory, defaults={"checkpoint": "default"}, learned=True))


_register("psd", "PSD")  # DEFAULT_CHECKPOINT
_register("psd-paper", "PSD (paper)", PAPER_CHECKPOINT)  # the paper's PSD, under its own name since issue 11
_register("psd-pes", "PSD (PES)", PES_CHECKPOINT)
_register("psd-gps", "PSD (scale-free GPS)", GPS_CHECKPOINT)
