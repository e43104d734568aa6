"""Scale-free features: every adaptive baseline is exactly a linear ψ of the state, Ψ is unchanged
when the objective is scaled, and zero or negative losses are legitimate."""

from __future__ import annotations

import pytest
import torch

from l2o.features.scale_free import OBS_NAMES, STATE_INDEX, STATE_NAMES, ScaleFreeFeatures, loss_change
from l2o.features.sets import get_feature_set
from l2o.outer.gps.conv_env import GroupLinearGaussianController, rollout
from l2o.outer.gps.conv_trainer import initial_psi
from l2o.tasks.base import flatten, unflatten
from tests.conftest import tiny_mlp_task

T = 15

BASELINES = [  # (torch optimizer factory, state feature, step size)
    (lambda p: torch.optim.SGD(p, lr=0.3), "g", 0.3),
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), "momentum0.9", 0.05),
    (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.99), "momentum0.99", 0.01),
    (lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10), "adagrad", 0.1),
    (lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-8), "rmsprop0.9", 0.01),
    (lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.99, eps=1e-8), "rmsprop0.99", 0.01),
    (lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8), "adam", 0.01),
]


def _torch_iterates(task, make_opt, seed: int) -> torch.Tensor:
    """x_0..x_T of a torch optimizer on the mini-batch sequence that :func:`rollout` draws."""
    x = flatten(task.init_params(seed), task.groups).clone().requires_grad_(True)
    opt = make_opt([x])
    gen = torch.Generator().manual_seed(1_000_003 + seed)  # rollout's mini-batch generator
    xs = [x.detach().clone()]
    for _ in range(T):
        idx = task.sample_batch(gen)
        opt.zero_grad()
        task.loss(unflatten(x, task.groups), idx).backward()
        opt.step()
        xs.append(x.detach().clone())
    return torch.stack(xs)


@pytest.mark.parametrize("make_opt,feature,lr", BASELINES, ids=[b[1] for b in BASELINES])
def test_each_baseline_is_exactly_a_linear_psi_of_the_state(make_opt, feature, lr):
    task = tiny_mlp_task()
    feats = ScaleFreeFeatures()
    psi = initial_psi(T, lr, 1e-12, feats.state_dim, STATE_INDEX[feature])
    r = rollout(task, GroupLinearGaussianController(task, [psi] * len(task.groups), noise=False), seed=4, horizon=T,
                coords_per_group=2, return_history=True, features=feats)
    xs_psi = r.history[0]
    xs_torch = _torch_iterates(task, make_opt, seed=4)
    assert float((xs_torch[-1] - xs_torch[0]).abs().max()) > 1e-2  # the optimizer really moved
    torch.testing.assert_close(xs_psi, xs_torch, rtol=1e-5, atol=1e-6)


def test_a_wrong_direction_does_not_reproduce_adagrad():
    """The exactness test can fail: ψ on RMSprop's direction is not AdaGrad."""
    task = tiny_mlp_task()
    feats = ScaleFreeFeatures()
    psi = initial_psi(T, 0.1, 1e-12, feats.state_dim, STATE_INDEX["rmsprop0.99"])
    r = rollout(task, GroupLinearGaussianController(task, [psi] * len(task.groups), noise=False), 4, T, 2,
                return_history=True, features=feats)
    xs_torch = _torch_iterates(task, lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10), 4)
    assert float((r.history[0] - xs_torch).abs().max()) > 1e-3


