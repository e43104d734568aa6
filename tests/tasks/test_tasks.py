"""Tasks: gradients against finite differences, vectorised evaluation, seeding, spec parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2o.tasks import (
    FAMILIES,
    MLPTaskSpec,
    batched_value_and_grad,
    flatten,
    make_task,
    parse_task,
    project,
    unflatten,
    value_and_grad,
)
from tests.conftest import tiny_mlp_task


def _tasks():
    yield tiny_mlp_task(batch=16)
    for fam in FAMILIES.values():
        yield fam().sample("train", 0)


@pytest.mark.parametrize("task", list(_tasks()), ids=lambda t: t.name)
def test_gradient_matches_central_finite_differences(task):
    params = task.init_params(seed=3, dtype=torch.float64)
    # Move off the kink-free start of biases so every coordinate is exercised.
    params = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
              for k, v in params.items()}
    idx = task.sample_batch(torch.Generator().manual_seed(0))
    value, grads = value_and_grad(task, params, idx)
    x = flatten(params, task.groups)
    g = flatten(grads, task.groups)
    h = 1e-6
    fd = torch.empty_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = h
        fd[i] = (task.loss(unflatten(x + e, task.groups), idx) - task.loss(unflatten(x - e, task.groups), idx)) / (2 * h)
    assert torch.isfinite(value)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-7)


def test_batched_value_and_grad_equals_per_instance_loop(tiny_task):
    m = 4
    inits = [tiny_task.init_params(seed=s) for s in range(m)]
    stacked = {k: torch.stack([p[k] for p in inits]) for k in inits[0]}
    gens = [torch.Generator().manual_seed(10 + s) for s in range(m)]
    idx = torch.stack([tiny_task.sample_batch(g) for g in gens])
    values, grads = batched_value_and_grad(tiny_task, stacked, idx)
    for s in range(m):
        v, gr = value_and_grad(tiny_task, inits[s], idx[s])
        torch.testing.assert_close(values[s], v)
        for k in gr:
            torch.testing.assert_close(grads[k][s], gr[k])


def test_true_loss_is_mean_over_all_examples(tiny_task):
    params = tiny_task.init_params(seed=0, dtype=torch.float64)
    all_idx = torch.arange(tiny_task.num_examples)
    assert tiny_task.true_loss(params) == pytest.approx(float(tiny_task.loss(params, all_idx)), rel=1e-12)


def test_seeds_are_reproducible_and_distinct(tiny_task):
    a, b, c = (tiny_task.init_params(seed=s) for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["W1"], c["W1"])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(tiny_task.sample_batch(g1), tiny_task.sample_batch(g2))
    batch = tiny_task.sample_batch(torch.Generator().manual_seed(0))
    assert batch.unique().numel() == batch.numel() == 16  # without replacement


def test_initial_loss_is_near_log_classes(tiny_task):
    # With N(0, 1/fan_in) weights and zero biases, logits are O(1): f(x0) is close to log K.
    losses = [tiny_task.true_loss(tiny_task.init_params(seed=s)) for s in range(5)]
    assert abs(np.mean(losses) - np.log(3)) < 0.5


def test_projection_is_standardised_and_seeded():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(500, 40), dtype=np.uint8)
    labels = rng.integers(0, 4, size=500)
    d1 = project(images, labels, 4, 8, seed=1)
    d2 = project(images, labels, 4, 8, seed=1)
    d3 = project(images, labels, 4, 8, seed=2)
    assert d1.inputs.shape == (500, 8)
    torch.testing.assert_close(d1.inputs.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(d1.inputs.std(0), torch.ones(8), atol=1e-5, rtol=0)
    assert torch.equal(d1.inputs, d2.inputs)
    assert not torch.allclose(d1.inputs, d3.inputs)


def test_projection_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        project(np.zeros((5, 4), np.uint8), np.zeros(4, np.int64), 2, 3, seed=0)


def test_check_params_names_the_bad_group(tiny_task):
    p = tiny_task.init_params(0)
    p["W2"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="W2"):
        tiny_task.check_params(p)


def test_family_train_and_test_instances_are_disjoint_and_reproducible():
    for fam_cls in FAMILIES.values():
        fam = fam_cls()
        a, b = fam.sample("train", 0), fam.sample("train", 0)
        assert torch.equal(a.inputs, b.inputs)
        train = {fam.sample("train", i).inputs.sum().item() for i in range(20)}
        test = {fam.sample("test", i).inputs.sum().item() for i in range(20)}
        assert len(train) == 20 and len(test) == 20
        assert not train & test
        with pytest.raises(ValueError, match="split"):
            fam.sample("valid", 0)


def test_logistic_regression_minimum_agrees_between_newton_and_scipy():
    # Strongly convex: scipy's L-BFGS-B and plain gradient descent should reach the same minimum.
    from scipy.optimize import minimize

    task = FAMILIES["logreg"]().sample("test", 1)

    def fg(x):
        xt = torch.tensor(x, dtype=torch.float64)
        v, g = value_and_grad(task, unflatten(xt, task.groups), None)
        return float(v), flatten(g, task.groups).numpy()

    res = minimize(fg, np.zeros(task.dim), jac=True, method="L-BFGS-B", options={"gtol": 1e-10})

    def f(x):
        return task.loss(unflatten(x, task.groups))

    x = torch.zeros(task.dim, dtype=torch.float64)
    for _ in range(30):  # Newton's method: an independent solver with quadratic convergence
        g = torch.func.grad(f)(x)
        x = x - torch.linalg.solve(torch.func.hessian(f)(x), g)
    assert float(torch.func.grad(f)(x).norm()) < 1e-10
    assert float(f(x)) == pytest.approx(res.fun, abs=1e-8)


def test_parse_task_grammar():
    assert parse_task("mnist:48-48:b64") == MLPTaskSpec("mnist", 48, 48, 64, 0)
    assert parse_task("cifar10:100-200:b10:p3") == MLPTaskSpec("cifar10", 100, 200, 10, 3)
    assert parse_task("digits:48-48:bfull").batch_size is None
    assert str(parse_task("cifar10:100-200:b10:p3")) == "cifar10:100-200:b10:p3"
    assert parse_task("logreg/test/7") == ("logreg", "test", 7)
    for bad in ["mnist", "mnist:48:b64", "mnist:48-48:b0", "nope/test/1", "logreg/valid/1"]:
        with pytest.raises(ValueError):
            parse_task(bad)


def test_make_task_on_embedded_digits():
    task = make_task("digits:48-48:b64")
    assert task.name == "digits:48-48:b64"
    assert task.num_examples == 1797
    assert [g.shape for g in task.groups] == [(48, 48), (48,), (10, 48), (10,)]
    assert task.dim == 48 * 48 + 48 + 10 * 48 + 10
