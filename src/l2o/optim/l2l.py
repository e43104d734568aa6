"""L2LBGDBGD as a ``torch.optim.Optimizer``: the meta-trained coordinate-wise LSTM of
Andrychowicz et al. (2016) applied to any parameters.

Each parameter tensor keeps its own LSTM state (h¹, c¹, h², c²) in ``self.state`` (one row per
coordinate), so ``state_dict()``/``load_state_dict()`` round-trip exactly. The weights φ are
fixed; by default they are the checkpoint shipped in ``l2o/optim/weights/l2lbgdbgd.safetensors``
(meta-trained with ``configs/l2l.toml``; see the JSON beside it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l2o.baselines.registry import OptimizerEntry, register_optimizer
from l2o.policies.l2l_lstm import NET_KEYS, Hidden, init_hidden, step

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "l2lbgdbgd.safetensors"
"""The packaged meta-trained weights."""

_HIDDEN_KEYS = ("h1", "c1", "h2", "c2")


class L2LBGDBGD(torch.optim.Optimizer):
    """θ ← θ + g, [g, h] = m(∇f(θ), h; φ) with the LSTM m of :mod:`l2o.policies.l2l_lstm`.

    ``checkpoint``: a policy (or meta-training) checkpoint path; ``None`` or ``"default"`` loads the
    packaged weights. Parameters of any shape and several param groups are allowed; a parameter
    whose ``.grad`` is ``None`` is skipped (its state is left as is).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], checkpoint: str | os.PathLike | None = None) -> None:
        from l2o.experiments.meta_l2l import load_policy

        path = DEFAULT_CHECKPOINT if checkpoint in (None, "default") else Path(checkpoint)
        net, meta = load_policy(path)
        self.checkpoint = str(path)
        self.policy_meta = meta
        self.hidden_size = int(meta["hidden_size"])
        self.p = float(meta["preprocess_p"])
        self.output_scale = float(meta["output_scale"])
        self._net = {k: net[k] for k in NET_KEYS}
        self._net_cache: dict[tuple[torch.dtype, torch.device], dict[str, Tensor]] = {}
        super().__init__(params, {})

    def _net_for(self, like: Tensor) -> dict[str, Tensor]:
        key = (like.dtype, like.device)
        if key not in self._net_cache:
            self._net_cache[key] = {k: v.to(dtype=like.dtype, device=like.device) for k, v in self._net.items()}
        return self._net_cache[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One LSTM step for every parameter with a gradient; ``closure`` (optional) recomputes the
        loss and fills ``.grad`` (torch convention) and its value is returned.

        The loss's value is not used (any finite value, 0 or negative included, is fine). A NaN/inf
        loss, gradient or step raises ``FloatingPointError`` before any parameter or state changes.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if loss is not None:
                f = loss.detach() if isinstance(loss, Tensor) else torch.as_tensor(float(loss))
                if not torch.isfinite(f).all():
                    raise FloatingPointError(f"L2LBGDBGD: the loss is {f.tolist()}")
        # Every step is computed and checked before anything moves.
        work = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("L2LBGDBGD does not support sparse gradients")
                where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
                if not torch.isfinite(p.grad).all():
                    raise FloatingPointError(f"L2LBGDBGD: the gradient of {where} has NaN/inf entries")
                state = self.state[p]
                hidden = (Hidden(*(state[k] for k in _HIDDEN_KEYS)) if state else
                          Hidden(*init_hidden(p.numel(), self.hidden_size, p.dtype, p.device)))
                update, hidden = step(self._net_for(p), hidden, p.grad, p=self.p, output_scale=self.output_scale)
                if not torch.isfinite(update).all():
                    raise FloatingPointError(f"L2LBGDBGD: the step for {where} is not finite")
                work.append((p, state, update, hidden))
        for p, state, update, hidden in work:
            p.add_(update)
            for k, t in zip(_HIDDEN_KEYS, hidden):
                state[k] = t
            state["step"] = state.get("step", 0) + 1
        return loss


def _factory(params: list[Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    return L2LBGDBGD(params, checkpoint=hp.get("checkpoint"))


register_optimizer(OptimizerEntry("l2lbgdbgd", "L2LBGDBGD", _factory, defaults={"checkpoint": "default"}, learned=True))
