"""Line searches: strong Wolfe conditions, exactness on quadratics, non-finite handling."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from l2o.baselines.linesearch import LineSearchResult, _cubic_minimizer, _Point, exact, strong_wolfe

Scalar = Callable[[float], float]


def make_phi(f: Scalar, df: Scalar, calls: list[float] | None = None):
    """phi(alpha) -> (f, phi', grad) for a 1-D function; grad is a 1-element tensor."""

    def phi(alpha: float) -> tuple[float, float, torch.Tensor]:
        if calls is not None:
            calls.append(alpha)
        d = df(alpha)
        return f(alpha), d, torch.tensor([d], dtype=torch.float64)

    return phi


def assert_strong_wolfe(res: LineSearchResult, f: Scalar, df: Scalar, c1: float, c2: float) -> None:
    f0, g0 = f(0.0), df(0.0)
    assert res.success
    assert res.step > 0.0
    assert res.f == pytest.approx(f(res.step), rel=1e-12, abs=1e-12)
    assert res.f <= f0 + c1 * res.step * g0  # sufficient decrease
    assert abs(df(res.step)) <= c2 * abs(g0)  # strong curvature condition


# phi(alpha) = 2 (alpha - 3)^2 - 1 : minimiser alpha* = 3
def quad_f(a: float) -> float:
    return 2.0 * (a - 3.0) ** 2 - 1.0


def quad_df(a: float) -> float:
    return 4.0 * (a - 3.0)


# h(t) = t^4 - 3 t^2 + t, searched from t0 = 1.5 along p = -1: phi(alpha) = h(1.5 - alpha).
# phi'(0) = -5.5; local min at t ~ 1.13, local max at t ~ 0.17, global min at t ~ -1.30.
def quartic_f(a: float) -> float:
    t = 1.5 - a
    return t**4 - 3.0 * t**2 + t


def quartic_df(a: float) -> float:
    t = 1.5 - a
    return -(4.0 * t**3 - 6.0 * t + 1.0)


@pytest.mark.parametrize("step0", [1e-3, 0.1, 1.0, 2.9, 10.0, 1e3])
@pytest.mark.parametrize("c2", [0.9, 0.1])
def test_strong_wolfe_quadratic(step0: float, c2: float) -> None:
    res = strong_wolfe(make_phi(quad_f, quad_df), quad_f(0.0), quad_df(0.0), step0, c1=1e-4, c2=c2)
    assert_strong_wolfe(res, quad_f, quad_df, 1e-4, c2)
    assert res.evals <= 10


@pytest.mark.parametrize("step0", [1e-3, 0.05, 0.5, 1.0, 2.0, 5.0, 50.0])
@pytest.mark.parametrize("c2", [0.9, 0.5, 0.1, 0.01])
def test_strong_wolfe_nonconvex(step0: float, c2: float) -> None:
    res = strong_wolfe(make_phi(quartic_f, quartic_df), quartic_f(0.0), quartic_df(0.0), step0, c1=1e-4, c2=c2)
    assert_strong_wolfe(res, quartic_f, quartic_df, 1e-4, c2)


def test_strong_wolfe_result_grad_matches_point() -> None:
    res = strong_wolfe(make_phi(quad_f, quad_df), quad_f(0.0), quad_df(0.0), 0.5)
    assert res.grad is not None and float(res.grad[0]) == pytest.approx(quad_df(res.step))
    assert res.dphi == pytest.approx(quad_df(res.step))


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("step0", [2.5, 10.0, 1e4])
def test_strong_wolfe_nonfinite_is_too_far(bad: float, step0: float) -> None:
    """phi is +inf / NaN beyond alpha = 2: the search must shrink, never return it."""

    def f(a: float) -> float:
        return quad_f(a) if a <= 2.0 else bad

    def df(a: float) -> float:
        return quad_df(a) if a <= 2.0 else bad

    res = strong_wolfe(make_phi(f, df), f(0.0), df(0.0), step0)
    assert 0.0 < res.step <= 2.0
    assert math.isfinite(res.f) and res.f <= f(0.0) + 1e-4 * res.step * df(0.0)
    assert res.success and abs(df(res.step)) <= 0.9 * abs(df(0.0))


def test_strong_wolfe_all_nonfinite_returns_no_move() -> None:
    calls: list[float] = []
    res = strong_wolfe(make_phi(lambda a: math.inf, lambda a: math.nan, calls), 1.0, -1.0, 1.0, max_evals=8)
    assert res.step == 0.0 and not res.success
    assert res.f == 1.0 and not math.isnan(res.f)
    assert res.evals == len(calls) == 8


def test_strong_wolfe_failure_returns_best_sufficient_decrease() -> None:
    """One evaluation, at a step too short for the curvature condition: keep it anyway."""
    res = strong_wolfe(make_phi(quad_f, quad_df), quad_f(0.0), quad_df(0.0), 0.01, max_evals=1)
    assert not res.success and res.evals == 1
    assert res.step == 0.01 and res.f < quad_f(0.0)


def test_strong_wolfe_unbounded_stops_at_max_step() -> None:
    res = strong_wolfe(make_phi(lambda a: -a, lambda a: -1.0), 0.0, -1.0, 1.0, max_step=50.0)
    assert res.step == 50.0 and not res.success and res.f == -50.0


def test_not_a_descent_direction_evaluates_nothing() -> None:
    calls: list[float] = []
    for search in (strong_wolfe, exact):
        res = search(make_phi(quad_f, quad_df, calls), 0.0, 1.0, 1.0)
        assert res.step == 0.0 and res.evals == 0 and not res.success
    assert not calls


def test_invalid_arguments() -> None:
    phi = make_phi(quad_f, quad_df)
    with pytest.raises(ValueError):
        strong_wolfe(phi, 0.0, -1.0, 0.0)
    with pytest.raises(ValueError):
        strong_wolfe(phi, 0.0, -1.0, 1.0, c1=0.5, c2=0.1)
    with pytest.raises(ValueError):
        exact(phi, 0.0, -1.0, math.nan)


@pytest.mark.parametrize("step0", [1e-3, 0.5, 2.0, 3.0, 7.0, 100.0])
def test_exact_hits_quadratic_minimiser(step0: float) -> None:
    res = exact(make_phi(quad_f, quad_df), quad_f(0.0), quad_df(0.0), step0, tol=1e-12)
    assert res.success
    assert res.step == pytest.approx(3.0, abs=1e-8)
    # one secant step on phi' after the trial point; a far-too-short trial first extrapolates
    # (at most x10 per evaluation), so 1e-3 needs 3 extra evaluations to bracket alpha* = 3
    assert res.evals <= (2 if 0.03 <= step0 <= 300.0 else 5)


def test_exact_nonconvex_finds_stationary_point_with_decrease() -> None:
    res = exact(make_phi(quartic_f, quartic_df), quartic_f(0.0), quartic_df(0.0), 0.1, tol=1e-10)
    assert res.success
    assert abs(quartic_df(res.step)) <= 1e-10 * abs(quartic_df(0.0))
    assert res.f < quartic_f(0.0)
    assert res.step == pytest.approx(1.5 - 1.1309, abs=1e-3)  # the nearer local minimum


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_exact_nonfinite_is_too_far(bad: float) -> None:
    def f(a: float) -> float:
        return (a - 1.5) ** 2 if a <= 2.0 else bad

    def df(a: float) -> float:
        return 2.0 * (a - 1.5) if a <= 2.0 else bad

    res = exact(make_phi(f, df), f(0.0), df(0.0), 10.0, tol=1e-12, max_evals=30)
    assert res.success and res.step == pytest.approx(1.5, abs=1e-8)


def test_cubic_minimizer_is_exact_for_cubics() -> None:
    # c(a) = a^3 - 3a : local min at a = 1
    def pt(a: float) -> _Point:
        return _Point(a, a**3 - 3 * a, 3 * a**2 - 3, None)

    for a, b in [(0.0, 2.0), (2.0, 0.0), (0.5, 3.0), (-0.5, 1.5)]:
        assert _cubic_minimizer(pt(a), pt(b)) == pytest.approx(1.0, abs=1e-12)
