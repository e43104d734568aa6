"""The learned optimizer of Learning to Optimize (Li & Malik 2016) as a ``torch.optim.Optimizer``.

Each ``step(closure)`` evaluates the objective and its gradient once, appends (x⁽ᵗ⁾, ∇f, f) to the
history features (:class:`~l2o.features.history2016.HistoryTracker`), and moves by π's mean step
Δx = μ^π(o_t) (deterministic at test time). The policy is tied to the number of coordinates it was
trained on (the 2016 method is not coordinate-wise), so the parameters must have that many
coordinates in total.

Registered with the benchmark harness as ``lto2016:checkpoint=PATH`` (a ``policy.safetensors``
written by ``l2o meta-train gps2016``) or ``lto2016:family=NAME`` for the policy meta-trained here
on that 2016 family and shipped in the package (``l2o/learned/weights/lto2016-NAME.safetensors``,
written by ``scripts/lto2016.sh NAME``). There is no default: a policy fits one family's dimension.

π of Learning to Optimize (Li & Malik 2016): an MLP with one hidden layer of 50 softplus units
mapping the history features o_t to the mean step μ^π(o_t) = Δx.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from l2o.baselines.registry import OptimizerEntry, register_optimizer
from l2o.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from l2o.features.history2016 import HistoryTracker, feature_dim

class MLPPolicy2016(nn.Module):
    """μ^π(o) = W₂ softplus(W₁ o + b₁) + b₂ (float64, like the GPS core)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 50, seed: int = 0) -> None:
        super().__init__()
        if obs_dim < 1 or action_dim < 1 or hidden < 1:
            raise ValueError("obs_dim, action_dim and hidden must be positive")
        g = torch.Generator().manual_seed(seed)
        self.obs_dim, self.action_dim, self.hidden = obs_dim, action_dim, hidden
        self.fc1 = nn.Linear(obs_dim, hidden, dtype=torch.float64)
        self.fc2 = nn.Linear(hidden, action_dim, dtype=torch.float64)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                bound = layer.in_features ** -0.5
                layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=g))
                layer.bias.zero_()
            self.fc2.weight.mul_(0.01)  # start near the zero step; GPS supervision sets the scale

    def forward(self, obs: Tensor) -> Tensor:
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"observation must have {self.obs_dim} features, got {obs.shape[-1]}")
        return self.fc2(nn.functional.softplus(self.fc1(obs.to(torch.float64))))


CHECKPOINT_KIND = "lto2016-policy"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def packaged_policy(family: str) -> Path:
    """The shipped policy for a 2016 family; a clear error naming the ones that exist."""
    path = WEIGHTS_DIR / f"lto2016-{family}.safetensors"
    if not path.exists():
        have = sorted(p.stem.removeprefix("lto2016-") for p in WEIGHTS_DIR.glob("lto2016-*.safetensors"))
        raise ValueError(f"no packaged 2016 policy for family {family!r}; packaged: {have or 'none'}")
    return path


def save_policy(path: str | os.PathLike, policy: MLPPolicy2016, history: int, meta: dict[str, Any]) -> Path:
    """Save a trained 2016 policy with what is needed to rebuild it (and its provenance)."""
    return save_checkpoint(path, dict(policy.state_dict()), {
        "obs_dim": policy.obs_dim, "action_dim": policy.action_dim, "hidden": policy.hidden,
        "history": history, **meta}, CHECKPOINT_KIND)


_META_INTS = ("obs_dim", "action_dim", "hidden", "history")
MAX_DIM = 10_000_000
"""Largest dimension a checkpoint's metadata may declare (the policy is built before its weights load)."""


