"""L2LBGDBGD as a torch optimizer: the shipped weights, state round trip, coordinate-wise steps."""

from __future__ import annotations

import copy

import pytest
import torch

from l2o.baselines.registry import OptimizerSpec, get_optimizer, optimizer_names
from l2o.checkpoint import CheckpointError, load_checkpoint
from l2o.learned.l2l import POLICY_KIND, save_policy
from l2o.experiments.runner import run_optimizer
from l2o.learned import DEFAULT_CHECKPOINT, L2LBGDBGD
from l2o.learned.l2l import init_hidden, init_net, step


def _f(ps):  # a smooth non-quadratic objective of several parameters of different shapes
    return sum(((torch.tanh(p) - 0.3) ** 2).sum() + 0.1 * (p**4).sum() for p in ps)


def test_shipped_checkpoint_is_a_verified_policy_with_provenance():
    tensors, meta = load_checkpoint(DEFAULT_CHECKPOINT, kind=POLICY_KIND)
    assert meta["hidden_size"] == 20 and meta["preprocess_p"] == 10.0
    training = meta["training"]
    assert training["config"]["task"] == "mnist:48-48:b64"
    assert training["episodes"] >= 1 and "l2o meta-train l2l" in training["command"]
    assert DEFAULT_CHECKPOINT.with_suffix(".json").is_file()


def test_registered_as_learned_optimizer():
    entry = get_optimizer("l2lbgdbgd")
    assert entry.learned and entry.display == "L2LBGDBGD" and "l2lbgdbgd" in optimizer_names(learned=True)
    assert isinstance(OptimizerSpec.make("l2lbgdbgd").build([torch.zeros(2, requires_grad=True)]), L2LBGDBGD)


def test_step_matches_the_policy_and_closure_convention():
    torch.manual_seed(0)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn((), dtype=torch.float64, requires_grad=True)  # scalar parameter
    opt = L2LBGDBGD([{"params": [a]}, {"params": [b]}])  # two param groups
    net = {k: v.to(torch.float64) for k, v in opt._net.items()}
    ref = [a.detach().clone(), b.detach().clone()]
    hid = [init_hidden(12, 20, torch.float64), init_hidden(1, 20, torch.float64)]
    for _ in range(5):
        def closure():
            opt.zero_grad()
            loss = _f([a, b])
            loss.backward()
            return loss

        loss = opt.step(closure)
        rp = [r.clone().requires_grad_(True) for r in ref]
        ref_loss = _f(rp)
        grads = torch.autograd.grad(ref_loss, rp)
        assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-12)
        for i, g in enumerate(grads):
            upd, hid[i] = step(net, hid[i], g, p=opt.p, output_scale=opt.output_scale)
            ref[i] = ref[i] + upd
        torch.testing.assert_close(a.detach(), ref[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.detach(), ref[1], rtol=1e-12, atol=1e-14)
    assert opt.state[a]["step"] == 5


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    x = torch.randn(7, 3, requires_grad=True)
    y = torch.randn(5, requires_grad=True)
    opt = L2LBGDBGD([x, y])

    def run(o, ps, n):
        for _ in range(n):
            o.zero_grad()
            _f(ps).backward()
            o.step()

    run(opt, [x, y], 4)
    saved = copy.deepcopy(opt.state_dict())
    x0, y0 = x.detach().clone(), y.detach().clone()
    run(opt, [x, y], 6)

    x2, y2 = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
    opt2 = L2LBGDBGD([x2, y2])
    opt2.load_state_dict(saved)
    run(opt2, [x2, y2], 6)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    for i in sd1["state"]:
        for k in ("h1", "c1", "h2", "c2"):
            assert torch.equal(sd1["state"][i][k], sd2["state"][i][k])


def test_without_closure_and_skips_params_without_grad():
    x = torch.ones(4, requires_grad=True)
    z = torch.ones(2, requires_grad=True)
    opt = L2LBGDBGD([x, z])
    x.grad = torch.full((4,), 0.5)
    assert opt.step() is None
    assert not torch.equal(x.detach(), torch.ones(4)) and torch.equal(z.detach(), torch.ones(2))
    assert z not in opt.state


def test_permuting_coordinates_permutes_steps():
    torch.manual_seed(2)
    w = torch.randn(6, 5, dtype=torch.float64)
    perm = torch.randperm(30)
    p1 = w.clone().requires_grad_(True)
    p2 = w.reshape(-1)[perm].reshape(6, 5).clone().requires_grad_(True)
    o1, o2 = L2LBGDBGD([p1]), L2LBGDBGD([p2])
    target = torch.randn(30, dtype=torch.float64)
    for _ in range(8):  # a separable objective, so the permuted problem is the same problem
        for p, o, tgt in ((p1, o1, target), (p2, o2, target[perm])):
            o.zero_grad()
            ((torch.sin(p.reshape(-1)) - tgt) ** 2).sum().backward()
            o.step()
    torch.testing.assert_close(p2.detach().reshape(-1), p1.detach().reshape(-1)[perm], rtol=1e-12, atol=1e-14)


def test_shipped_weights_run_through_the_harness_without_divergence(tiny_task):
    r = run_optimizer(tiny_task, OptimizerSpec.make("l2lbgdbgd"), seed=0, iterations=60)
    assert not r.diverged
    assert r.final < r.true_loss[0]


def test_custom_checkpoint_and_bad_checkpoints(tmp_path):
    net = init_net(5)
    path = save_policy(tmp_path / "w.safetensors", net, {"hidden_size": 20, "preprocess_p": 10.0, "output_scale": 0.3})
    x = torch.zeros(3, requires_grad=True)
    opt = OptimizerSpec.make("l2lbgdbgd", {"checkpoint": str(path)}).build([x])
    assert opt.output_scale == 0.3 and torch.equal(opt._net["W_out"], net["W_out"])
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        L2LBGDBGD([x], checkpoint=path)
    with pytest.raises(CheckpointError, match="not found"):
        L2LBGDBGD([x], checkpoint=tmp_path / "missing.safetensors")
