"""PSD's batched, fused step (l2o.learned.psd.FusedPolicy over all parameters at once) gives
the eager reference's steps: psd_lstm.step per parameter on Ψ from conv2017.observation_step."""

from __future__ import annotations

import io

import pytest
import torch

import l2o.learned.psd as psd_mod
from l2o.features.conv2017 import observation_step
from l2o.learned import PredictedStepDescent
from l2o.learned.psd import FusedPolicy, Hidden, init_hidden, init_net, load_policy, save_policy, step


def _net(seed: int = 0) -> dict[str, torch.Tensor]:
    net = init_net(seed)
    g = torch.Generator().manual_seed(seed + 1)
    net["W_out"] = torch.randn(1, 128, generator=g) * 0.5
    net["b_out"] = torch.tensor([0.05])
    net["in_mean"] = torch.tensor([0.0, 0.1, 0.5])
    net["in_std"] = torch.tensor([0.1, 0.02, 1.0])
    net["out_scale"] = torch.tensor([0.01])
    return net


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)
    m.frozen = torch.nn.Parameter(torch.ones(5, dtype=dtype))  # never gets a gradient
    return m


def _loss(m: torch.nn.Module, t: int) -> torch.Tensor:
    x = torch.randn(16, 7, generator=torch.Generator().manual_seed(t), dtype=m[0].weight.dtype)
    return (m(x) - 0.3).square().mean() + 0.5


def _reference(net, m: torch.nn.Module, steps: int) -> list[torch.Tensor]:
    """Eager per-parameter PSD: psd_lstm.step on observation_step, parameter by parameter."""
    net = {k: v.to(m[0].weight.dtype) for k, v in net.items()}
    params = [p for p in m.parameters() if p is not m.frozen]
    hist: dict[int, dict] = {i: {} for i in range(len(params))}
    hid = {i: init_hidden(p.numel(), 128, p.dtype) for i, p in enumerate(params)}
    for t in range(steps):
        m.zero_grad()
        loss = _loss(m, t)
        loss.backward()
        f = loss.detach()
        with torch.no_grad():
            for i, p in enumerate(params):
                s, x, g = hist[i], p.detach().reshape(-1).clone(), p.grad.reshape(-1).clone()
                obs = observation_step(f, s.get("f"), g, s.get("g"), x, s.get("x"), s.get("x2"))
                d, hid[i] = step(net, Hidden(*hid[i]), obs)
                if "x" in s:
                    s["x2"] = s["x"]
                s.update(x=x, g=g, f=f)
                p.add_(d.view_as(p))
    return [p.detach().clone() for p in params] + [h for i in hid for h in hid[i]]


def _fast(path, m: torch.nn.Module, steps: int, start: int = 0, opt=None):
    opt = opt or PredictedStepDescent(m.parameters(), checkpoint=path)
    for t in range(start, start + steps):
        def closure(t=t):
            opt.zero_grad()
            loss = _loss(m, t)
            loss.backward()
            return loss

        opt.step(closure)
    params = [p for p in m.parameters() if p is not m.frozen]
    return opt, [p.detach().clone() for p in params] + [opt.state[p][k] for p in params for k in ("h", "c")]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, {"rtol": 1e-10, "atol": 1e-13}),
                                        (torch.float32, {"rtol": 1e-5, "atol": 1e-6})])
@pytest.mark.parametrize("chunk", [1024, 13])
def test_fast_path_equals_the_eager_reference(tmp_path, monkeypatch, dtype, tol, chunk):
    path = save_policy(tmp_path / "w.safetensors", _net(), {"note": "test"})
    monkeypatch.setattr(psd_mod, "CHUNK_ROWS", chunk)  # 13: chunks straddle parameter boundaries
    ref = _reference(load_policy(path)[0], _model(dtype), 6)
    m = _model(dtype)
    opt, fast = _fast(path, m, 6)
    assert len(fast) == len(ref) == 12
    assert ref[0].sub(_model(dtype)[0].weight.detach()).abs().max() > 1e-4  # the policy moves the iterate
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
    assert m.frozen not in opt.state and torch.equal(m.frozen.detach(), torch.ones(5, dtype=dtype))