def load_policy(path: str | os.PathLike) -> tuple[MLPPolicy2016, int, dict[str, Any]]:
    """(policy, history H, metadata) from a checkpoint written by :func:`save_policy`.

    Metadata fields and weights are validated (positive integer dimensions consistent with the
    history features, weights of the declared shapes and finite); any problem is a
    :class:`CheckpointError` naming the file and the field."""
    tensors, meta = load_checkpoint(path, CHECKPOINT_KIND)
    missing = [k for k in _META_INTS if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path}: metadata lacks {', '.join(missing)}")
    for k in _META_INTS:
        v = meta[k]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_DIM:
            raise CheckpointError(f"checkpoint {path}: metadata {k} must be an integer in [1, {MAX_DIM}], got {v!r}")
    if feature_dim(meta["action_dim"], meta["history"]) != meta["obs_dim"]:
        raise CheckpointError(f"checkpoint {path}: metadata obs_dim {meta['obs_dim']} does not match action_dim "
                              f"{meta['action_dim']} and history {meta['history']}")
    shapes = {"fc1.weight": (meta["hidden"], meta["obs_dim"]), "fc1.bias": (meta["hidden"],),
              "fc2.weight": (meta["action_dim"], meta["hidden"]), "fc2.bias": (meta["action_dim"],)}
    if set(tensors) != set(shapes):
        raise CheckpointError(f"checkpoint {path}: weights {sorted(tensors)}, expected {sorted(shapes)}")
    for k, shape in shapes.items():
        if tuple(tensors[k].shape) != shape:
            raise CheckpointError(f"checkpoint {path}: weight {k} has shape {tuple(tensors[k].shape)}, expected {shape}")
        if not torch.isfinite(tensors[k]).all():
            raise CheckpointError(f"checkpoint {path}: weight {k} has non-finite (NaN/inf) entries")
    policy = MLPPolicy2016(meta["obs_dim"], meta["action_dim"], meta["hidden"])
    policy.load_state_dict({k: v.clone() for k, v in tensors.items()})
    return policy, int(meta["history"]), meta


class LearnedOptimizer2016(torch.optim.Optimizer):
    """Steps by a trained 2016 policy π (see the module docstring).

    Any finite objective value is legitimate (0 and negative included: the features use only
    differences of values). A NaN/inf objective, gradient or step raises ``FloatingPointError``
    before any parameter or history changes."""

    def __init__(self, params: Iterable[Tensor], checkpoint: str | os.PathLike) -> None:
        super().__init__(params, {})
        self.policy, self.H, self.meta = load_policy(checkpoint)
        self.policy.requires_grad_(False)
        self._params = [p for g in self.param_groups for p in g["params"]]
        n = sum(p.numel() for p in self._params)
        if n != self.policy.action_dim or feature_dim(n, self.H) != self.policy.obs_dim:
            raise ValueError(f"this policy was trained for {self.policy.action_dim} coordinates; the parameters have {n}")
        self.tracker = HistoryTracker(n, self.H)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise ValueError("LearnedOptimizer2016.step needs a closure: its state includes objective values")
        with torch.enable_grad():
            loss = closure()
        f = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        if not math.isfinite(f):
            raise FloatingPointError(f"LearnedOptimizer2016: the objective is {f}")
        x = torch.cat([p.detach().reshape(-1) for p in self._params]).to(torch.float64)
        g = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in self._params]).to(torch.float64)
        if not torch.isfinite(g).all():
            raise FloatingPointError("LearnedOptimizer2016: the gradient has NaN/inf entries")
        saved = {k: v.clone() for k, v in self.tracker.state_dict().items()}
        obs = self.tracker.update(x, g, f)
        dx = self.policy(obs.unsqueeze(0))[0]
        if not torch.isfinite(dx).all():
            self.tracker.load_state_dict(saved)  # as if this step had not been taken
            raise FloatingPointError("LearnedOptimizer2016: the policy's step is not finite")
        i = 0
        for p in self._params:
            p.add_(dx[i:i + p.numel()].view_as(p).to(p.dtype))
            i += p.numel()
        return loss

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d["history"] = {k: v.clone() for k, v in self.tracker.state_dict().items()}
        return d

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        hist = state_dict.pop("history")
        super().load_state_dict(state_dict)
        self.tracker.load_state_dict(hist)


def _factory(params: list[Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    given = {k: str(hp[k]) for k in ("checkpoint", "family") if hp.get(k) not in (None, "", "none")}
    if len(given) != 1:
        raise ValueError("lto2016 needs exactly one trained policy: lto2016:checkpoint=PATH (the policy.safetensors "
                         "written by `l2o meta-train gps2016`) or lto2016:family=NAME (a packaged one)"
                         + (f"; got both {sorted(given)}" if given else ""))
    path = packaged_policy(given["family"]) if "family" in given else given["checkpoint"]
    return LearnedOptimizer2016(params, checkpoint=path)


register_optimizer(OptimizerEntry("lto2016", "LTO (2016, GPS)", _factory, defaults={"checkpoint": "none", "family": "none"},
                                  learned=True))
