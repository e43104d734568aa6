"""The coordinate-wise LSTM optimizer m of Andrychowicz et al. (2016), as a pure function.

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

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

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
