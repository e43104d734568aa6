"""Predicted Step Descent (Li & Malik 2017, §4) as a ``torch.optim.Optimizer``.

At iteration t the closure evaluates the mini-batch objective f̂⁽ᵗ⁾ and its gradient ∇f̂⁽ᵗ⁾ at the
current iterate x⁽ᵗ⁾; PSD builds the observation Ψ_t (:func:`l2o.features.conv2017.observation_step`,
from f̂⁽ᵗ⁾, f̂⁽ᵗ⁻¹⁾, ∇f̂⁽ᵗ⁾, ∇f̂⁽ᵗ⁻¹⁾, x⁽ᵗ⁾, x⁽ᵗ⁻¹⁾, x⁽ᵗ⁻²⁾), runs the LSTM π one step per coordinate
(:func:`l2o.policies.psd_lstm.step`) and moves by its mean action: x⁽ᵗ⁺¹⁾ = x⁽ᵗ⁾ + μ^π(Ψ_t).
This is exactly ``run_sequence(ω, observation_features(xs, gs, fs))`` computed online.

Each parameter tensor is one coordinate group (any shape: matrices, biases, conv kernels) and
keeps its own state in ``self.state`` — LSTM (h, c) with one row per coordinate, the previous
gradient, the previous two iterates, the previous loss and the step count — so
``state_dict()``/``load_state_dict()`` round-trip exactly. ω is shared by all coordinates of all
groups. By default ω is the checkpoint ``l2o/optim/weights/psd.safetensors`` (meta-trained by
Guided Policy Search; see the JSON beside it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l2o.baselines.registry import OptimizerEntry, register_optimizer
from l2o.checkpoint import CheckpointError
from l2o.features.conv2017 import observation_step
from l2o.features.sets import FeatureSet, get_feature_set
from l2o.policies.psd_lstm import NET_KEYS, Hidden, init_hidden, input_size, load_policy, step

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "psd.safetensors"
"""The packaged meta-trained policy ω."""

CHUNK_ROWS = 1024
"""Coordinates per LSTM call on large parameters: keeps the [rows, 4H] gate temporaries in cache
(measured on one CPU thread: chunks of 1–4k rows ran 2–3× faster than 32k-row chunks)."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The policy checkpoint file does not exist (a ``CheckpointError`` and a ``FileNotFoundError``)."""


class PredictedStepDescent(torch.optim.Optimizer):
    """x ← x + μ^π(Ψ_t) with the per-coordinate LSTM π of :mod:`l2o.policies.psd_lstm`.

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
        self._net = {k: net[k] for k in NET_KEYS}
        self._net_cache: dict[tuple[torch.dtype, torch.device], dict[str, Tensor]] = {}
        super().__init__(params, {})

    def _net_for(self, like: Tensor) -> dict[str, Tensor]:
        key = (like.dtype, like.device)
        if key not in self._net_cache:
            self._net_cache[key] = {k: v.to(dtype=like.dtype, device=like.device) for k, v in self._net.items()}
        return self._net_cache[key]

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

        # First pass: observations for every parameter, all checked before anything moves.
        work = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PredictedStepDescent does not support sparse gradients")
                where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
                g = p.grad.reshape(-1)
                if not torch.isfinite(g).all():
                    raise FloatingPointError(f"PredictedStepDescent: the gradient of {where} has NaN/inf entries")
                state = self.state[p]
                x = p.detach().reshape(-1)
                ft = f.to(dtype=p.dtype, device=p.device).reshape(())
                mem = None
                if self.features is None:  # the paper's Ψ (3 features)
                    obs = observation_step(ft, state.get("f_prev"), g, state.get("g_prev"),
                                           x, state.get("x_prev"), state.get("x_prev2"))
                else:  # a named feature set, its O(n) memory kept as state["feat.*"] tensors
                    old = {k[5:]: v for k, v in state.items() if k.startswith("feat.")} or \
                        self.features.init(x.numel(), 0, p.dtype)
                    _, obs, mem = self.features.step(old, int(state.get("step", 0)), x, g, ft, need_state=False)
                if not torch.isfinite(obs).all():
                    raise FloatingPointError(
                        f"PredictedStepDescent: the observation Ψ of {where} is not finite "
                        f"(previous mini-batch loss {float(state['f_prev']) if 'f_prev' in state else None}, "
                        f"current {f_value})")
                work.append((p, where, state, x, g, ft, obs, mem))

        for p, where, state, x, g, ft, obs, mem in work:
            if "step" not in state:
                state["step"] = 0
                state["h"], state["c"] = init_hidden(x.numel(), self.hidden_size, p.dtype, p.device)
            delta = self._policy_step(self._net_for(p), state, obs)
            if not torch.isfinite(delta).all():
                raise FloatingPointError(f"PredictedStepDescent: the policy's step for {where} is not finite")
            if mem is not None:
                state.update({f"feat.{k}": v for k, v in mem.items()})
            else:
                if "x_prev" in state:
                    state["x_prev2"] = state["x_prev"]
                state["x_prev"] = x.clone()
                state["g_prev"] = g.clone()
                state["f_prev"] = ft.clone()
            p.add_(delta.view_as(p))
            state["step"] += 1
        return loss

    @staticmethod
    def _policy_step(net: dict[str, Tensor], state: dict[str, Any], obs: Tensor) -> Tensor:
        """μ^π(Ψ_t) for one parameter, updating its (h, c) in place, CHUNK_ROWS coordinates at a time."""
        h, c = state["h"], state["c"]
        n = obs.shape[0]
        if n <= CHUNK_ROWS:
            delta, new = step(net, Hidden(h, c), obs)
            state["h"], state["c"] = new
            return delta
        delta = torch.empty(n, dtype=obs.dtype, device=obs.device)
        for s in range(0, n, CHUNK_ROWS):
            e = min(s + CHUNK_ROWS, n)
            d, new = step(net, Hidden(h[s:e], c[s:e]), obs[s:e])
            delta[s:e] = d
            h[s:e] = new.h
            c[s:e] = new.c
        return delta


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


def _factory(params: list[Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    return PredictedStepDescent(params, checkpoint=hp.get("checkpoint"))


register_optimizer(OptimizerEntry("psd", "PSD", _factory, defaults={"checkpoint": "default"}, learned=True))
