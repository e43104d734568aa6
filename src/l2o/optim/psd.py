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
groups, so one step runs the LSTM once over all coordinates of all parameters: their Ψ rows are
concatenated into one [N, P] matrix, (h, c) live in one flat [N, H] buffer of which each
parameter's ``state["h"]``/``state["c"]`` are row views, and :class:`~l2o.policies.psd_lstm.FusedPolicy`
updates it in place over row chunks (:func:`l2o.policies.psd_lstm.step` is the reference it is
tested against). By default ω is the checkpoint ``l2o/optim/weights/psd.safetensors`` (meta-trained by
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
from l2o.policies.psd_lstm import NET_KEYS, FusedPolicy, input_size, load_policy

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "psd.safetensors"
"""The packaged meta-trained policy ω."""

CHUNK_ROWS = 1024
"""Coordinates per fused LSTM chunk: keeps the [rows, 4H] gate buffer in cache (measured on one CPU
thread: 1024 rows beat 512 and 2048, and 1–4k rows ran 2–3× faster than 32k-row chunks)."""


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

        # First pass: observations for every parameter, all checked before anything moves.
        work = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PredictedStepDescent does not support sparse gradients")
                g = p.grad.reshape(-1)
                state = self.state[p] if p in self.state else {}  # not created before every check passed
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
                work.append((p, (gi, pi), state, x, g, ft, obs, mem))
        if not work:
            return loss

        # All coordinates of one (dtype, device) in one [N, P] matrix; everything checked before any state changes.
        kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for k, item in enumerate(work):
            kinds.setdefault((item[0].dtype, item[0].device), []).append(k)
        batches = []
        for (dtype, device), ks in kinds.items():
            items = [work[k] for k in ks]
            grads = torch.cat([it[4] for it in items]) if len(items) > 1 else items[0][4]
            if not torch.isfinite(grads).all():
                bad = next(it for it in items if not torch.isfinite(it[4]).all())
                raise FloatingPointError(f"PredictedStepDescent: the gradient of {self._where(bad)} has NaN/inf entries")
            obs = torch.cat([it[6] for it in items]) if len(items) > 1 else items[0][6].contiguous()
            if not torch.isfinite(obs).all():
                bad = next(it for it in items if not torch.isfinite(it[6]).all())
                st = bad[2]
                raise FloatingPointError(
                    f"PredictedStepDescent: the observation Ψ of {self._where(bad)} is not finite "
                    f"(previous mini-batch loss {float(st['f_prev']) if 'f_prev' in st else None}, "
                    f"current {f_value})")
            batches.append((dtype, device, ks, items, obs))

        # One fused LSTM pass per (dtype, device) over row chunks; steps are views into one flat buffer.
        deltas: list[Tensor] = [torch.empty(0)] * len(work)
        for dtype, device, ks, items, obs in batches:
            h, c = self._hidden_for([it[0] for it in items], [self.state[it[0]] for it in items], dtype, device)
            delta = self._delta_buf(obs.shape[0], dtype, device)
            self._fused_for(dtype, device).step_(h, c, obs, delta, CHUNK_ROWS)
            sizes = [it[3].numel() for it in items]
            if not torch.isfinite(delta).all():
                bad = next(it for it, d in zip(items, delta.split(sizes)) if not torch.isfinite(d).all())
                raise FloatingPointError(f"PredictedStepDescent: the policy's step for {self._where(bad)} is not finite")
            for k, d in zip(ks, delta.split(sizes)):
                deltas[k] = d

        for (p, _, _, x, g, ft, obs, mem), delta in zip(work, deltas):
            state = self.state[p]
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the loaded state tensors are copies: the LSTM state is updated in place
        (row views into one flat buffer), which must not write into the source optimizer's state."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    st[k] = v.clone()

    @staticmethod
    def _where(item: tuple) -> str:
        gi, pi = item[1]
        return f"parameter {pi} of param group {gi} (shape {tuple(item[0].shape)})"

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
