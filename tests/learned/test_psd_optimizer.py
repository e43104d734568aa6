"""Predicted Step Descent as a torch optimizer: online Ψ = offline Ψ, permutation invariance,
exact state round trip, any parameter shapes, clear errors, and the harness entry."""

from __future__ import annotations

import io
import math

import pytest
import torch

import l2o
import l2o.learned.psd as psd_mod
from l2o.baselines.registry import (
    OptimizerSpec,
    get_optimizer,
    optimizer_names,
    parse_optimizer,
)
from l2o.checkpoint import CheckpointError
from l2o.experiments.runner import run_optimizer
from l2o.features.conv2017 import observation_features
from l2o.learned import PredictedStepDescent
from l2o.learned.psd import init_net, load_policy, run_sequence, save_policy
from tests.conftest import tiny_mlp_task


def _random_net(seed: int = 0, hidden: int = 128) -> dict[str, torch.Tensor]:
    """ω with random (non-zero) output weights and non-trivial input/output normalisation."""
    net = init_net(seed, hidden)
    g = torch.Generator().manual_seed(seed + 100)
    net["W_out"] = torch.randn(1, hidden, generator=g) * 0.5
    net["b_out"] = torch.tensor([0.05])
    net["in_mean"] = torch.tensor([0.0, 0.0, 0.5])
    net["in_std"] = torch.tensor([0.1, 0.02, 1.0])
    net["out_scale"] = torch.tensor([0.01])
    return net


@pytest.fixture
def policy_path(tmp_path):
    return save_policy(tmp_path / "psd.safetensors", _random_net(), {"note": "random test weights"})


def _mlp_params(task, dtype=torch.float64, seed=0):
    return {k: v.requires_grad_(True) for k, v in task.init_params(seed, dtype).items()}


def _run(opt, params, loss_fn, steps, start=0, set_to_none=True):
    """``steps`` PSD iterations with the closure convention; returns the history per iteration:
    iterates before each step, the gradients and the losses the optimizer saw, and the last iterate.
    ``set_to_none=False`` zeroes gradients in place (as the harness does), so a stale reference to
    the previous gradient would be overwritten."""
    xs, gs, fs = [], [], []
    for t in range(start, start + steps):
        xs.append(torch.cat([p.detach().reshape(-1).clone() for p in params]))

        def closure(t=t):
            opt.zero_grad(set_to_none=set_to_none)
            loss = loss_fn(t)
            loss.backward()
            return loss

        fs.append(opt.step(closure).detach().clone())
        gs.append(torch.cat([p.grad.reshape(-1).clone() for p in params]))
    xs.append(torch.cat([p.detach().reshape(-1).clone() for p in params]))
    return torch.stack(xs), torch.stack(gs), torch.stack(fs)


def _assert_online_equals_offline(opt, path, xs, gs, fs):
    """x⁽ᵗ⁺¹⁾ − x⁽ᵗ⁾ = run_sequence(ω, Ψ(history))[t] for every recorded t (all parameters concatenated)."""
    net = {k: v.to(xs.dtype) for k, v in load_policy(path)[0].items()}
    T = fs.shape[0]
    steps, _ = run_sequence(net, observation_features(xs[:T], gs, fs))
    assert steps.abs().max() > 1e-4  # the policy does move the iterate
    torch.testing.assert_close(xs[1:] - xs[:-1], steps, rtol=1e-9, atol=1e-13)


def test_exported_and_registered_as_learned_optimizer(policy_path):
    assert l2o.PredictedStepDescent is PredictedStepDescent
    entry = get_optimizer("psd")
    assert entry.learned and entry.display == "PSD" and entry.defaults == {"checkpoint": "default"}
    assert "psd" in optimizer_names(learned=True)
    opt = parse_optimizer(f"psd:checkpoint={policy_path}").build([torch.zeros(2, requires_grad=True)])
    assert isinstance(opt, PredictedStepDescent) and opt.hidden_size == 128


def test_online_steps_equal_offline_policy_on_observation_features(policy_path):
    task = tiny_mlp_task()
    params = _mlp_params(task)
    tensors = [params[g.name] for g in task.groups]
    opt = PredictedStepDescent(tensors, checkpoint=policy_path)
    gen = torch.Generator().manual_seed(0)
    batches = [task.sample_batch(gen) for _ in range(10)]
    xs, gs, fs = _run(opt, tensors, lambda t: task.loss(params, batches[t]), 10)
    _assert_online_equals_offline(opt, policy_path, xs, gs, fs)
    assert all(opt.state[p]["step"] == 10 for p in tensors)


