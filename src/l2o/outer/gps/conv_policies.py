"""π's form in Convolutional GPS (:class:`~l2o.outer.gps.conv_trainer.ConvSetting`): the PSD LSTM
(Li & Malik 2017), or the small per-coordinate MLP of ``mlp-lopt`` (issue 12's GPS × MLP cell).

A :class:`ConvPolicy` holds π's tensors ω (``net``), says which of them the π-step trains, maps
the recorded observations of a batch of sequences [B, T, P] to μ^π [B, T] (differentiably, for the
regression), acts in rollouts (:meth:`ConvPolicy.controller`) and writes π as the checkpoint its
``torch.optim`` front end loads. The π-step loop itself is the setting's, written once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l2o.features.scale_free import ScaleFreeFeatures
from l2o.features.sets import FeatureSet, Memory
from l2o.learned import mlp_lopt, psd

from .conv_env import LSTMController
from .linear_gaussian import DTYPE


class ConvPolicy(ABC):
    """π of Convolutional GPS: ω = ``net`` (a ``{name: tensor}`` mapping), ``trained`` its keys the
    π-step fits, ``file_name`` the exported checkpoint, ``ready_at_init`` whether π₀ is already a
    real optimizer (so BADMM ties ψ to it from iteration 0) rather than a placeholder."""

    file_name: str
    method: str
    trained: tuple[str, ...]
    ready_at_init: bool = False
    net: dict[str, Tensor]

    @abstractmethod
    def predict(self, net: dict[str, Tensor], obs: Tensor) -> Tensor:
        """μ^π along sequences: ``obs`` [B, T, P] → [B, T] (differentiable in ``net``)."""

    def prepare(self, obs: Tensor, targets: Tensor) -> None:
        """Before the first π-step, on all its observations [N, P] and targets [N] (default: nothing)."""

    @abstractmethod
    def controller(self) -> Any:
        """A rollout controller acting with π's mean action (:mod:`l2o.outer.gps.conv_env`)."""

    @abstractmethod
    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Export π as its optimizer's checkpoint."""

    @abstractmethod
    def check(self, net: dict[str, Tensor]) -> None:
        """Validate tensors restored from a training checkpoint (raise ``ValueError``)."""

    @torch.no_grad()
    def means(self, obs: Tensor, chunk: int = 2048) -> Tensor:
        """μ^π on recorded sequences without grad: [N, T, P] → [N, T, 1] float64."""
        return torch.cat([self.predict(self.net, obs[i:i + chunk]) for i in range(0, obs.shape[0], chunk)]
                         ).to(DTYPE).unsqueeze(-1)


class PSDPolicy(ConvPolicy):
    """The PSD LSTM (:mod:`l2o.learned.psd`) on Ψ; its input normalisation and output scale are set
    from the first π-step's data and then frozen."""

    file_name = "psd.safetensors"
    method = "Predicted Step Descent (Li & Malik 2017)"
    trained = psd.TRAINED_KEYS

    def __init__(self, seed: int, features: FeatureSet) -> None:
        self.net = psd.init_net(seed, input_size=features.obs_dim)

    def predict(self, net: dict[str, Tensor], obs: Tensor) -> Tensor:
        return psd.run_sequence(net, obs.transpose(0, 1))[0].T

    def prepare(self, obs: Tensor, targets: Tensor) -> None:
        self.net["in_mean"] = obs.mean(0).to(self.net["in_mean"].dtype)
        self.net["in_std"] = obs.std(0).clamp(min=1e-8).to(self.net["in_std"].dtype)
        self.net["out_scale"] = targets.square().mean().sqrt().reshape(1).to(self.net["out_scale"].dtype)

    def controller(self) -> LSTMController:
        return LSTMController(self.net)

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        psd.save_policy(path, self.net, meta)

    def check(self, net: dict[str, Tensor]) -> None:
        psd.check_net(net)


