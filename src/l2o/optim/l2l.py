"""L2LBGDBGD as a ``torch.optim.Optimizer``: the meta-trained coordinate-wise LSTM of
Andrychowicz et al. (2016) applied to any parameters.

Each parameter tensor keeps its own LSTM state (h¹, c¹, h², c²) in ``self.state`` (one row per
coordinate), so ``state_dict()``/``load_state_dict()`` round-trip exactly. One step runs the LSTM
once over all coordinates of all parameters (:class:`~l2o.policies.l2l_lstm.FusedL2L` on the
concatenated gradients; the state lives in two alternating flat buffers of which ``self.state``
holds row views); :func:`l2o.policies.l2l_lstm.step` is the reference it is tested against. The weights φ are
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
from l2o.policies.l2l_lstm import NET_KEYS, FusedL2L, Hidden

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "l2lbgdbgd.safetensors"
"""The packaged meta-trained weights."""

_HIDDEN_KEYS = ("h1", "c1", "h2", "c2")
CHUNK_ROWS = 4096
"""Coordinates per fused LSTM chunk (H = 20: small gate buffers, so larger chunks than PSD's)."""


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
        self._fused: dict[tuple[torch.dtype, torch.device], FusedL2L] = {}
        self._flat: dict[tuple[torch.dtype, torch.device], list[Any]] = {}
        super().__init__(params, {})

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
        # All coordinates of one (dtype, device) in one flat batch; every step is computed and checked
        # before any parameter or state changes (the new LSTM state goes to the other of two buffers).
        work: dict[tuple[torch.dtype, torch.device], list[tuple[Tensor, str]]] = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("L2LBGDBGD does not support sparse gradients")
                work.setdefault((p.dtype, p.device), []).append(
                    (p, f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"))
        done = []
        for (dtype, device), items in work.items():
            grads = [p.grad.reshape(-1) for p, _ in items]
            flat = torch.cat(grads) if len(grads) > 1 else grads[0].contiguous()
            if not torch.isfinite(flat).all():
                bad = next(w for (_, w), g in zip(items, grads) if not torch.isfinite(g).all())
                raise FloatingPointError(f"L2LBGDBGD: the gradient of {bad} has NaN/inf entries")
            params = [p for p, _ in items]
            old, new, update = self._buffers_for(params, dtype, device)
            self._fused_for(dtype, device).step_(old, new, flat, update, CHUNK_ROWS)
            sizes = [p.numel() for p in params]
            if not torch.isfinite(update).all():
                bad = next(w for (_, w), u in zip(items, update.split(sizes)) if not torch.isfinite(u).all())
                raise FloatingPointError(f"L2LBGDBGD: the step for {bad} is not finite")
            done.append((dtype, device, params, sizes, new, update))
        for dtype, device, params, sizes, new, update in done:
            torch._foreach_add_(params, [u.view_as(p) for p, u in zip(params, update.split(sizes))])
            off = 0
            for p, n in zip(params, sizes):
                state = self.state[p]
                for k, t in zip(_HIDDEN_KEYS, new):
                    state[k] = t[off:off + n]
                state["step"] = state.get("step", 0) + 1
                off += n
            self._flat[(dtype, device)][3] ^= 1  # the state now lives in the other buffer
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the loaded state tensors are copies (the state lives in buffers this
        optimizer writes into, which must not be the source optimizer's)."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    st[k] = v.clone()

    def _fused_for(self, dtype: torch.dtype, device: torch.device) -> FusedL2L:
        key = (dtype, device)
        if key not in self._fused:
            self._fused[key] = FusedL2L(self._net, dtype, device, self.p, self.output_scale)
        return self._fused[key]

    def _buffers_for(self, params: list[Tensor], dtype: torch.dtype, device: torch.device
                     ) -> tuple[Hidden, Hidden, Tensor]:
        """(current state, where the new state goes, step buffer) over the concatenated coordinates
        of ``params``. Two flat state buffers alternate; each parameter's ``state[h1...c2]`` are row
        views into the current one, checked in O(#tensors); copied in afresh when they are not (first
        step, another set of parameters with gradients, after ``load_state_dict``)."""
        key, sizes, H = (dtype, device), [p.numel() for p in params], self.hidden_size
        entry = self._flat.get(key)
        if entry is not None and entry[2] == sizes:
            cur = entry[entry[3]]
            off, ok = 0, True
            for p, n in zip(params, sizes):
                st = self.state.get(p, {})
                if any(k not in st or st[k].data_ptr() != t[off:].data_ptr() or st[k].shape != (n, H)
                       for k, t in zip(_HIDDEN_KEYS, cur)):
                    ok = False
                    break
                off += n
            if ok:
                return cur, entry[1 - entry[3]], entry[4]
        N = sum(sizes)
        cur = Hidden(*(torch.zeros(N, H, dtype=dtype, device=device) for _ in range(4)))
        off = 0
        for p, n in zip(params, sizes):
            st = self.state.get(p, {})
            if all(k in st for k in _HIDDEN_KEYS):
                for k, t in zip(_HIDDEN_KEYS, cur):
                    t[off:off + n].copy_(st[k].reshape(n, H))
            off += n
        nxt = Hidden(*(torch.empty(N, H, dtype=dtype, device=device) for _ in range(4)))
        self._flat[key] = [cur, nxt, sizes, 0, torch.empty(N, dtype=dtype, device=device)]
        return cur, nxt, self._flat[key][4]


def _factory(params: list[Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    return L2LBGDBGD(params, checkpoint=hp.get("checkpoint"))


register_optimizer(OptimizerEntry("l2lbgdbgd", "L2LBGDBGD", _factory, defaults={"checkpoint": "default"}, learned=True))
