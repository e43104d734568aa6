"""The registry builds each baseline as the paper's algorithm: trajectories against textbook formulas
written independently in NumPy, on the same sequence of gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2o.baselines.registry import BASELINES, OptimizerSpec, get_optimizer, optimizer_names, parse_optimizer


def _reference(name: str, hp: dict, grads: list[np.ndarray], x0: np.ndarray) -> list[np.ndarray]:
    """Textbook update rules (Kingma & Ba 2014; Duchi et al. 2011; Tieleman & Hinton 2012)."""
    x, xs = x0.copy(), []
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        if name == "sgd":
            x = x - hp["lr"] * g
        elif name == "momentum":  # heavy ball: v ← μ v + g; x ← x − α v
            m = hp["momentum"] * m + g
            x = x - hp["lr"] * m
        elif name == "adagrad":
            v = v + g * g
            x = x - hp["lr"] * g / (np.sqrt(v) + hp["eps"])
        elif name == "adam":
            m = hp["beta1"] * m + (1 - hp["beta1"]) * g
            v = hp["beta2"] * v + (1 - hp["beta2"]) * g * g
            mhat = m / (1 - hp["beta1"] ** t)
            vhat = v / (1 - hp["beta2"] ** t)
            x = x - hp["lr"] * mhat / (np.sqrt(vhat) + hp["eps"])
        elif name == "rmsprop":
            v = hp["alpha"] * v + (1 - hp["alpha"]) * g * g
            x = x - hp["lr"] * g / (np.sqrt(v) + hp["eps"])
        xs.append(x.copy())
    return xs


@pytest.mark.parametrize("name,hp", [
    ("sgd", {"lr": 0.1}),
    ("momentum", {"lr": 0.05, "momentum": 0.9}),
    ("adagrad", {"lr": 0.3}),
    ("adam", {"lr": 0.01}),
    ("rmsprop", {"lr": 0.01, "alpha": 0.9}),
])
def test_first_order_baselines_follow_textbook_formulas(name, hp):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=7)
    # Gradients of a fixed non-quadratic function, so each trajectory feeds back into its gradients.
    def grad(x):
        return np.tanh(3 * x) + 0.1 * x**3

    spec = OptimizerSpec.make(name, {**get_optimizer(name).defaults, **hp})
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = spec.build([x])
    ours, grads = [], []
    for _ in range(25):
        g = grad(x.detach().numpy())
        grads.append(g)
        x.grad = torch.tensor(g)
        opt.step()
        ours.append(x.detach().numpy().copy())
    ref = _reference(name, {**get_optimizer(name).defaults, **hp}, grads, x0)
    np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=1e-10, atol=1e-12)


def test_all_seven_baselines_are_registered_with_grids():
    assert BASELINES == ("sgd", "momentum", "cg", "lbfgs", "adagrad", "adam", "rmsprop")
    for name in BASELINES:
        entry = get_optimizer(name)
        assert not entry.learned
        assert len(entry.grid_points()) >= 3
        assert name in optimizer_names()


def test_parse_optimizer_round_trip_and_errors():
    s = parse_optimizer("adam:lr=0.003,beta1=0.8")
    assert s.kwargs == {"lr": 0.003, "beta1": 0.8}
    assert parse_optimizer(str(s)) == s
    assert parse_optimizer("lbfgs:history_size=5").kwargs == {"history_size": 5}
    with pytest.raises(ValueError, match="unknown optimizer"):
        parse_optimizer("adamw")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        parse_optimizer("sgd:learning_rate=0.1")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_optimizer("sgd:0.1")


def test_grid_points_are_the_cartesian_product():
    pts = get_optimizer("momentum").grid_points()
    assert len(pts) == len(get_optimizer("momentum").grid["lr"]) * len(get_optimizer("momentum").grid["momentum"])
    assert len({tuple(sorted(p.items())) for p in pts}) == len(pts)


def test_a_failing_plugin_is_reported_and_retried_not_remembered(monkeypatch):
    """Learned optimizers register through the ``l2o.optimizers`` entry points; one whose module
    fails to import is warned about, named by the lookup, and tried again on the next lookup."""
    from importlib.metadata import EntryPoint

    import importlib.metadata as md

    from l2o.baselines import registry

    broken = EntryPoint("broken-opt", "l2o_no_such_module_xyz", registry.PLUGIN_GROUP)
    original = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda group=None: [broken] + list(original(group=group)))
    monkeypatch.setattr(registry, "_plugins_scanned", False)  # as in a fresh process: the next lookup scans
    with pytest.warns(RuntimeWarning, match="broken-opt"):
        with pytest.raises(ValueError, match="broken-opt.*failed to import.*ModuleNotFoundError"):
            get_optimizer("broken-opt")
    assert "l2o_no_such_module_xyz" not in registry._plugins_loaded
    with pytest.warns(RuntimeWarning, match="broken-opt"):  # tried again, not remembered as loaded
        optimizer_names()
    assert {"psd", "l2lbgdbgd", "lto2016", "mlp-lopt"} <= set(optimizer_names(learned=True))