def test_conv_kernels_and_several_param_groups(policy_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 4 * 4, 2)).double()
    conv, lin = model[0], model[3]
    opt = PredictedStepDescent([{"params": conv.parameters()}, {"params": lin.parameters()}], checkpoint=policy_path)
    data = [(torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)) for _ in range(6)]
    tensors = [conv.weight, conv.bias, lin.weight, lin.bias]

    def loss_fn(t):
        x, y = data[t]
        return ((model(x) - y) ** 2).mean()

    xs, gs, fs = _run(opt, tensors, loss_fn, 6, set_to_none=False)
    _assert_online_equals_offline(opt, policy_path, xs, gs, fs)
    assert conv.weight.dim() == 4 and opt.state[conv.weight]["h"].shape == (conv.weight.numel(), 128)


def test_permuting_hidden_units_permutes_the_iterates(policy_path):
    task = tiny_mlp_task(hidden=7)
    p1 = _mlp_params(task)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    p2 = {"W1": p1["W1"].detach()[perm], "b1": p1["b1"].detach()[perm],
          "W2": p1["W2"].detach()[:, perm], "b2": p1["b2"].detach()}
    p2 = {k: v.clone().requires_grad_(True) for k, v in p2.items()}
    with torch.no_grad():  # non-zero hidden biases, so b1 is not trivially permutation-symmetric
        b = torch.linspace(-0.2, 0.3, 7, dtype=torch.float64)
        p1["b1"].copy_(b)
        p2["b1"].copy_(b[perm])
    names = [g.name for g in task.groups]
    o1 = PredictedStepDescent([p1[n] for n in names], checkpoint=policy_path)
    o2 = PredictedStepDescent([p2[n] for n in names], checkpoint=policy_path)
    gen = torch.Generator().manual_seed(1)
    start = {k: v.detach().clone() for k, v in p1.items()}
    for _ in range(8):
        idx = task.sample_batch(gen)  # the same mini-batch for both
        for o, p in ((o1, p1), (o2, p2)):
            def closure(o=o, p=p, idx=idx):
                o.zero_grad()
                loss = task.loss(p, idx)
                loss.backward()
                return loss

            o.step(closure)
        tight = {"rtol": 1e-10, "atol": 1e-13}
        torch.testing.assert_close(p2["W1"].detach(), p1["W1"].detach()[perm], **tight)
        torch.testing.assert_close(p2["b1"].detach(), p1["b1"].detach()[perm], **tight)
        torch.testing.assert_close(p2["W2"].detach(), p1["W2"].detach()[:, perm], **tight)
        torch.testing.assert_close(p2["b2"].detach(), p1["b2"].detach(), **tight)
    assert all((p1[k].detach() - start[k]).abs().max() > 1e-3 for k in names)


def test_state_dict_round_trip_resumes_bit_for_bit(policy_path):
    task = tiny_mlp_task()
    gen = torch.Generator().manual_seed(2)
    batches = [task.sample_batch(gen) for _ in range(10)]
    params = _mlp_params(task, torch.float32)
    names = [g.name for g in task.groups]
    opt = PredictedStepDescent([params[n] for n in names], checkpoint=policy_path)
    _run(opt, [params[n] for n in names], lambda t: task.loss(params, batches[t]), 4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_x = {k: v.detach().clone() for k, v in params.items()}
    _run(opt, [params[n] for n in names], lambda t: task.loss(params, batches[t]), 6, start=4)

    params2 = {k: v.clone().requires_grad_(True) for k, v in saved_x.items()}
    opt2 = PredictedStepDescent([params2[n] for n in names], checkpoint=policy_path)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    _run(opt2, [params2[n] for n in names], lambda t: task.loss(params2, batches[t]), 6, start=4)
    for n in names:
        assert torch.equal(params[n], params2[n])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        assert s1[i].keys() == s2[i].keys() == {"step", "h", "c", "x_prev", "x_prev2", "g_prev", "f_prev"}
        assert s1[i]["step"] == s2[i]["step"] == 10
        for k in s1[i]:
            if k != "step":
                assert torch.equal(s1[i][k], s2[i][k]), k


def test_loss_keyword_equals_closure_and_chunked_lstm_equals_whole(policy_path, monkeypatch):
    def run(mode):
        torch.manual_seed(3)
        w = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)
        z = torch.ones(2, dtype=torch.float64, requires_grad=True)  # never gets a gradient: skipped
        opt = PredictedStepDescent([w, z], checkpoint=policy_path)
        for t in range(5):
            def closure(t=t):
                opt.zero_grad()
                loss = ((torch.sin(w) - 0.1 * t) ** 2).sum() + 1.0
                loss.backward()
                return loss

            if mode == "loss":
                opt.step(loss=closure())
            else:
                opt.step(closure)
        assert z not in opt.state and torch.equal(z.detach(), torch.ones(2, dtype=torch.float64))
        return w.detach()

    ref = run("closure")
    torch.testing.assert_close(run("loss"), ref, rtol=0, atol=0)
    monkeypatch.setattr(psd_mod, "CHUNK_ROWS", 7)  # 120 coordinates in chunks of 7
    torch.testing.assert_close(run("closure"), ref, rtol=1e-12, atol=1e-15)