class MLPLOptFeatures(FeatureSet):
    """s_t of :class:`~l2o.features.scale_free.ScaleFreeFeatures` (so ψ₀ can be AdaGrad exactly) and
    Ψ_t = ``mlp-lopt``'s inputs (:func:`l2o.learned.mlp_lopt.inputs`), whose features are normalised
    by their RMS over each parameter tensor: hence built for the tensors' ``sizes`` (flat, in order)."""

    name = "mlp-lopt"
    state_dim = ScaleFreeFeatures.state_dim
    obs_dim = mlp_lopt.N_INPUTS
    grad_feature = ScaleFreeFeatures.grad_feature
    state_names = ScaleFreeFeatures.state_names

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = [int(n) for n in sizes]
        self.scale_free = ScaleFreeFeatures()

    def init(self, n: int, horizon: int = 0, dtype: torch.dtype = torch.float32) -> Memory:
        if n != sum(self.sizes):
            raise ValueError(f"mlp-lopt features were built for {sum(self.sizes)} coordinates, got {n}")
        mem = self.scale_free.init(n, horizon, dtype)
        mem.update({f"lopt.{k}": v for k, v in mlp_lopt.init_state(torch.zeros(n, dtype=dtype)).items()})
        return mem

    def step(self, mem: Memory, t: int, x: Tensor, g: Tensor, f: Tensor,
             need_state: bool = True) -> tuple[Tensor | None, Tensor, Memory]:
        S, _, new = self.scale_free.step({k: v for k, v in mem.items() if not k.startswith("lopt.")}, t, x, g, f,
                                         need_state)
        acc = mlp_lopt.update_state({k[5:]: v for k, v in mem.items() if k.startswith("lopt.")}, g)
        obs = mlp_lopt.inputs(acc, g, torch.tensor(float(t + 1), dtype=g.dtype), self.sizes)
        return S, obs, {**new, **{f"lopt.{k}": v for k, v in acc.items()}}


class MLPController:
    """π = ``mlp-lopt`` with parameters θ on its recorded inputs, for every coordinate."""

    needs_states = False

    def __init__(self, theta: dict[str, Tensor], arch: mlp_lopt.MLPLOptArch) -> None:
        self.theta, self.arch = {k: v.detach() for k, v in theta.items()}, arch

    def reset(self, n: int) -> None:
        pass

    @torch.no_grad()
    def act(self, t: int, states: Tensor | None, observations: Tensor, generator: torch.Generator) -> Tensor:
        return mlp_lopt.policy_from_inputs(self.theta, observations.to(self.theta["u"].dtype), self.arch)


class MLPPolicy(ConvPolicy):
    """``mlp-lopt``'s policy: θ₀ = :func:`l2o.learned.mlp_lopt.init_theta` (exactly AdaGrad at lr α₀),
    every tensor of θ trained; exported as an ``mlp-lopt`` checkpoint."""

    file_name = "mlp-lopt.safetensors"
    method = "mlp-lopt (per-coordinate MLP learned optimizer)"
    trained = mlp_lopt.THETA_KEYS
    ready_at_init = True

    def __init__(self, seed: int, hidden: int) -> None:
        self.arch = mlp_lopt.MLPLOptArch(hidden=hidden)
        self.net = mlp_lopt.init_theta(self.arch, seed)

    def predict(self, net: dict[str, Tensor], obs: Tensor) -> Tensor:
        return mlp_lopt.policy_from_inputs(net, obs, self.arch)

    def controller(self) -> MLPController:
        return MLPController(self.net, self.arch)

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        mlp_lopt.save_policy(path, self.net, self.arch, meta)

    def check(self, net: dict[str, Tensor]) -> None:
        shapes = self.arch.shapes()
        if set(net) != set(shapes):
            raise ValueError(f"mlp-lopt θ has tensors {sorted(net)}, expected {sorted(shapes)}")
        for k, shape in shapes.items():
            if tuple(net[k].shape) != shape or not bool(torch.isfinite(net[k]).all()):
                raise ValueError(f"mlp-lopt θ[{k!r}] must be finite with shape {shape}, got {tuple(net[k].shape)}")


def conv_policy(kind: str, seed: int, features: FeatureSet, hidden: int) -> ConvPolicy:
    """π of the kind named in the config (``"psd"`` or ``"mlp-lopt"``)."""
    if kind == "psd":
        return PSDPolicy(seed, features)
    if not isinstance(features, MLPLOptFeatures):
        raise ValueError(f"policy 'mlp-lopt' reads the 'mlp-lopt' feature set, not {features.name!r}")
    return MLPPolicy(seed, hidden)
