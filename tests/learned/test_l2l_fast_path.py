"""L2LBGDBGD's batched, fused step (l2o.learned.l2l.FusedL2L over all parameters at once)
gives the eager reference's steps (l2l_lstm.step per parameter), and its state round-trips."""

from __future__ import annotations

import io

import pytest
import torch

import l2o.learned.l2l as l2l_mod
from l2o.learned.l2l import load_policy
from l2o.learned.l2l import L2LBGDBGD
from l2o.learned.l2l import Hidden, init_hidden, step


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)
    m.frozen = torch.nn.Parameter(torch.ones(5, dtype=dtype))  # never gets a gradient
    return m


def _loss(m: torch.nn.Module, t: int) -> torch.Tensor:
    # float32 data for every dtype, so a float64 run solves exactly the float32 run's problem
    x = torch.randn(16, 7, generator=torch.Generator().manual_seed(t)).to(m[0].weight.dtype)
    return (m(x) - 0.3).square().mean()


def _reference(m: torch.nn.Module, steps: int) -> list[torch.Tensor]:
    net, meta = load_policy(l2l_mod.DEFAULT_CHECKPOINT)
    dtype = m[0].weight.dtype
    net = {k: v.to(dtype) for k, v in net.items()}
    H, p, scale = int(meta["hidden_size"]), float(meta["preprocess_p"]), float(meta["output_scale"])
    params = [q for q in m.parameters() if q is not m.frozen]
    hid = [init_hidden(q.numel(), H, dtype) for q in params]
    for t in range(steps):
        m.zero_grad()
        _loss(m, t).backward()
        with torch.no_grad():
            for i, q in enumerate(params):
                d, hid[i] = step(net, Hidden(*hid[i]), q.grad, p=p, output_scale=scale)
                q.add_(d)
    return [q.detach().clone() for q in params] + [h for hs in hid for h in hs]


def _fast(m: torch.nn.Module, steps: int, start: int = 0, opt=None):
    opt = opt or L2LBGDBGD(m.parameters())
    for t in range(start, start + steps):
        def closure(t=t):
            opt.zero_grad()
            loss = _loss(m, t)
            loss.backward()
            return loss

        opt.step(closure)
    params = [q for q in m.parameters() if q is not m.frozen]
    return opt, [q.detach().clone() for q in params] + [opt.state[q][k] for q in params for k in ("h1", "c1", "h2", "c2")]


@pytest.mark.parametrize("chunk", [4096, 13])
def test_fast_path_equals_the_eager_reference(monkeypatch, chunk):
    monkeypatch.setattr(l2l_mod, "CHUNK_ROWS", chunk)  # 13: chunks straddle parameter boundaries
    dtype = torch.float64
    ref = _reference(_model(dtype), 6)
    m = _model(dtype)
    opt, fast = _fast(m, 6)
    assert len(fast) == len(ref) == 20
    assert (ref[0] - _model(dtype)[0].weight.detach()).abs().max() > 1e-4
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert m.frozen not in opt.state and torch.equal(m.frozen.detach(), torch.ones(5, dtype=dtype))


@pytest.mark.parametrize("chunk", [4096, 13])
def test_float32_fast_path_is_as_accurate_as_the_float32_reference(monkeypatch, chunk):
    """In float32 the fused path and the eager reference round differently (by how much depends on
    the CPU's BLAS kernels), so both are held against the same problem solved in float64: the fast
    path's error may not exceed twice the eager path's (plus 1e-6 of the tensor's scale)."""
    monkeypatch.setattr(l2l_mod, "CHUNK_ROWS", chunk)
    exact = _reference(_model(torch.float32).double(), 6)
    eager = _reference(_model(torch.float32), 6)
    _, fast = _fast(_model(torch.float32), 6)
    for f, e, x in zip(fast, eager, exact, strict=True):
        scale = float(x.abs().max())
        err_fast, err_eager = float((f.double() - x).abs().max()), float((e.double() - x).abs().max())
        assert err_fast <= 2 * err_eager + 1e-6 * scale, (err_fast, err_eager, scale)


def test_state_dict_round_trip_through_torch_save():
    m = _model(torch.float32)
    opt, _ = _fast(m, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    m2 = _model(torch.float32)
    m2.load_state_dict(m.state_dict())
    opt2 = L2LBGDBGD(m2.parameters())
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    opt3 = L2LBGDBGD(m2.parameters())
    opt3.load_state_dict(opt.state_dict())
    _, a = _fast(m, 3, start=3, opt=opt)
    _, b = _fast(m2, 3, start=3, opt=opt2)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    sd3, sd1 = opt3.state_dict()["state"], opt.state_dict()["state"]
    assert all(sd3[i][k].data_ptr() != sd1[i][k].data_ptr() for i in sd3 for k in ("h1", "c2"))
