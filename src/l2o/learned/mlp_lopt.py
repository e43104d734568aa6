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
  x ← x − α₀·exp(c₀ + c₁:·τ(t))·(uᵀd) − α₁·δ·exp(μ),   [δ, μ] = W2ᵀ relu(W1ᵀ[φ; τ(t)] + b1) + b2,
where φ is the 8 features each divided by its root-mean-square over the parameter tensor,
α₀ = 0.1 (tuned AdaGrad's learning rate, ``base_lr``) and α₁ = 0.01 (``mlp_scale``). The first term
is a learned combination of the hand-designed directions with a learned step-size schedule; the
second is the MLP. :func:`init_theta` sets u = e₁, c = 0, W2 = b2 = 0, which is exactly
``torch.optim.Adagrad(lr=0.1, eps=1e-10)``; meta-training (:mod:`l2o.outer`) moves θ from there.

Everything is a pure function of tensors (:func:`policy_step`), so :mod:`l2o.outer` evaluates many
θ's at once under ``torch.func.vmap``; :class:`MLPLOpt` applies it to each parameter tensor with
flattened tensor ops (O(#tensors) Python work per step).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l2o.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

POLICY_KIND = "l2o-mlp-lopt-policy"
"""Checkpoint kind of a θ that :class:`MLPLOpt` loads."""
FEATURE_VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "mlp-lopt.safetensors"
"""The packaged θ (see the JSON beside it for how it was obtained)."""

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
MAG_CLAMP = 10.0
"""μ is clamped to ≤ 10 before exp (keeps a bad θ finite)."""


@dataclass(frozen=True)
class MLPLOptArch:
    """Architecture constants (stored in every checkpoint): hidden width H ≤ 32, α₀, α₁."""

    hidden: int = 32
    base_lr: float = 0.1
    mlp_scale: float = 0.01

    def __post_init__(self) -> None:
        if not (isinstance(self.hidden, int) and 1 <= self.hidden <= 32):
            raise ValueError(f"mlp-lopt: hidden width must be an int in [1, 32], got {self.hidden!r}")
        for name in ("base_lr", "mlp_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"mlp-lopt: {name} must be a finite number > 0, got {v!r}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of θ's tensors, in :data:`THETA_KEYS` order."""
        H = self.hidden
        return {"u": (N_DIRECTIONS,), "c": (1 + N_TIME,), "W1": (N_COORD_FEATURES + N_TIME, H), "b1": (H,),
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


def directions(state: Mapping[str, Tensor], g: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The K directions [n, K] and the noise feature r [n] from the *updated* state (flat [n])."""
    bc = {b: 1 - torch.pow(torch.as_tensor(b, dtype=g.dtype), t) for b in (0.5, 0.9, 0.99, 0.999)}
    sqrt_g = state["G"].sqrt() + EPS_ADAGRAD
    sv999 = (state["v0999"] / bc[0.999]).sqrt() + EPS_ADAPTIVE
    d = torch.stack([
        g / sqrt_g,
        g / (state["v099"].sqrt() + EPS_ADAPTIVE),
        (state["m09"] / bc[0.9]) / sv999,
        state["m09"] / sqrt_g,
        (state["m05"] / bc[0.5]) / sv999,
        (state["m099"] / bc[0.99]) / sv999,
        g / sv999,
    ], dim=-1)
    r = (state["v099"] / bc[0.99]).sqrt() / sv999
    return d, r


def update_state(state: Mapping[str, Tensor], g: Tensor) -> dict[str, Tensor]:
    """Accumulators after gradient g (torch's conventions for AdaGrad's G and RMSprop's v)."""
    g2 = g * g
    return {
        "G": state["G"] + g2,
        "m05": 0.5 * state["m05"] + 0.5 * g,
        "m09": 0.9 * state["m09"] + 0.1 * g,
        "m099": 0.99 * state["m099"] + 0.01 * g,
        "v099": 0.99 * state["v099"] + 0.01 * g2,
        "v0999": 0.999 * state["v0999"] + 0.001 * g2,
    }


def policy_step(theta: Mapping[str, Tensor], state: Mapping[str, Tensor], g: Tensor, t: Tensor,
                arch: MLPLOptArch) -> tuple[Tensor, dict[str, Tensor]]:
    """One step for one parameter tensor, flattened: returns (Δx [n], new state); x ← x + Δx.

    ``g`` is the gradient [n], ``state`` the accumulators [n] each, ``t`` the 1-based step index
    (0-d tensor). Pure: usable under ``torch.func.vmap`` over θ, state, g and t.
    """
    new = update_state(state, g)
    d, r = directions(new, g, t)
    tau = time_features(t).to(g.dtype)
    c = theta["c"]
    gain = torch.exp(c[0] + (c[1:] * tau).sum())
    linear = d @ theta["u"]
    phi = torch.cat([d, r.unsqueeze(-1)], dim=-1)
    phi = phi * torch.rsqrt(phi.square().mean(dim=0) + 1e-12)
    W1 = theta["W1"]
    h = torch.relu(phi @ W1[:N_COORD_FEATURES] + (theta["b1"] + tau @ W1[N_COORD_FEATURES:]))
    out = h @ theta["W2"] + theta["b2"]
    mlp = out[..., 0] * torch.exp(out[..., 1].clamp(max=MAG_CLAMP))
    delta = -(arch.base_lr * gain * linear + arch.mlp_scale * mlp)
    return delta, new


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
    (e.g. :func:`init_theta`, the AdaGrad-equivalent θ₀). Each parameter tensor keeps its
    accumulators and step count in ``self.state`` (exact ``state_dict`` round trip); a parameter
    whose ``.grad`` is ``None`` is skipped. The loss is not used (any value, zero or negative, is
    fine). A NaN/inf gradient raises ``FloatingPointError`` before any parameter moves.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], checkpoint: str | os.PathLike | None = None,
                 *, theta: Mapping[str, Tensor] | None = None, arch: MLPLOptArch | None = None) -> None:
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
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MLPLOpt does not support sparse gradients")
                g = p.grad.reshape(-1)
                if not torch.isfinite(g).all():
                    raise FloatingPointError(
                        f"MLPLOpt: the gradient of parameter {pi} of param group {gi} (shape {tuple(p.shape)}) has NaN/inf entries")
                work.append((p, g))
        for p, g in work:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                for k, v in init_state(g).items():
                    state[k] = v
            t = torch.tensor(float(state["step"] + 1), dtype=p.dtype, device=p.device)
            old = {k: state[k].reshape(-1) for k in STATE_KEYS}
            delta, new = policy_step(self._theta_for(p), old, g.to(p.dtype), t, self.arch)
            for k in STATE_KEYS:
                state[k] = new[k].view_as(p)
            p.add_(delta.view_as(p))
            state["step"] += 1
        return loss


def _factory(params: list[Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    return MLPLOpt(params, checkpoint=hp.get("checkpoint"))


def _register() -> None:
    from l2o.baselines.registry import OptimizerEntry, register_optimizer

    register_optimizer(OptimizerEntry("mlp-lopt", "MLP LOpt", _factory, defaults={"checkpoint": "default"}, learned=True))


_register()
