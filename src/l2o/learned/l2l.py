"""L2LBGDBGD as a ``torch.optim.Optimizer``: the meta-trained coordinate-wise LSTM of
Andrychowicz et al. (2016) applied to any parameters.

Each parameter tensor keeps its own LSTM state (h¹, c¹, h², c²) in ``self.state`` (one row per
coordinate), so ``state_dict()``/``load_state_dict()`` round-trip exactly. One step runs the LSTM
once over all coordinates of all parameters (:class:`~l2o.learned.l2l.FusedL2L` on the
concatenated gradients; the state lives in two alternating flat buffers of which ``self.state``
holds row views); :func:`l2o.learned.l2l.step` is the reference it is tested against. The weights φ are
fixed; by default they are the checkpoint shipped in ``l2o/learned/weights/l2lbgdbgd.safetensors``
(meta-trained with ``configs/l2l.toml``; see the JSON beside it).

The coordinate-wise LSTM optimizer m of Andrychowicz et al. (2016), as a pure function.

"Learning to learn by gradient descent by gradient descent" (L2LBGDBGD in Li & Malik 2017): every
coordinate i of the optimizee θ is one batch row of a two-layer LSTM with 20 cells per layer whose
weights φ are shared by all coordinates. At step t the input is the preprocessed gradient
ρ(∇_i f(θ_t)) (paper §3.2 / appendix A, p = 10), the output is the step g_t,i and

    θ_{t+1} = θ_t + g_t,        [g_t, h_{t+1}] = m(∇_t, h_t; φ),

with g_t = ``output_scale`` · (W_out h² + b_out) (Andrychowicz et al. scale the output by 0.1).
:func:`step` takes φ as a ``{name: tensor}`` mapping so meta-training can differentiate through
it; nothing here holds state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from l2o.baselines.registry import OptimizerEntry, register_optimizer
from l2o.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_text_atomic
from l2o.learned.base import params_with_grad

HIDDEN_SIZE = 20
"""Cells per LSTM layer (Andrychowicz et al. 2016: two layers of 20)."""
PREPROCESS_P = 10.0
"""p of the gradient preprocessing."""
OUTPUT_SCALE = 0.1
"""Scale of the linear output layer's step."""

NET_KEYS = ("W_ih1", "W_hh1", "b1", "W_ih2", "W_hh2", "b2", "W_out", "b_out")
"""Names of the tensors of φ (LSTM layer 1, LSTM layer 2, linear output)."""


class Hidden(NamedTuple):
    """LSTM state (h¹, c¹, h², c²), each [N, H] for N coordinates."""

    h1: Tensor
    c1: Tensor
    h2: Tensor
    c2: Tensor

    def detach(self) -> Hidden:
        return Hidden(*(t.detach() for t in self))


def preprocess_gradient(grad: Tensor, p: float = PREPROCESS_P) -> Tensor:
    """ρ(g) = (log|g|/p, sign g) if |g| ≥ e^{−p}, else (−1, e^p g); shape ``grad.shape + (2,)``.

    Puts gradients of very different magnitudes on a common scale while keeping their sign; the
    two branches agree at |g| = e^{−p} (both give (−1, sign g)), so ρ is continuous. Written with
    a clamped log so that it is differentiable everywhere (second-order meta-gradients), zeros
    included (ρ(0) = (−1, 0)).
    """
    threshold = math.exp(-p)
    mag = grad.abs()
    big = mag >= threshold
    log_part = torch.log(torch.clamp(mag, min=threshold)) / p
    first = torch.where(big, log_part, torch.full_like(grad, -1.0))
    second = torch.where(big, torch.sign(grad), grad * math.exp(p))
    return torch.stack((first, second), dim=-1)


