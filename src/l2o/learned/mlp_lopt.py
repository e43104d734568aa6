"""A small per-coordinate MLP learned optimizer (``mlp-lopt``): features, policy, torch.optim front
end and checkpoint format, in the style of learned_optimization's MLP optimizers.

Per coordinate j at step t = 1, 2, ... (g = mini-batch gradient, element-wise), the state is
  G_t = Σ_{i≤t} g_i²                          (AdaGrad's accumulator)
  m^β_t = β m^β_{t−1} + (1−β) g_t,  β ∈ {0.5, 0.9, 0.99}
  v^β_t = β v^β_{t−1} + (1−β) g_t²,  β ∈ {0.99, 0.999}
with bias corrections m̂ = m/(1−β^t), v̂ = v/(1−β^t). The K = 7 normalised *directions* are
  d = [ g/(√G+ε₁),  g/(√v^0.99+ε₂),  m̂^0.9/(√v̂^0.999+ε₂),  m^0.9/(√G+ε₁),
        m̂^0.5/(√v̂^0.999+ε₂),  m̂^0.99/(√v̂^0.999+ε₂),  g/(√v̂^0.999+ε₂) ]      (ε₁ = 1e-10, ε₂ = 1e-8)
i.e. AdaGrad, RMSprop (torch convention), Adam, momentum-AdaGrad, two Adam variants and RMS-normalised
g. With the noise feature r = √v̂^0.99/(√v̂^0.999+ε₂) they form the 8 per-coordinate features; all
are unchanged when the loss is multiplied by c > 0 (up to the ε's). The step-count embedding
τ(t) = tanh(t/s) for s ∈ {10, 100, 1000} needs no horizon.

The update (θ = {u, c, W1, b1, W2, b2}) is
  x ← x − α₀·exp(c₀ + c₁:₄·τ(t) [+ c₄·log ρ])·(uᵀd) − α₁·δ·exp(μ),
  [δ, μ] = W2ᵀ relu(W1ᵀ[φ; τ(t)] + b1) + b2,
where φ is the 8 features each divided by its root-mean-square over the parameter tensor,
α₀ = 0.1 (tuned AdaGrad's learning rate, ``base_lr``) and α₁ = 0.01 (``mlp_scale``). The first term
is a learned combination of the hand-designed directions with a learned step-size schedule; the
second is the MLP. The bracketed term is on only in the ``snr`` architecture: ρ = mean over the
tensor of (m̂^0.99/√v̂^0.999)², a per-tensor signal-to-noise ratio (1 for a noiseless constant
gradient, ≈ 1/199 for pure noise: m^0.99 averages the noise out), so the step size can shrink where
mini-batch noise dominates, as AdaGrad's does, and stay large where it does not; ρ is scale-free
and costs nothing (it is d₅'s mean square, which the MLP's normalisation computes anyway).
:func:`init_theta` sets u = e₁, c = 0, W2 = b2 = 0, which is exactly
``torch.optim.Adagrad(lr=0.1, eps=1e-10)``; meta-training (:mod:`l2o.outer`) moves θ from there.

Everything is a pure function of tensors (:func:`policy_step`), so :mod:`l2o.outer` evaluates many
θ's at once under ``torch.func.vmap``; :class:`MLPLOpt` applies it to each parameter tensor with
flattened tensor ops, in place (Python work per step: O(#tensors), plus one MLP call per
:data:`CHUNK` coordinates of a large tensor).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l2o.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from l2o.learned.base import params_with_grad

POLICY_KIND = "l2o-mlp-lopt-policy"
"""Checkpoint kind of a θ that :class:`MLPLOpt` loads."""
FEATURE_VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "mlp-lopt.safetensors"
"""The packaged θ: meta-trained by Persistent ES on ``mnist:48-48:b64`` from θ₀
(``configs/mlp-lopt-pes.toml``; the JSON beside it records the run; docs/RESULTS.md its evaluation)."""

EPS_ADAGRAD = 1e-10
EPS_ADAPTIVE = 1e-8
MOMENTUM_DECAYS = (0.5, 0.9, 0.99)
SECOND_MOMENT_DECAYS = (0.99, 0.999)
TIME_SCALES = (10.0, 100.0, 1000.0)
STATE_KEYS = ("G", "m05", "m09", "m099", "v099", "v0999")
"""Per-coordinate state tensors, each shaped like the parameter."""
N_DIRECTIONS = 7
N_COORD_FEATURES = N_DIRECTIONS + 1
N_TIME = len(TIME_SCALES)
THETA_KEYS = ("u", "c", "W1", "b1", "W2", "b2")
CHUNK = 8192
"""Coordinates per block of the front end's MLP on large tensors: keeps the [H, CHUNK] hidden layer
in cache (a [H, 10⁶] hidden layer made one step ≈ 5× slower on one CPU thread). The Python work per
step is O(#tensors + n/CHUNK); everything else is one flattened tensor op per tensor."""
COMPILE_MIN = 1 << 16
"""With ``compile="auto"``, :class:`MLPLOpt` compiles the step of tensors with at least this many
coordinates (``python benchmarks/bench_step_time.py``: compiled steps are slower than eager ones on
the 48-48-10 net's tensors and ≈ 2× faster on the 784-1250-10 net's)."""
SNR_ROW = 5
"""Row of φ whose mean square times its row scale squared is ρ (d₅ = m̂^0.99/√v̂^0.999)."""
MAG_CLAMP = 10.0
"""μ is clamped to ≤ 10 before exp (keeps a bad θ finite)."""


@dataclass(frozen=True)
class MLPLOptArch:
    """Architecture constants (stored in every checkpoint): hidden width H ≤ 32, α₀, α₁, and
    ``snr``: whether the step size also reads the per-tensor signal-to-noise ratio ρ (θ's c gets a
    fifth entry; checkpoints written before the field existed load as ``snr=False``)."""

    hidden: int = 32
    base_lr: float = 0.1
    mlp_scale: float = 0.01
    snr: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.hidden, int) and 1 <= self.hidden <= 32):
            raise ValueError(f"mlp-lopt: hidden width must be an int in [1, 32], got {self.hidden!r}")
        for name in ("base_lr", "mlp_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"mlp-lopt: {name} must be a finite number > 0, got {v!r}")
        if not isinstance(self.snr, bool):
            raise ValueError(f"mlp-lopt: snr must be true or false, got {self.snr!r}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of θ's tensors, in :data:`THETA_KEYS` order."""
        H = self.hidden
        return {"u": (N_DIRECTIONS,), "c": (1 + N_TIME + int(self.snr),), "W1": (N_COORD_FEATURES + N_TIME, H), "b1": (H,),
                "W2": (H, 2), "b2": (2,)}

    @property
    def dim(self) -> int:
        """Number of meta-parameters D."""
        return sum(math.prod(s) for s in self.shapes().values())


def init_theta(arch: MLPLOptArch = MLPLOptArch(), seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The AdaGrad-equivalent θ₀: u = e₁ (AdaGrad's direction), c = 0 (constant step α₀), W1 random
    N(0, 1/fan_in) (seeded), b1 = 0, and the MLP's last layer W2 = b2 = 0 (its output is 0)."""
    shapes = arch.shapes()
    g = torch.Generator().manual_seed(seed)
    theta = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    theta["u"][0] = 1.0
    theta["W1"] = torch.randn(shapes["W1"], generator=g, dtype=torch.float64) / math.sqrt(shapes["W1"][0])
    return {k: v.to(dtype) for k, v in theta.items()}


def with_snr(theta: Mapping[str, Tensor], arch: MLPLOptArch) -> tuple[dict[str, Tensor], MLPLOptArch]:
    """The same optimizer in the ``snr`` architecture: c gets c₄ = 0, so every step is unchanged
    (the start of a meta-training run that may learn to use ρ)."""
    if arch.snr:
        raise ValueError("mlp-lopt: θ already has the snr term")
    theta = {k: v.clone() for k, v in theta.items()}
    theta["c"] = torch.cat([theta["c"], theta["c"].new_zeros(1)])
    return theta, dataclasses.replace(arch, snr=True)


def theta_to_flat(theta: Mapping[str, Tensor]) -> Tensor:
    """θ as one vector (:data:`THETA_KEYS` order)."""
    return torch.cat([theta[k].reshape(-1) for k in THETA_KEYS])


def flat_to_theta(flat: Tensor, arch: MLPLOptArch) -> dict[str, Tensor]:
    """Split a vector of length ``arch.dim`` into θ's tensors (views; works under vmap)."""
    out: dict[str, Tensor] = {}
    i = 0
    for k, s in arch.shapes().items():
        n = math.prod(s)
        out[k] = flat[i:i + n].reshape(s)
        i += n
    if i != flat.shape[-1]:
        raise ValueError(f"mlp-lopt: θ vector has {flat.shape[-1]} entries, the architecture needs {i}")
    return out


def init_state(like: Tensor) -> dict[str, Tensor]:
    """Zero accumulators for one parameter (any shape)."""
    return {k: torch.zeros_like(like) for k in STATE_KEYS}


def time_features(t: Tensor) -> Tensor:
    """τ(t) = tanh(t/s), s ∈ :data:`TIME_SCALES` (t is the 1-based step index, a 0-d tensor)."""
    return torch.stack([torch.tanh(t / s) for s in TIME_SCALES])


def step_constants(t: Tensor) -> dict[str, Tensor]:
    """What depends on t only: τ(t); the row scales ``rs`` [8] with d_k = rs_k·row_k (bias
    corrections, see :func:`features`); ``eps999`` = ε₂·√(1−0.999^t)."""
    bc = {b: 1 - torch.pow(torch.as_tensor(b, dtype=t.dtype), t) for b in (0.5, 0.9, 0.99, 0.999)}
    s999 = bc[0.999].sqrt()
    one = torch.ones_like(s999)
    rs = torch.stack([one, one, s999 / bc[0.9], one, s999 / bc[0.5], s999 / bc[0.99], s999, s999 / bc[0.99].sqrt()])
    return {"tau": time_features(t), "rs": rs, "eps999": EPS_ADAPTIVE * s999}


def update_state(state: Mapping[str, Tensor], g: Tensor) -> dict[str, Tensor]:
    """Accumulators after gradient g: G + g² (as torch's AdaGrad: addcmul), m^β and v^β by lerp."""
    g2 = g * g
    return {
        "G": torch.addcmul(state["G"], g, g),
        "m05": torch.lerp(state["m05"], g, 0.5),
        "m09": torch.lerp(state["m09"], g, 0.1),
        "m099": torch.lerp(state["m099"], g, 0.01),
        "v099": torch.lerp(state["v099"], g2, 0.01),
        "v0999": torch.lerp(state["v0999"], g2, 0.001),
    }


def feature_rows(state: Mapping[str, Tensor], g: Tensor, consts: Mapping[str, Tensor]) -> list[Tensor]:
    """:func:`features`' 8 rows as separate tensors (no [8, n] tensor: lets ``torch.compile`` fuse
    each row into the loops that use it)."""
    sqrt_g = state["G"].sqrt() + EPS_ADAGRAD
    rv99 = state["v099"].sqrt()
    inv999 = torch.reciprocal(state["v0999"].sqrt() + consts["eps999"])
    return [g / sqrt_g, g / (rv99 + EPS_ADAPTIVE), state["m09"] * inv999, state["m09"] / sqrt_g,
            state["m05"] * inv999, state["m099"] * inv999, g * inv999, rv99 * inv999]


def features(state: Mapping[str, Tensor], g: Tensor, consts: Mapping[str, Tensor], out: Tensor | None = None) -> Tensor:
    """The 8 per-coordinate feature rows [8, n] from the *updated* state (flat [n]), up to the row
    scales ``consts["rs"]``: d_k = rs_k·row_k are the K = 7 directions of the module docstring and
    rs_7·row_7 the noise feature r. (With u := u ⊙ rs the linear path is exact; the RMS-normalised
    rows the MLP sees do not depend on positive row scales.) ``out``: a [8, n] buffer to fill
    (no vmap), else the rows are stacked."""
    if out is None:
        return torch.stack(feature_rows(state, g, consts))
    sqrt_g = state["G"].sqrt().add_(EPS_ADAGRAD)
    rv99 = state["v099"].sqrt()
    inv999 = torch.reciprocal(state["v0999"].sqrt().add_(consts["eps999"]))
    torch.div(g, sqrt_g, out=out[0])
    torch.div(g, rv99 + EPS_ADAPTIVE, out=out[1])
    torch.mul(state["m09"], inv999, out=out[2])
    torch.div(state["m09"], sqrt_g, out=out[3])
    torch.mul(state["m05"], inv999, out=out[4])
    torch.mul(state["m099"], inv999, out=out[5])
    torch.mul(g, inv999, out=out[6])
    torch.mul(rv99, inv999, out=out[7])
    return out


def _mlp_out(W1n: Tensor, bias: Tensor, W2: Tensor, b2: Tensor, phi: Tensor, chunk: int | None,
             out: Tensor | None = None) -> Tensor:
    """δ·exp(μ) [n] for features φ [8, n]: [δ; μ] = W2ᵀ relu(W1nᵀ φ + bias) + b2. With ``chunk``,
    CHUNK coordinates at a time (keeps the [H, chunk] hidden layer in cache; no autograd/vmap)."""
    n = phi.shape[-1]
    if chunk is None:
        h = torch.relu(W1n.T @ phi + bias.unsqueeze(-1))
        o = W2.T @ h + b2.unsqueeze(-1)
        return o[0] * torch.exp(o[1].clamp(max=MAG_CLAMP))
    res = torch.empty(n, dtype=phi.dtype, device=phi.device) if out is None else out
    W1t, b, W2t, c2 = W1n.T.contiguous(), bias.unsqueeze(-1), W2.T.contiguous(), b2.unsqueeze(-1)
    for s in range(0, n, chunk):
        h = torch.addmm(b, W1t, phi[:, s:s + chunk]).relu_()
        o = torch.addmm(c2, W2t, h)
        torch.mul(o[0], o[1].clamp_(max=MAG_CLAMP).exp_(), out=res[s:s + chunk])
    return res


def _mlp_unrolled(W1n: Tensor, bias: Tensor, W2: Tensor, b2: Tensor, phi: Tensor | Sequence[Tensor]) -> Tensor:
    """:func:`_mlp_out` as per-coordinate scalar arithmetic (no matmul): under ``torch.compile``
    it becomes one fused loop over the coordinates, with no [H, n] hidden layer in memory."""
    o0, o1 = b2[0], b2[1]
    for j in range(W1n.shape[1]):
        a = bias[j]
        for f in range(len(phi)):
            a = a + W1n[f, j] * phi[f]
        a = torch.relu(a)
        o0, o1 = o0 + W2[j, 0] * a, o1 + W2[j, 1] * a
    return o0 * torch.exp(o1.clamp(max=MAG_CLAMP))


def policy_step(theta: Mapping[str, Tensor], state: Mapping[str, Tensor], g: Tensor, t: Tensor | None,
                arch: MLPLOptArch, chunk: int | None = None, consts: Mapping[str, Tensor] | None = None,
                unrolled: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """One step for one parameter tensor, flattened: returns (Δx [n], new state); x ← x + Δx.

    ``g`` is the gradient [n], ``state`` the accumulators [n] each, ``t`` the 1-based step index
    (0-d tensor; ``consts`` = :func:`step_constants` (t) if already computed). Pure: usable under
    ``torch.func.vmap`` over θ, state, g and t when ``chunk`` is None; with ``chunk`` (the front
    end, no autograd) the MLP runs CHUNK coordinates at a time into preallocated buffers. The
    per-tensor RMS normalisation of φ is folded into W1's rows. ``unrolled`` writes the MLP and
    the linear term as scalar arithmetic (:func:`_mlp_unrolled`, as :func:`compiled_passes` does).
    """
    consts = step_constants(t) if consts is None else consts
    new = update_state(state, g)
    buffer = None if chunk is None else torch.empty((N_COORD_FEATURES, g.shape[-1]), dtype=g.dtype, device=g.device)
    phi = features(new, g, consts, out=buffer)
    if chunk is None:
        mean_square = phi.square().mean(dim=-1)
    else:
        mean_square = torch.linalg.vector_norm(phi, dim=-1).square() / phi.shape[-1]
    return step_from_features(step_weights(theta, mean_square, consts, arch), phi, chunk, unrolled=unrolled), new


def step_weights(theta: Mapping[str, Tensor], mean_square: Tensor, consts: Mapping[str, Tensor],
                 arch: MLPLOptArch) -> dict[str, Any]:
    """What Δx needs besides φ, for one tensor at one step: the step size α₀·exp(c₀ + c₁:₄·τ
    [+ c₄·log ρ]), u with the row scales folded in, W1's φ rows divided by φ's RMS over the tensor
    (``mean_square`` [8]), b1 + τᵀ·W1's τ rows, W2, b2 and −α₁."""
    tau = consts["tau"].to(mean_square.dtype)
    c, W1 = theta["c"], theta["W1"]
    exponent = c[0] + (c[1:1 + N_TIME] * tau).sum()
    if arch.snr:
        rho = mean_square[SNR_ROW] * consts["rs"][SNR_ROW].to(mean_square.dtype).square()
        exponent = exponent + c[1 + N_TIME] * torch.log(rho + 1e-12)
    return {"step_size": arch.base_lr * torch.exp(exponent),
            "u": theta["u"] * consts["rs"][:N_DIRECTIONS].to(mean_square.dtype),
            "W1n": W1[:N_COORD_FEATURES] * torch.rsqrt(mean_square + 1e-12).unsqueeze(-1),
            "bias": theta["b1"] + tau @ W1[N_COORD_FEATURES:], "W2": theta["W2"], "b2": theta["b2"],
            "mlp_scale": -arch.mlp_scale}


def step_from_features(w: Mapping[str, Any], phi: Tensor | Sequence[Tensor], chunk: int | None = None,
                       out: Tensor | None = None, unrolled: bool = False) -> Tensor:
    """Δx [n] from :func:`step_weights` ``w`` and the feature rows φ [8, n] (a list of rows if
    ``unrolled``): the policy of the module docstring. With ``chunk``, in place in φ's buffers
    (``out``: the MLP's)."""
    u = w["u"]
    linear = sum(u[k] * phi[k] for k in range(N_DIRECTIONS)) if unrolled else u @ phi[:N_DIRECTIONS]
    mlp = (_mlp_unrolled(w["W1n"], w["bias"], w["W2"], w["b2"], phi) if unrolled
           else _mlp_out(w["W1n"], w["bias"], w["W2"], w["b2"], phi, chunk, out=out))
    if chunk is None:
        return -w["step_size"] * linear + w["mlp_scale"] * mlp
    return linear.mul_(-w["step_size"]).add_(mlp, alpha=w["mlp_scale"])


def inputs(state: Mapping[str, Tensor], g: Tensor, t: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """The policy's per-coordinate inputs [n, 18] for the flat gradient ``g`` [n] of one or several
    parameter tensors (``sizes``, default one) whose accumulators ``state`` were already updated with
    it, at 1-based step ``t``: the K = 7 directions d, the 8 features each divided by its RMS over
    its own tensor, and τ(t) — what :func:`policy_from_inputs` reads (Convolutional GPS records them)."""
    consts = step_constants(t)
    rows = features(state, g, consts)  # [8, n]
    sizes = [g.shape[-1]] if sizes is None else list(sizes)
    inv_rms = torch.cat([torch.rsqrt(r.square().mean(dim=-1, keepdim=True) + 1e-12).expand(-1, r.shape[-1])
                         for r in rows.split(sizes, dim=-1)], dim=-1)
    d = rows[:N_DIRECTIONS] * consts["rs"][:N_DIRECTIONS].to(g.dtype).unsqueeze(-1)
    tau = consts["tau"].to(g.dtype).unsqueeze(-1).expand(-1, g.shape[-1])
    return torch.cat([d, rows * inv_rms, tau]).T


N_INPUTS = N_DIRECTIONS + N_COORD_FEATURES + N_TIME
"""Columns of :func:`inputs`: d (7), RMS-normalised features (8), τ(t) (3)."""


def policy_from_inputs(theta: Mapping[str, Tensor], x: Tensor, arch: MLPLOptArch) -> Tensor:
    """Δx from :func:`inputs` ``x`` [..., 18] (any leading shape; differentiable in θ): the update of
    the module docstring, −α₀·exp(c₀ + c₁:·τ)·(uᵀd) − α₁·δ·exp(μ)."""
    if arch.snr:
        raise ValueError("mlp-lopt: the snr architecture's ρ is a per-tensor statistic that the per-coordinate "
                         "inputs of Convolutional GPS do not carry; meta-train it with PES")
    d, phi, tau = x.split([N_DIRECTIONS, N_COORD_FEATURES, N_TIME], dim=-1)
    c = theta["c"]
    step_size = arch.base_lr * torch.exp(c[0] + tau @ c[1:])
    h = torch.relu(torch.cat([phi, tau], dim=-1) @ theta["W1"] + theta["b1"])
    o = h @ theta["W2"] + theta["b2"]
    return -(step_size * (d @ theta["u"]) + arch.mlp_scale * o[..., 0] * torch.exp(o[..., 1].clamp(max=MAG_CLAMP)))


def policy_step_(theta: Mapping[str, Tensor], state: dict[str, Tensor], g: Tensor, consts: Mapping[str, Tensor],
                 arch: MLPLOptArch, scratch: Mapping[str, Tensor], chunk: int = CHUNK) -> Tensor:
    """:func:`policy_step` for the front end, in place: updates ``state`` (flat contiguous tensors)
    and returns Δx, using the same operations (hence the same numbers) with no fresh [n]-sized
    tensors but Δx itself. ``scratch``: buffers ``phi`` [8, n], ``a``, ``b``, ``mlp`` [n]."""
    G, m05, m09, m099, v099, v999 = (state[k] for k in STATE_KEYS)
    G.addcmul_(g, g)
    m05.lerp_(g, 0.5)
    m09.lerp_(g, 0.1)
    m099.lerp_(g, 0.01)
    g2 = torch.mul(g, g, out=scratch["a"])
    v099.lerp_(g2, 0.01)
    v999.lerp_(g2, 0.001)
    phi = scratch["phi"]
    sqrt_g = torch.sqrt(G, out=scratch["a"]).add_(EPS_ADAGRAD)
    torch.div(g, sqrt_g, out=phi[0])
    torch.div(m09, sqrt_g, out=phi[3])
    rv99 = torch.sqrt(v099, out=scratch["b"])
    inv999 = torch.sqrt(v999, out=scratch["a"]).add_(consts["eps999"]).reciprocal_()
    torch.mul(rv99, inv999, out=phi[7])
    torch.div(g, rv99.add_(EPS_ADAPTIVE), out=phi[1])
    torch.mul(m09, inv999, out=phi[2])
    torch.mul(m05, inv999, out=phi[4])
    torch.mul(m099, inv999, out=phi[5])
    torch.mul(g, inv999, out=phi[6])
    mean_square = torch.linalg.vector_norm(phi, dim=-1).square() / phi.shape[-1]
    return step_from_features(step_weights(theta, mean_square, consts, arch), phi, chunk, out=scratch["mlp"])


def _update_and_mean_squares_(state: dict[str, Tensor], g: Tensor, consts: Mapping[str, Tensor]) -> Tensor:
    new = update_state(state, g)
    for k in STATE_KEYS:
        state[k].copy_(new[k])
    return torch.stack([r.square().mean() for r in feature_rows(new, g, consts)])


def _step_from_state(w: Mapping[str, Any], state: Mapping[str, Tensor], g: Tensor, consts: Mapping[str, Tensor]
                     ) -> Tensor:
    return step_from_features(w, feature_rows(state, g, consts), unrolled=True)


@functools.cache
def compiled_passes() -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """:func:`policy_step_`'s job as two ``torch.compile``d passes over the coordinates: (1)
    ``(state, g, consts) → mean squares of φ`` with the state updated in place, (2) ``(w, state, g,
    consts) → Δx`` with ``w`` = :func:`step_weights` of those mean squares: φ recomputed from the new
    state, the linear term and the MLP (:func:`_mlp_unrolled`). φ never goes to memory, which halves the memory traffic of a
    large tensor's step. Each compiles on its first call (tens of seconds; needs a C++ compiler)
    for every tensor size; equal to :func:`policy_step_` up to float rounding."""
    return (torch.compile(_update_and_mean_squares_, dynamic=True), torch.compile(_step_from_state, dynamic=True))


# ---------------------------------------------------------------------------------------------
# Checkpoint format


def save_policy(path: str | os.PathLike, theta: Mapping[str, Tensor], arch: MLPLOptArch,
                info: Mapping[str, Any] | None = None) -> Path:
    """Write θ (float32) and the architecture as a policy checkpoint, plus a JSON description."""
    shapes = arch.shapes()
    for k in THETA_KEYS:
        if tuple(theta[k].shape) != shapes[k]:
            raise ValueError(f"mlp-lopt: θ[{k!r}] has shape {tuple(theta[k].shape)}, expected {shapes[k]}")
    meta = {"arch": asdict(arch), "feature_version": FEATURE_VERSION, "info": dict(info or {})}
    path = save_checkpoint(path, {k: theta[k].detach().to(torch.float32) for k in THETA_KEYS}, meta, kind=POLICY_KIND)
    desc = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), **meta}
    path.with_suffix(".json").write_text(json.dumps(desc, indent=2, sort_keys=True) + "\n")
    return path


def load_policy(path: str | os.PathLike) -> tuple[dict[str, Tensor], MLPLOptArch, dict[str, Any]]:
    """Read (θ, architecture, metadata) from a policy checkpoint, or from a PES training
    checkpoint of :mod:`l2o.outer.meta_mlp_lopt` (its current θ)."""
    tensors, meta = load_checkpoint(path)
    kind = meta.get("kind")
    try:
        if kind == POLICY_KIND:
            if meta.get("feature_version") != FEATURE_VERSION:
                raise ValueError(f"feature version {meta.get('feature_version')!r}, this l2o reads {FEATURE_VERSION}")
            arch = MLPLOptArch(**meta["arch"])
            theta = {k: tensors[k] for k in THETA_KEYS}
        elif kind == "l2o-meta-mlp-lopt-train":
            arch = MLPLOptArch(**meta["arch"])
            theta = flat_to_theta(tensors["theta"].to(torch.float32), arch)
            theta = {k: v.clone() for k, v in theta.items()}
        else:
            raise ValueError(f"holds {kind!r}, expected {POLICY_KIND!r}")
        shapes = arch.shapes()
        for k in THETA_KEYS:
            if tuple(theta[k].shape) != shapes[k]:
                raise ValueError(f"θ[{k!r}] has shape {tuple(theta[k].shape)}, expected {shapes[k]}")
            if not torch.isfinite(theta[k]).all():
                raise ValueError(f"θ[{k!r}] has NaN/inf entries")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"mlp-lopt checkpoint {path}: {e}") from e
    return theta, arch, meta


# ---------------------------------------------------------------------------------------------
# torch.optim front end


class MLPLOpt(torch.optim.Optimizer):
    """x ← x + Δx(θ; features of ∇f̂) per coordinate, with the policy of :func:`policy_step`.

    ``checkpoint``: a policy file (kind ``l2o-mlp-lopt-policy``) or a PES training checkpoint;
    ``None``/``"default"`` loads the packaged θ. ``theta``/``arch`` instead give θ directly
    (e.g. :func:`init_theta`, the AdaGrad-equivalent θ₀). ``compile``: a parameter tensor's step
    runs as two ``torch.compile``d passes (:func:`compiled_passes`: ≈ 2× faster on large tensors,
    the same steps up to float rounding; the first such step compiles for tens of seconds, cached
    on disk by torch) — ``"auto"`` for tensors of at least :data:`COMPILE_MIN` coordinates (below
    that, the compiled call's overhead outweighs its gain), ``True`` for all, ``False`` for none.
    Where nothing can be compiled it warns once and steps eagerly. Each parameter tensor keeps its
    accumulators and step count in ``self.state`` (exact ``state_dict`` round trip); a parameter
    whose ``.grad`` is ``None`` is skipped. The loss is not used (any value, zero or negative, is
    fine). A NaN/inf gradient, or a non-finite step from a bad θ, raises ``FloatingPointError``
    before any parameter moves.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], checkpoint: str | os.PathLike | None = None,
                 *, theta: Mapping[str, Tensor] | None = None, arch: MLPLOptArch | None = None,
                 compile: bool | str = "auto") -> None:
        if compile not in (True, False, "auto"):
            raise ValueError(f"MLPLOpt: compile must be True, False or 'auto', got {compile!r}")
        if theta is not None:
            if checkpoint is not None:
                raise ValueError("MLPLOpt: pass checkpoint= or theta=, not both")
            self.arch = arch or MLPLOptArch()
            self.theta = {k: theta[k].detach().clone() for k in THETA_KEYS}
            self.checkpoint = None
        else:
            path = DEFAULT_CHECKPOINT if checkpoint in (None, "default") else Path(checkpoint)
            self.theta, self.arch, self.policy_meta = load_policy(path)
            self.checkpoint = str(path)
        self._theta_cache: dict[tuple[torch.dtype, torch.device], dict[str, Tensor]] = {}
        self._scratch: dict[tuple[int, torch.dtype, torch.device], dict[str, Tensor]] = {}
        self.compile = compile
        super().__init__(params, {})

    def _theta_for(self, like: Tensor) -> dict[str, Tensor]:
        key = (like.dtype, like.device)
        if key not in self._theta_cache:
            self._theta_cache[key] = {k: v.to(dtype=like.dtype, device=like.device) for k, v in self.theta.items()}
        return self._theta_cache[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step for every parameter with a gradient; ``closure`` (optional) recomputes the loss
        and fills ``.grad``; its value is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for gi, pi, p in params_with_grad(self, "MLPLOpt"):
            g = p.grad.reshape(-1)
            # a NaN/inf entry makes the sum NaN/inf; only then (or on overflow) check entry-wise
            if not bool(torch.isfinite(g.sum())) and not torch.isfinite(g).all():
                raise FloatingPointError(
                    f"MLPLOpt: the gradient of parameter {pi} of param group {gi} (shape {tuple(p.shape)}) has NaN/inf entries")
            work.append((p, g))
        consts: dict[tuple[int, torch.dtype, torch.device], dict[str, Tensor]] = {}
        deltas: list[tuple[Tensor, Tensor]] = []
        for p, g in work:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                for k, v in init_state(g).items():
                    state[k] = v
            key = (state["step"] + 1, p.dtype, p.device)
            if key not in consts:
                consts[key] = step_constants(torch.tensor(float(key[0]), dtype=p.dtype, device=p.device))
            for k in STATE_KEYS:
                if not state[k].is_contiguous():
                    state[k] = state[k].contiguous()
            flat = {k: state[k].view(-1) for k in STATE_KEYS}
            theta, gp = self._theta_for(p), g.to(p.dtype)
            compiled = self.compile is True or (self.compile == "auto" and g.numel() >= COMPILE_MIN)
            delta = self._compiled_step(theta, flat, gp, consts[key]) if compiled else None
            if delta is None:
                delta = policy_step_(theta, flat, gp, consts[key], self.arch, self._scratch_for(g))
            if not bool(torch.isfinite(delta.sum())) and not torch.isfinite(delta).all():
                raise FloatingPointError(f"MLPLOpt: the policy's step for a parameter of shape {tuple(p.shape)} "
                                         "is not finite (no parameter was moved)")
            deltas.append((p, delta))
            state["step"] += 1
        for p, delta in deltas:
            p.add_(delta.view_as(p))
        return loss

    def _compiled_step(self, theta: dict[str, Tensor], flat: dict[str, Tensor], g: Tensor,
                       consts: dict[str, Tensor]) -> Tensor | None:
        """Δx by :func:`compiled_passes` (the state updated in place); where ``torch.compile``
        cannot compile a pass here, a warning and eager steps from now on: None if the first pass
        failed (it fails before touching the state), else the second pass run eagerly."""
        import torch._dynamo

        update, step = compiled_passes()
        try:
            mean_square = update(flat, g, consts)
        except torch._dynamo.exc.TorchDynamoException as e:
            return self._compile_failed(e)
        try:
            w = step_weights(theta, mean_square, consts, self.arch)
            return step(w, flat, g, consts)
        except torch._dynamo.exc.TorchDynamoException as e:
            self._compile_failed(e)
            return _step_from_state(w, flat, g, consts)

    def _compile_failed(self, e: Exception) -> None:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        warnings.warn(f"MLPLOpt(compile={self.compile!r}): torch.compile failed ({type(e).__name__}: {first}); "
                      "using the eager step", RuntimeWarning, stacklevel=4)
        self.compile = False

    def _scratch_for(self, g: Tensor) -> dict[str, Tensor]:
        """Work buffers reused across steps (fresh multi-MB tensors cost page faults every step)."""
        key = (g.numel(), g.dtype, g.device)
        if key not in self._scratch:
            n = g.numel()
            self._scratch[key] = {"phi": torch.empty((N_COORD_FEATURES, n), dtype=g.dtype, device=g.device),
                                  "a": torch.empty(n, dtype=g.dtype, device=g.device),
                                  "b": torch.empty(n, dtype=g.dtype, device=g.device),
                                  "mlp": torch.empty(n, dtype=g.dtype, device=g.device)}
        return self._scratch[key]


GPS_CHECKPOINT = WEIGHTS_DIR / "mlp-lopt-gps.safetensors"
"""The same MLP meta-trained by Convolutional GPS instead of PES (``configs/mlp-lopt-gps.toml``;
issue 12's GPS × MLP cell), harness name ``mlp-lopt-gps``."""


_COMPILE_OPTIONS = {"auto": "auto", "on": True, "off": False}


def _factory(params: list[Tensor], hp: dict[str, Any], default: Path = DEFAULT_CHECKPOINT) -> torch.optim.Optimizer:
    checkpoint, compile_ = hp.get("checkpoint"), hp.get("compile", "auto")
    if compile_ not in _COMPILE_OPTIONS:
        raise ValueError(f"mlp-lopt: compile must be one of {sorted(_COMPILE_OPTIONS)}, got {compile_!r}")
    return MLPLOpt(params, checkpoint=default if checkpoint in (None, "default") else checkpoint,
                   compile=_COMPILE_OPTIONS[compile_])


def _register() -> None:
    from l2o.baselines.registry import OptimizerEntry, register_optimizer

    defaults = {"checkpoint": "default", "compile": "auto"}
    register_optimizer(OptimizerEntry("mlp-lopt", "MLP LOpt", _factory, defaults=defaults, learned=True))
    register_optimizer(OptimizerEntry("mlp-lopt-gps", "MLP LOpt (GPS)", functools.partial(_factory, default=GPS_CHECKPOINT),
                                      defaults=defaults, learned=True))


_register()