def test_shipped_paper_weights_take_the_reference_steps():
    """The paper's PSD (``psd-paper``; ``psd``'s default before issue 11) on the paper's features."""
    ref = _reference(load_policy(psd_mod.PAPER_CHECKPOINT)[0], _model(torch.float32), 5)
    _, fast = _fast(psd_mod.PAPER_CHECKPOINT, _model(torch.float32), 5)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_through_torch_save_and_independent_copies(tmp_path):
    path = save_policy(tmp_path / "w.safetensors", _net(), {"note": "test"})
    m = _model(torch.float32)
    opt, _ = _fast(path, m, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    m2 = _model(torch.float32)
    m2.load_state_dict(m.state_dict())
    opt2 = PredictedStepDescent(m2.parameters(), checkpoint=path)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    opt3 = PredictedStepDescent(m2.parameters(), checkpoint=path)
    opt3.load_state_dict(opt.state_dict())  # shares no tensor with opt afterwards
    _, a = _fast(path, m, 3, start=3, opt=opt)
    _, b = _fast(path, m2, 3, start=3, opt=opt2)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    sd3, sd1 = opt3.state_dict()["state"], opt.state_dict()["state"]
    assert all(sd3[i][k].data_ptr() != sd1[i][k].data_ptr() for i in sd3 for k in ("h", "c", "x_prev"))


def test_fused_policy_matches_step_on_random_inputs():
    net = _net(3)
    fused = FusedPolicy(net, torch.float64, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(50, 3, generator=g, dtype=torch.float64)
    h0, c0 = torch.randn(50, 128, generator=g, dtype=torch.float64), torch.randn(50, 128, generator=g, dtype=torch.float64)
    ref, new = step({k: v.double() for k, v in net.items()}, Hidden(h0, c0), obs)
    h, c, out = h0.clone(), c0.clone(), torch.empty(50, dtype=torch.float64)
    fused.step_(h, c, obs, out, chunk=16)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h, new.h, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c, new.c, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("features", ["paper2017", "scale-free"])
def test_one_optimizer_over_all_parameters_equals_one_per_parameter_when_some_skip_steps(tmp_path, features):
    """Ψ is computed once over all coordinates, bucketed by each parameter's point in its history;
    a parameter without a gradient on some steps (so behind the others, with an older f̂⁽ᵗ⁻¹⁾) must
    still get exactly the steps a PSD of its own would give it."""
    from l2o.features.sets import get_feature_set

    P = get_feature_set(features).obs_dim
    net = init_net(0, 16, torch.float64, input_size=P)
    net["W_out"] = torch.randn(1, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net["out_scale"] = torch.tensor([1e-2], dtype=torch.float64)
    path = save_policy(tmp_path / "p.safetensors", net, {"features": features})
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((3, 4), (5,), (2, 2, 3), (7,))]
    joint = [torch.nn.Parameter(t.clone()) for t in init]
    alone = [torch.nn.Parameter(t.clone()) for t in init]
    opt = PredictedStepDescent(joint, checkpoint=path)
    opts = [PredictedStepDescent([p], checkpoint=path) for p in alone]
    skips = {1: {1}, 2: {1, 3}, 3: {3}, 5: {0, 2}}  # step → parameters without a gradient at that step

    def loss_of(ps, t):
        return sum((p.square() * (k + 1)).sum() for k, p in enumerate(ps)) - 3.0 * t

    for t in range(8):
        active = [k for k in range(4) if k not in skips.get(t, set())]
        for ps in (joint, alone):
            for p in ps:
                p.grad = None
            loss = loss_of(ps, t)
            grads = torch.autograd.grad(loss, [ps[k] for k in active])
            for k, gk in zip(active, grads):
                ps[k].grad = gk
            if ps is joint:
                opt.step(loss=loss.detach())
            else:
                for k in active:
                    opts[k].step(loss=loss.detach())
        for a, b in zip(joint, alone):  # equal up to the rounding of vectorised loops over other lengths
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-15)
    assert max((a - b).abs().max() for a, b in zip(joint, init)) > 1e-3  # the policy did move them