def init_net(seed: int = 0, hidden_size: int = HIDDEN_SIZE, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A seeded φ: LSTM weights U(−1/√H, 1/√H) (PyTorch's LSTM default), forget-gate biases +1,
    output layer U(−1/√H, 1/√H) with zero bias."""
    g = torch.Generator().manual_seed(seed)
    k = 1.0 / math.sqrt(hidden_size)
    H4 = 4 * hidden_size

    def u(*shape: int) -> Tensor:
        return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * k

    net = {
        "W_ih1": u(H4, 2), "W_hh1": u(H4, hidden_size), "b1": u(H4),
        "W_ih2": u(H4, hidden_size), "W_hh2": u(H4, hidden_size), "b2": u(H4),
        "W_out": u(1, hidden_size), "b_out": torch.zeros(1, dtype=torch.float64),
    }
    for b in ("b1", "b2"):  # gate order i, f, g, o: a forget bias of 1 keeps early memory
        net[b][hidden_size : 2 * hidden_size] += 1.0
    return {name: t.to(dtype) for name, t in net.items()}


def check_net(net: Mapping[str, Tensor]) -> int:
    """Validate φ's names, shapes and values (all finite); return the hidden size H."""
    missing = set(NET_KEYS) - set(net)
    extra = set(net) - set(NET_KEYS)
    if missing or extra:
        raise ValueError(f"LSTM optimizer weights: missing {sorted(missing)}, unexpected {sorted(extra)}")
    H = net["W_hh1"].shape[-1]
    expected = {"W_ih1": (4 * H, 2), "W_hh1": (4 * H, H), "b1": (4 * H,), "W_ih2": (4 * H, H),
                "W_hh2": (4 * H, H), "b2": (4 * H,), "W_out": (1, H), "b_out": (1,)}
    for name, shape in expected.items():
        if tuple(net[name].shape) != shape:
            raise ValueError(f"LSTM optimizer weight {name!r} has shape {tuple(net[name].shape)}, expected {shape}")
        if not torch.isfinite(net[name]).all():
            raise ValueError(f"LSTM optimizer weight {name!r} has non-finite (NaN/inf) entries")
    return H


def init_hidden(n: int, hidden_size: int = HIDDEN_SIZE, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Hidden:
    """Zero LSTM state for ``n`` coordinates."""
    return Hidden(*(torch.zeros(n, hidden_size, dtype=dtype, device=device) for _ in range(4)))


def _lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    gates = torch.addmm(b, x, w_ih.T) + h @ w_hh.T
    i, f, gg, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
    return torch.sigmoid(o) * torch.tanh(c), c


def step(net: Mapping[str, Tensor], hidden: Hidden, grad: Tensor, *, p: float = PREPROCESS_P,
         output_scale: float = OUTPUT_SCALE) -> tuple[Tensor, Hidden]:
    """One application of m: ``(g_t, h_{t+1}) = m(∇_t, h_t; φ)`` for a gradient of any shape.

    ``grad`` has N = ``grad.numel()`` coordinates, each a row of the LSTM batch; ``hidden`` is
    its [N, H] state. Returns the step (same shape as ``grad``, to be *added* to θ) and the new
    state. Pure: differentiable w.r.t. ``net``, ``hidden`` and ``grad``.
    """
    x = preprocess_gradient(grad.reshape(-1), p)
    h1, c1 = _lstm_cell(x, hidden.h1, hidden.c1, net["W_ih1"], net["W_hh1"], net["b1"])
    h2, c2 = _lstm_cell(h1, hidden.h2, hidden.c2, net["W_ih2"], net["W_hh2"], net["b2"])
    out = torch.addmm(net["b_out"], h2, net["W_out"].T).squeeze(-1)
    return (output_scale * out).reshape(grad.shape), Hidden(h1, c1, h2, c2)


class FusedL2L:
    """φ prepared for the inference step over row chunks: per layer one ``addmm`` of [x, h] against
    the stacked [W_ih; W_hh]ᵀ, one sigmoid for all four gates, tanh as 2σ(2z) − 1 (the cell-input
    gate's weights stored doubled, exact in floating point). Reads the old state and writes the new
    one into separate tensors. Same result as :func:`step` up to float rounding."""

    def __init__(self, net: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device | str,
                 p: float = PREPROCESS_P, output_scale: float = OUTPUT_SCALE) -> None:
        def stacked(w_ih: str, w_hh: str, b: str) -> tuple[Tensor, Tensor]:
            w = torch.cat([net[w_ih], net[w_hh]], dim=1).detach().to(dtype=dtype, device=device).T.contiguous()
            bias = net[b].detach().to(dtype=dtype, device=device).clone()
            w[:, 2 * H : 3 * H] *= 2
            bias[2 * H : 3 * H] *= 2
            return w, bias

        H = self.H = int(net["W_hh1"].shape[-1])
        self.w1, self.b1 = stacked("W_ih1", "W_hh1", "b1")
        self.w2, self.b2 = stacked("W_ih2", "W_hh2", "b2")
        self.w_out = net["W_out"].detach().to(dtype=dtype, device=device).T.contiguous()
        self.b_out = net["b_out"].detach().to(dtype=dtype, device=device)
        self.p, self.output_scale, self.dtype, self.device = p, output_scale, dtype, device
        self._bufs: tuple[Tensor, ...] | None = None

    def _buffers(self, rows: int) -> tuple[Tensor, ...]:
        if self._bufs is None or self._bufs[0].shape[0] < rows:
            kw, H = {"dtype": self.dtype, "device": self.device}, self.H
            self._bufs = (torch.empty(rows, 2 + H, **kw), torch.empty(rows, 2 * H, **kw),
                          torch.empty(rows, 4 * H, **kw), torch.empty(rows, H, **kw))
        return self._bufs

    def _cell(self, g: Tensor, c_old: Tensor, c_new: Tensor, h_new: Tensor, t: Tensor) -> None:
        H = self.H
        g.sigmoid_()  # σ(i), σ(f), σ(2g), σ(o)
        gg, o = g[:, 2 * H : 3 * H], g[:, 3 * H :]
        gg.mul_(2).sub_(1)  # tanh(g)
        torch.mul(c_old, g[:, H : 2 * H], out=c_new).addcmul_(g[:, :H], gg)
        torch.mul(c_new, 2, out=t).sigmoid_()
        torch.neg(o, out=h_new).addcmul_(o, t, value=2)  # σ(o) tanh(c)

    @torch.no_grad()
    def step_(self, old: Hidden, new: Hidden, grad: Tensor, out: Tensor, chunk: int) -> None:
        """Write the new state of ``old`` (each [N, H]) into ``new`` and the step into ``out`` [N],
        for the flat gradient ``grad`` [N], ``chunk`` rows at a time."""
        n, H = grad.shape[0], self.H
        x1, x2, g, t = self._buffers(min(chunk, n))
        pre = preprocess_gradient(grad, self.p)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            r = e - s
            a, b, gr, tr = x1[:r], x2[:r], g[:r], t[:r]
            a[:, :2].copy_(pre[s:e])
            a[:, 2:].copy_(old.h1[s:e])
            torch.addmm(self.b1, a, self.w1, out=gr)
            self._cell(gr, old.c1[s:e], new.c1[s:e], new.h1[s:e], tr)
            b[:, :H].copy_(new.h1[s:e])
            b[:, H:].copy_(old.h2[s:e])
            torch.addmm(self.b2, b, self.w2, out=gr)
            self._cell(gr, old.c2[s:e], new.c2[s:e], new.h2[s:e], tr)
            torch.addmm(self.b_out, new.h2[s:e], self.w_out, out=out[s:e].unsqueeze(1))
        out.mul_(self.output_scale)


# --------------------------------------------------------------------------- checkpoint format
POLICY_KIND = "l2o-l2l-policy"
"""Checkpoint kind of the LSTM weights φ that :class:`L2LBGDBGD` loads."""
TRAIN_KIND = "l2o-meta-l2l-train"
"""Checkpoint kind of :mod:`l2o.outer.meta_l2l`'s resumable training state (φ is read from it too)."""


def save_policy(path: str | os.PathLike, net: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path:
    """Write φ as a policy checkpoint plus a small JSON description beside it (same stem)."""
    path = save_checkpoint(path, {k: net[k].detach().to(torch.float32) for k in NET_KEYS}, meta, kind=POLICY_KIND)
    info = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), **meta}
    write_text_atomic(path.with_suffix(".json"), json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


MAX_OUTPUT_SCALE = 100.0
"""Largest |output_scale| a checkpoint may carry (Andrychowicz et al. use 0.1)."""
MAX_PREPROCESS_P = 50.0
"""Largest preprocessing p a checkpoint may carry (ρ multiplies small gradients by e^p)."""


def check_policy_meta(meta: Any, hidden_size: int, where: str) -> dict[str, Any]:
    """The fields L2LBGDBGD needs from a checkpoint's metadata, validated: ``hidden_size`` (must
    equal the weights' H), ``preprocess_p`` in (0, 50], ``output_scale`` finite, nonzero, |·| ≤ 100.
    Anything missing, of the wrong type or out of range raises :class:`CheckpointError`."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: metadata must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("hidden_size", "preprocess_p", "output_scale") if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: metadata lacks {', '.join(missing)}")
    hs, p, scale = meta["hidden_size"], meta["preprocess_p"], meta["output_scale"]
    if not isinstance(hs, int) or isinstance(hs, bool) or hs != hidden_size:
        raise CheckpointError(f"{where}: metadata hidden_size {hs!r} does not match the weights' {hidden_size}")
    for name, v in (("preprocess_p", p), ("output_scale", scale)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise CheckpointError(f"{where}: metadata {name} must be a finite number, got {v!r}")
    if not 0 < p <= MAX_PREPROCESS_P:
        raise CheckpointError(f"{where}: metadata preprocess_p must be in (0, {MAX_PREPROCESS_P:g}], got {p!r}")
    if not 0 < abs(scale) <= MAX_OUTPUT_SCALE:
        raise CheckpointError(f"{where}: metadata output_scale must be nonzero with |output_scale| <= "
                              f"{MAX_OUTPUT_SCALE:g}, got {scale!r}")
    return {**meta, "hidden_size": hs, "preprocess_p": float(p), "output_scale": float(scale)}


def load_policy(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read φ and its metadata from a policy checkpoint, or from a training checkpoint; weights
    and metadata are validated (:func:`check_policy_meta`), any problem is a :class:`CheckpointError`."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") == TRAIN_KIND:
        net = {k: tensors[f"net.{k}"] for k in NET_KEYS if f"net.{k}" in tensors}
        cfg = meta.get("config")
        if not isinstance(cfg, dict):
            raise CheckpointError(f"checkpoint {path}: training checkpoint without a config object")
        meta = {k: cfg[k] for k in ("hidden_size", "preprocess_p", "output_scale") if k in cfg}
    elif meta.get("kind") == POLICY_KIND:
        net = dict(tensors)
    else:
        raise CheckpointError(f"checkpoint {path} holds {meta.get('kind')!r}, expected {POLICY_KIND!r} or {TRAIN_KIND!r}")
    try:
        hidden = check_net(net)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    return net, check_policy_meta(meta, int(hidden), f"checkpoint {path}")


# --------------------------------------------------------------------------- the optimizer
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "l2lbgdbgd.safetensors"
"""The packaged meta-trained weights."""

_HIDDEN_KEYS = ("h1", "c1", "h2", "c2")
CHUNK_ROWS = 4096
"""Coordinates per fused LSTM chunk (H = 20: small gate buffers, so larger chunks than PSD's)."""


class L2LBGDBGD(torch.optim.Optimizer):
    """θ ← θ + g, [g, h] = m(∇f(θ), h; φ) with the LSTM m of :mod:`l2o.learned.l2l`.

    ``checkpoint``: a policy (or meta-training) checkpoint path; ``None`` or ``"default"`` loads the
    packaged weights. Parameters of any shape and several param groups are allowed; a parameter
    whose ``.grad`` is ``None`` is skipped (its state is left as is).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], checkpoint: str | os.PathLike | None = None) -> None:
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
        for gi, pi, p in params_with_grad(self, "L2LBGDBGD"):
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
