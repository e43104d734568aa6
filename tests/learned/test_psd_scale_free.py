"""PSD with the scale-free feature set: the checkpoint names its features and the optimizer builds
that Ψ online, equal to the offline features; zero losses are fine; a mismatch is refused."""

from __future__ import annotations

import pytest
import torch

from l2o.checkpoint import CheckpointError
from l2o.features.scale_free import ScaleFreeFeatures
from l2o.learned.psd import PredictedStepDescent
from l2o.learned import psd


def _policy(tmp_path, features: str = "scale-free", inputs: int = ScaleFreeFeatures.obs_dim):
    net = psd.init_net(3, hidden_size=16, dtype=torch.float64, input_size=inputs)
    net["W_out"] = torch.randn(1, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net["out_scale"] = torch.tensor([1e-2], dtype=torch.float64)
    return psd.save_policy(tmp_path / "p.safetensors", net, {"features": features}), net


@pytest.mark.parametrize("shipped", [False, True])
def test_steps_equal_the_policy_on_offline_scale_free_features(tmp_path, shipped):
    """A random scale-free ω, and the shipped default (scale-free, with a base step)."""
    path, net = _policy(tmp_path)
    if shipped:
        path = psd.DEFAULT_CHECKPOINT
        net, meta = psd.load_policy(path)
        assert meta["features"] == "scale-free" and "base_u" in net
    net = {k: v.to(torch.float32) for k, v in net.items()}
    w = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))
    opt = PredictedStepDescent([w], checkpoint=path)
    feats, mem = ScaleFreeFeatures(), None
    hidden = psd.init_hidden(12, net["W_hh"].shape[-1])
    for t in range(6):
        x = w.detach().reshape(-1).clone()
        loss = (w.square().sum() - 2.0 * t) if t != 3 else (w.sum() * 0.0)  # negative, then exactly 0
        opt.zero_grad()
        loss.backward()
        g = w.grad.reshape(-1).clone()
        mem = feats.init(12, 0) if mem is None else mem
        _, obs, mem = feats.step(mem, t, x, g, loss.detach())
        expected, hidden = psd.step(net, hidden, obs)
        opt.step(loss=loss)
        torch.testing.assert_close(w.detach().reshape(-1) - x, expected, rtol=1e-5, atol=1e-7)
    # state_dict round trip gives the same next step
    other = torch.nn.Parameter(w.detach().clone())
    opt2 = PredictedStepDescent([other], checkpoint=path)
    opt2.load_state_dict(opt.state_dict())
    for p, o in ((w, opt), (other, opt2)):
        o.zero_grad()
        loss = p.square().sum()
        loss.backward()
        o.step(loss=loss)
    torch.testing.assert_close(w.detach(), other.detach(), rtol=0, atol=0)


def test_a_checkpoint_whose_features_do_not_fit_its_weights_is_refused(tmp_path):
    path, _ = _policy(tmp_path, features="scale-free", inputs=3)
    with pytest.raises(CheckpointError, match="reads 3 features"):
        PredictedStepDescent([torch.nn.Parameter(torch.zeros(2))], checkpoint=path)
    path, _ = _policy(tmp_path, features="bogus")
    with pytest.raises(CheckpointError, match="unknown feature set"):
        PredictedStepDescent([torch.nn.Parameter(torch.zeros(2))], checkpoint=path)


def test_a_base_step_initialised_to_adagrad_is_torch_adagrad(tmp_path):
    """ω with init_base(index of g/√G, 0.1) on the scale-free Ψ: the LSTM's output is zero and the base
    step −0.1·g/√G is exactly torch.optim.Adagrad(lr=0.1, eps=1e-10), whatever the LSTM's weights."""
    net = psd.init_net(3, hidden_size=16, dtype=torch.float64, input_size=ScaleFreeFeatures.obs_dim)
    net["W_out"] = torch.randn(1, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = psd.init_base(net, ScaleFreeFeatures.obs_directions, ScaleFreeFeatures.obs_names.index("g/sqrtG"), 0.1)
    net["base_u"][9] = 5.0  # on the loss-change feature, which the mask excludes: no effect
    path = psd.save_policy(tmp_path / "ada.safetensors", net, {"features": "scale-free"})
    w = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    ref = torch.nn.Parameter(w.detach().clone())
    opt, ada = PredictedStepDescent([w], checkpoint=path), torch.optim.Adagrad([ref], lr=0.1, eps=1e-10)
    for t in range(8):
        for p, o in ((w, opt), (ref, ada)):
            o.zero_grad()
            loss = (p.square() * torch.arange(1.0, 13.0, dtype=p.dtype).view(3, 4)).sum() - 2.0 * t
            loss.backward()
            o.step(lambda loss=loss: loss)
        # the checkpoint is float32: the base step is AdaGrad's to float32 rounding of u = −0.1
        torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-6, atol=1e-9)
    assert (w.detach() - torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).abs().max() > 0.1


def test_base_entries_are_validated(tmp_path):
    net = psd.init_net(0, hidden_size=8, input_size=13)
    based = psd.init_base(net, range(7), 0, 0.1)
    with pytest.raises(ValueError, match="missing"):
        psd.check_net({k: v for k, v in based.items() if k != "base_c"})
    with pytest.raises(ValueError, match="base_c"):
        psd.check_net({**based, "base_c": torch.zeros(3)})
    with pytest.raises(ValueError, match="index"):
        psd.init_base(net, range(7), 13, 0.1)
    assert based["base_mask"].tolist() == [[1.0] * 7 + [0.0] * 6, [1.0] * 13]
    with pytest.raises(ValueError, match="schedule"):
        psd.init_base(net, range(7), 0, 0.1, schedule=[13])
    loaded, _ = psd.load_policy(psd.save_policy(tmp_path / "b.safetensors", based, {"features": "scale-free"}))
    assert set(psd.BASE_KEYS) <= set(loaded) and float(loaded["base_u"][0]) == pytest.approx(-0.1)
    # a file from before the step size's mask ([P] directions only) loads as a step size on all of Ψ
    from l2o.checkpoint import save_checkpoint

    old = save_checkpoint(tmp_path / "old.safetensors", {**based, "base_mask": based["base_mask"][0].clone()},
                          {"features": "scale-free"}, kind=psd.POLICY_KIND)
    assert psd.load_policy(old)[0]["base_mask"].tolist() == [[1.0] * 7 + [0.0] * 6, [1.0] * 13]


def test_base_step_size_reads_only_its_schedule_features():
    """With schedule = the step-count embedding, c's entries on other features have no effect, and
    c on the embedding scales the step by exp(c·τ)."""
    net = psd.init_net(0, hidden_size=8, input_size=13)
    based = psd.init_base(net, range(7), 0, 0.1, schedule=[10, 11, 12])
    obs = torch.randn(50, 13)
    ref = psd.base_step(based, obs)
    torch.testing.assert_close(ref, -0.1 * obs[:, 0])
    c = torch.zeros(14)
    c[1:11] = torch.randn(10)  # features 0..9: outside the schedule
    assert torch.equal(psd.base_step({**based, "base_c": c}, obs), ref)
    c[12] = 0.7  # feature 11, a τ
    torch.testing.assert_close(psd.base_step({**based, "base_c": c}, obs), ref * torch.exp(0.7 * obs[:, 11]))