def _stream(scale: float, seed: int = 0, n: int = 50, steps: int = 30, loss_offset: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    feats = ScaleFreeFeatures()
    mem = feats.init(n, steps, torch.float64)
    x = torch.zeros(n, dtype=torch.float64)
    out = []
    for t in range(steps):
        g = torch.randn(n, generator=gen, dtype=torch.float64) * torch.linspace(1e-4, 1.0, n, dtype=torch.float64)
        g[:3] = 0.0  # coordinates that never see a gradient
        f = torch.tensor(loss_offset + float(torch.randn((), generator=gen)), dtype=torch.float64)
        S, O, mem = feats.step(mem, t, x, scale * g, scale * f)
        out.append((S, O))
    return out


@pytest.mark.parametrize("scale", [1e-6, 3.0, 1e5])
def test_observations_are_unchanged_when_the_objective_is_scaled(scale):
    ref, scaled = _stream(1.0), _stream(scale)
    for (_, o1), (_, o2) in zip(ref, scaled):
        torch.testing.assert_close(o2, o1, rtol=1e-9, atol=1e-12)
    # ... while the raw gradient in ψ's state is not (it is there for SGD and momentum)
    assert not torch.allclose(ref[-1][0][:, STATE_INDEX["g"]], scaled[-1][0][:, STATE_INDEX["g"]])


@pytest.mark.parametrize("offset", [0.0, -5.0])
def test_zero_and_negative_losses_give_finite_features(offset):
    feats = ScaleFreeFeatures()
    mem = feats.init(4, 3)
    for t in range(3):  # f = 0 exactly, or negative, with zero and nonzero gradients
        S, O, mem = feats.step(mem, t, torch.zeros(4), torch.tensor([0.0, 1.0, -2.0, 0.0]), torch.tensor(offset))
        assert torch.isfinite(S).all() and torch.isfinite(O).all()
    assert float(loss_change(torch.tensor(0.0), torch.tensor(0.0))) == 0.0
    assert float(loss_change(torch.tensor(-1.0), torch.tensor(-2.0))) == pytest.approx(1 / 3)


def test_feature_sets_are_found_by_name_and_describe_themselves():
    f = get_feature_set("scale-free")
    assert (f.state_dim, f.obs_dim) == (len(STATE_NAMES), len(OBS_NAMES))
    assert get_feature_set("paper2017").state_dim == 77
    with pytest.raises(ValueError, match="unknown feature set"):
        get_feature_set("nope")


def test_state_index_names_a_feature_or_defaults_to_the_gradient():
    feats = get_feature_set("scale-free")
    assert feats.state_index("adagrad") == STATE_INDEX["adagrad"]
    assert feats.state_index(None) == feats.state_index("") == feats.grad_feature
    with pytest.raises(ValueError, match="'adagard' is not a state feature of 'scale-free'"):
        feats.state_index("adagard")


@pytest.mark.parametrize("make_opt,feature,lr", [BASELINES[3], BASELINES[6]], ids=["adagrad", "adam"])
def test_in_the_preconditioned_action_space_a_baseline_is_still_a_linear_psi(make_opt, feature, lr):
    """precondition = "adam": ψ sees s' = [p·s; g/p] and acts in u = p·a, so the same gain on the
    scaled direction still reproduces the torch optimizer (to float rounding of p·s/p)."""
    task = tiny_mlp_task()
    feats = ScaleFreeFeatures()
    psi = initial_psi(T, lr, 1e-12, feats.state_dim + 1, STATE_INDEX[feature])
    r = rollout(task, GroupLinearGaussianController(task, [psi] * len(task.groups), noise=False), seed=4, horizon=T,
                coords_per_group=2, return_history=True, features=feats, precondition="adam")
    xs_torch = _torch_iterates(task, make_opt, seed=4)
    assert float((xs_torch[-1] - xs_torch[0]).abs().max()) > 1e-2
    torch.testing.assert_close(r.history[0], xs_torch, rtol=1e-5, atol=1e-6)
    # the recorded actions are u = p·a and the scales are p = (√v̂ + 1e-8)^½ of the gradients seen
    xs, gs, _ = r.history
    v = torch.zeros_like(gs[0])
    for t in range(T):
        v = 0.999 * v + 0.001 * gs[t] * gs[t]
        p = ((v / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8).sqrt()
        start = 0
        for gi, g in enumerate(task.groups):
            idx = r.coords[gi] + start
            torch.testing.assert_close(r.scales[gi][t], p[idx])
            torch.testing.assert_close(r.actions[gi][t], (p * (xs[t + 1] - xs[t]))[idx], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(r.states[gi][t, :, -1], (gs[t] / p)[idx])
            start += g.numel