def test_clear_errors_without_loss_and_on_nan(policy_path):
    x = torch.ones(4, requires_grad=True)
    opt = PredictedStepDescent([x], checkpoint=policy_path)
    x.grad = torch.full((4,), 0.5)
    with pytest.raises(ValueError, match="needs the mini-batch loss"):
        opt.step()
    with pytest.raises(ValueError, match="not both"):
        opt.step(lambda: torch.tensor(1.0), loss=1.0)

    def nan_closure():
        opt.zero_grad()
        loss = (x**2).sum() * float("nan")
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="loss is nan"):
        opt.step(nan_closure)
    x.grad = torch.tensor([0.5, float("inf"), 0.0, 0.0])
    with pytest.raises(FloatingPointError, match="gradient of parameter 0 of param group 0"):
        opt.step(loss=1.0)
    assert torch.equal(x.detach(), torch.ones(4)) and x not in opt.state  # nothing moved


def test_missing_tampered_and_wrong_kind_checkpoints(policy_path, tmp_path, monkeypatch):
    x = torch.zeros(3, requires_grad=True)
    monkeypatch.setattr(psd_mod, "DEFAULT_CHECKPOINT", tmp_path / "absent" / "psd.safetensors")
    with pytest.raises(FileNotFoundError, match=r"checkpoint=PATH"):
        PredictedStepDescent([x])
    with pytest.raises(FileNotFoundError, match="is not there"):
        OptimizerSpec.make("psd").build([x])
    with pytest.raises(CheckpointError, match="not found"):
        PredictedStepDescent([x], checkpoint=tmp_path / "missing.safetensors")

    raw = bytearray(policy_path.read_bytes())
    raw[-3] ^= 0x10
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="integrity"):
        PredictedStepDescent([x], checkpoint=bad)

    from l2o.learned.l2l import save_policy as save_l2l_policy
    from l2o.learned.l2l import init_net as init_l2l_net

    other = save_l2l_policy(tmp_path / "l2l.safetensors", init_l2l_net(0),
                            {"hidden_size": 20, "preprocess_p": 10.0, "output_scale": 0.1})
    with pytest.raises(CheckpointError, match="l2o-psd-policy"):
        PredictedStepDescent([x], checkpoint=other)


def test_shipped_checkpoint_if_present():
    if not psd_mod.DEFAULT_CHECKPOINT.is_file():
        pytest.skip(f"no packaged PSD policy at {psd_mod.DEFAULT_CHECKPOINT} yet")
    opt = PredictedStepDescent([torch.zeros(3, requires_grad=True)])
    assert opt.checkpoint == str(psd_mod.DEFAULT_CHECKPOINT)
    assert psd_mod.DEFAULT_CHECKPOINT.with_suffix(".json").is_file()


def test_harness_runs_psd_with_a_checkpoint_override(policy_path, tiny_task):
    spec = OptimizerSpec.make("psd", {"checkpoint": str(policy_path)})
    r = run_optimizer(tiny_task, spec, seed=0, iterations=15)
    assert not r.diverged and r.evals == [1] * 15
    assert all(v is not None and math.isfinite(v) for v in r.true_loss + r.batch_loss)
    assert r.true_loss[-1] != r.true_loss[0]
