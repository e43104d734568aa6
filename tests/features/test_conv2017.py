"""Φ and Ψ against a slow reference written straight from §3.6 of the 2017 paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2o.features import (
    PHI_DIM,
    STATE_DIM,
    average_recent,
    observation_features,
    observation_step,
    state_features,
    states,
)


def _avg(h, i):
    """(1 / min(i+1, 3)) Σ_{j=max(i−2,0)}^{i} h[j] — one scalar at a time."""
    js = range(max(i - 2, 0), i + 1)
    return sum(h[j] for j in js) / min(i + 1, 3)


def _phi_reference(x, g, f, t):
    """Loops over coordinates and lags; a negative time index makes the term zero."""
    n = len(x[0])
    out = np.zeros((n, PHI_DIM))
    for c in range(n):
        xc = [x[k][c] for k in range(len(x))]
        gc = [g[k][c] for k in range(len(g))]
        col = 0
        for i in range(25):  # relative change in the average recent objective
            a, b = t - 5 * i, t - 5 * (i + 1)
            out[c, col] = (_avg(f, a) - _avg(f, b)) / _avg(f, b) if b >= 0 else 0.0
            col += 1
        for i in range(26):  # average recent gradient, normalised by an earlier one
            a = t - 5 * i
            d = max(t - 5 * (i + 1), t % 5)
            out[c, col] = _avg(gc, a) / (abs(_avg(gc, d)) + 1) if a >= 0 else 0.0
            col += 1
        for i in range(25):  # earlier change in average recent iterate over the current one
            a, b = t - 5 * i, t - 5 * (i + 1)
            if b >= 0:
                n1, n2 = max(t - 5 * (i + 1), t % 5 + 5), max(t - 5 * (i + 2), t % 5)
                out[c, col] = abs(_avg(xc, n1) - _avg(xc, n2)) / (abs(_avg(xc, a) - _avg(xc, b)) + 0.1)
            col += 1
    return out


def _psi_reference(x, g, f, t):
    n = len(x[0])
    out = np.zeros((n, 3))
    for c in range(n):
        out[c, 0] = (f[t] - f[t - 1]) / f[t - 1] if t >= 1 else 0.0
        out[c, 1] = g[t][c] / (abs(g[max(t - 1, 0)][c]) + 1)
        out[c, 2] = abs(x[max(t - 1, 1)][c] - x[max(t - 2, 0)][c]) / (abs(x[t][c] - x[t - 1][c]) + 0.1) if t >= 1 else 0.0
    return out


def _history(T=150, n=4, seed=0):
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=(T + 1, n)), axis=0)
    g = rng.normal(size=(T + 1, n)) * rng.uniform(0.1, 3, size=(T + 1, 1))
    f = rng.uniform(0.5, 3.0, size=T + 1)
    return x, g, f


@pytest.mark.parametrize("seed", [0, 1])
def test_state_features_match_the_slow_reference_at_every_kind_of_t(seed):
    x, g, f = _history(seed=seed)
    xs, gs, fs = (torch.tensor(a) for a in (x, g, f))
    times = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 24, 25, 26, 63, 124, 125, 129, 130, 131, 137, 150]
    phi = state_features(xs, gs, fs, torch.tensor(times))
    assert phi.shape == (len(times), 4, PHI_DIM)
    for k, t in enumerate(times):
        np.testing.assert_allclose(phi[k].numpy(), _phi_reference(x, g, f, t), rtol=1e-12, atol=1e-12,
                                   err_msg=f"t={t}")


def test_all_times_at_once_equals_selected_times():
    x, g, f = _history(T=40, n=3)
    xs, gs, fs = (torch.tensor(a) for a in (x, g, f))
    full = state_features(xs, gs, fs)
    assert full.shape == (41, 3, PHI_DIM)
    torch.testing.assert_close(full[[3, 17, 40]], state_features(xs, gs, fs, torch.tensor([3, 17, 40])))
    s = states(xs, gs, fs)
    assert s.shape == (41, 3, STATE_DIM)
    torch.testing.assert_close(s[..., 0], xs)


def test_undefined_terms_are_zero_early_on():
    x, g, f = _history(T=12, n=2)
    phi = state_features(*(torch.tensor(a) for a in (x, g, f)))
    assert torch.all(phi[:5, :, :25] == 0) and torch.all(phi[:5, :, 51:] == 0)  # need t − 5 ≥ 0
    assert torch.all(phi[0, :, 26:51] == 0) and torch.all(phi[0, :, 25] != 0)  # only i = 0 of Φ2 at t = 0
    assert torch.all(phi[7, :, 1:25] == 0) and torch.all(phi[7, :, 0] != 0)


def test_observation_features_match_reference_and_online_version():
    x, g, f = _history(T=30, n=5, seed=3)
    xs, gs, fs = (torch.tensor(a) for a in (x, g, f))
    psi = observation_features(xs, gs, fs)
    assert psi.shape == (31, 5, 3)
    for t in range(31):
        np.testing.assert_allclose(psi[t].numpy(), _psi_reference(x, g, f, t), rtol=1e-12, atol=1e-12, err_msg=f"t={t}")
        online = observation_step(
            fs[t], fs[t - 1] if t >= 1 else None, gs[t], gs[t - 1] if t >= 1 else None,
            xs[t], xs[t - 1] if t >= 1 else None, xs[t - 2] if t >= 2 else None)
        torch.testing.assert_close(online, psi[t], rtol=1e-12, atol=1e-12)


def test_features_are_elementwise_so_permuting_coordinates_permutes_them():
    x, g, f = _history(T=60, n=6, seed=4)
    xs, gs, fs = (torch.tensor(a) for a in (x, g, f))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(state_features(xs[:, perm], gs[:, perm], fs), state_features(xs, gs, fs)[:, perm])
    torch.testing.assert_close(observation_features(xs[:, perm], gs[:, perm], fs), observation_features(xs, gs, fs)[:, perm])


def test_average_recent_window():
    h = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    torch.testing.assert_close(average_recent(h), torch.tensor([1.0, 1.5, 7 / 3, 14 / 3, 28 / 3]))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="fs must be"):
        state_features(torch.zeros(5, 2), torch.zeros(5, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="xs and gs"):
        observation_features(torch.zeros(5, 2), torch.zeros(5, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="times"):
        state_features(torch.zeros(5, 2), torch.zeros(5, 2), torch.ones(5), torch.tensor([5]))
