"""Line searches for the hand-designed baselines (nonlinear CG, L-BFGS).

The searches are pure functions of a 1-D restriction ``phi(alpha) -> (f, dphi, flat_grad)``
of the objective along a direction ``d`` (``f = f(x + alpha d)``, ``dphi = grad . d``), so
they can be tested on scalar functions and shared by every optimizer.  Names follow Nocedal
& Wright, *Numerical Optimization* (2nd ed.), Algorithms 3.5/3.6 and eq. (3.59).

The bottom of the module holds :class:`LineSearchOptimizer`, the small
``torch.optim.Optimizer`` base that CG and L-BFGS share: it flattens the parameters, runs
one of the searches on the step's closure (one mini-batch) and keeps the counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "LineSearchResult",
    "LineSearchOptimizer",
    "Phi",
    "exact",
    "strong_wolfe",
]

Phi = Callable[[float], tuple[float, float, Tensor | None]]
"""phi(alpha) -> (f(x + alpha d), grad(x + alpha d) . d, grad(x + alpha d) flattened)."""

DEFAULT_MAX_STEP = 1e6
"""Default cap on the step length alpha (N&W's alpha_max); the direction sets the scale."""


@dataclass
class LineSearchResult:
    """Outcome of a line search: accepted ``step`` (0 = no move) and the values there.

    ``success`` is True when the search's own stopping test held (strong Wolfe, or
    |phi'| <= tol |phi'(0)| for :func:`exact`).  A failed search still returns its best
    sufficient-decrease point when it found one (``step > 0``), else ``step == 0``.
    """

    step: float
    f: float
    grad: Tensor | None
    evals: int
    success: bool
    dphi: float = math.nan


@dataclass
class _Point:
    """One evaluated trial point on the line (f = inf, dphi = nan when non-finite)."""

    alpha: float
    f: float
    dphi: float
    grad: Tensor | None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.f) and math.isfinite(self.dphi)


def _evaluate(phi: Phi, alpha: float) -> _Point:
    """Evaluate phi, mapping any non-finite value to an 'infinitely bad' point."""
    f, dphi, grad = phi(alpha)
    f, dphi = float(f), float(dphi)
    if not (math.isfinite(f) and math.isfinite(dphi)):
        return _Point(alpha, math.inf, math.nan, None)
    return _Point(alpha, f, dphi, grad)


def _cubic_minimizer(a: _Point, b: _Point) -> float | None:
    """Minimiser of the cubic interpolating f and phi' at a and b (N&W eq. 3.59).

    Returns None when the cubic has no local minimiser or the data are not finite.
    """
    if not (a.finite and b.finite) or a.alpha == b.alpha:
        return None
    d1 = a.dphi + b.dphi - 3.0 * (a.f - b.f) / (a.alpha - b.alpha)
    disc = d1 * d1 - a.dphi * b.dphi
    if not math.isfinite(disc) or disc < 0.0:
        return None
    d2 = math.copysign(math.sqrt(disc), b.alpha - a.alpha)
    denom = b.dphi - a.dphi + 2.0 * d2
    if denom == 0.0:
        return None
    x = b.alpha - (b.alpha - a.alpha) * (b.dphi + d2 - d1) / denom
    return x if math.isfinite(x) else None


def _secant_root(a: _Point, b: _Point) -> float | None:
    """Root of the line through (alpha, phi') at a and b; exact for quadratic phi."""
    if not (a.finite and b.finite) or a.dphi == b.dphi:
        return None
    x = a.alpha - a.dphi * (b.alpha - a.alpha) / (b.dphi - a.dphi)
    return x if math.isfinite(x) else None


def _inside(x: float | None, a: float, b: float, margin: float) -> float | None:
    """x clamped to [lo + margin*w, hi - margin*w] of the interval (a, b); None stays None."""
    if x is None:
        return None
    left, right = min(a, b), max(a, b)
    w = right - left
    return min(max(x, left + margin * w), right - margin * w)


def _extrapolate(prev: _Point, cur: _Point, trial: float | None, max_step: float) -> float:
    """Next trial beyond ``cur`` while still descending: within [cur + 0.1D, cur + 10D]."""
    delta = cur.alpha - prev.alpha
    lo_b, hi_b = cur.alpha + 0.1 * delta, cur.alpha + 10.0 * delta
    nxt = cur.alpha + 2.0 * delta if trial is None or trial <= cur.alpha else trial
    return min(max(nxt, lo_b), hi_b, max_step)


def _check_args(g0: float, step0: float, max_evals: int, max_step: float) -> None:
    if not (math.isfinite(step0) and step0 > 0.0):
        raise ValueError(f"initial step must be finite and > 0, got {step0}")
    if not (max_step > 0.0):
        raise ValueError(f"max_step must be > 0, got {max_step}")
    if max_evals < 1:
        raise ValueError(f"max_evals must be >= 1, got {max_evals}")
    if math.isnan(g0):
        raise ValueError("phi'(0) is NaN")


def _result(p: _Point, evals: int, success: bool) -> LineSearchResult:
    return LineSearchResult(p.alpha, p.f, p.grad, evals, success, p.dphi)


def strong_wolfe(
    phi: Phi,
    f0: float,
    g0: float,
    step0: float,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_evals: int = 20,
    max_step: float = DEFAULT_MAX_STEP,
    grad0: Tensor | None = None,
) -> LineSearchResult:
    """Find alpha with f(a) <= f0 + c1 a g0 and |phi'(a)| <= c2 |g0| (N&W Alg. 3.5/3.6).

    Bracketing with cubic extrapolation, then zoom with safeguarded cubic interpolation.
    ``g0 = phi'(0)`` must be negative (descent direction), else nothing is evaluated.
    Non-finite f or phi' count as 'too far' (the bracket shrinks).  On failure the best
    sufficient-decrease point is returned (``success=False``), or step 0 if there is none.
    """
    _check_args(g0, step0, max_evals, max_step)
    if not 0.0 < c1 < c2 < 1.0:
        raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
    start = _Point(0.0, float(f0), float(g0), grad0)
    if not g0 < 0.0:
        return _result(start, 0, False)

    def armijo(p: _Point) -> bool:
        return p.f <= f0 + c1 * p.alpha * g0

    def curvature(p: _Point) -> bool:
        return abs(p.dphi) <= -c2 * g0

    best = start  # lowest-f point satisfying sufficient decrease (step 0 trivially)
    prev = start
    alpha = min(step0, max_step)
    evals = 0
    while evals < max_evals:
        cur = _evaluate(phi, alpha)
        evals += 1
        if not armijo(cur) or (prev.alpha > 0.0 and cur.f >= prev.f):
            return _zoom(phi, start, prev, cur, best, evals, c1, c2, max_evals)
        if cur.f < best.f:
            best = cur
        if curvature(cur):
            return _result(cur, evals, True)
        if cur.dphi >= 0.0:
            return _zoom(phi, start, cur, prev, best, evals, c1, c2, max_evals)
        if cur.alpha >= max_step:  # still descending at alpha_max: accept it, flag failure
            break
        alpha = _extrapolate(prev, cur, _cubic_minimizer(prev, cur), max_step)
        prev = cur
    return _result(best, evals, False)


def _zoom(
    phi: Phi,
    start: _Point,
    lo: _Point,
    hi: _Point,
    best: _Point,
    evals: int,
    c1: float,
    c2: float,
    max_evals: int,
) -> LineSearchResult:
    """N&W Alg. 3.6: ``lo`` satisfies sufficient decrease with lowest f, and
    phi'(lo) (hi - lo) < 0, so [lo, hi] contains a strong-Wolfe point."""
    f0, g0 = start.f, start.dphi
    widths: list[float] = []
    while evals < max_evals:
        width = abs(hi.alpha - lo.alpha)
        if width <= 1e-14 * max(abs(lo.alpha), abs(hi.alpha)):
            break  # bracket collapsed to rounding level
        # Bisect when hi is unusable or the bracket has not halved over two iterations.
        stalled = len(widths) >= 2 and width > 0.5 * widths[-2]
        trial = None if stalled else _inside(_cubic_minimizer(lo, hi), lo.alpha, hi.alpha, 0.1)
        alpha = 0.5 * (lo.alpha + hi.alpha) if trial is None else trial
        widths.append(width)
        cur = _evaluate(phi, alpha)
        evals += 1
        if cur.f > f0 + c1 * cur.alpha * g0 or cur.f >= lo.f:
            hi = cur
        else:
            if abs(cur.dphi) <= -c2 * g0:
                return _result(cur, evals, True)
            if cur.dphi * (hi.alpha - lo.alpha) >= 0.0:
                hi = lo
            lo = cur
    if lo.f < best.f:
        best = lo
    return _result(best, evals, False)


def exact(
    phi: Phi,
    f0: float,
    g0: float,
    step0: float,
    tol: float = 1e-10,
    max_evals: int = 20,
    max_step: float = DEFAULT_MAX_STEP,
    grad0: Tensor | None = None,
) -> LineSearchResult:
    """Approximately exact line search: a local minimiser with |phi'(a)| <= tol |phi'(0)|.

    Brackets a sign change of phi' (never accepting a rise in f beyond rounding), then
    refines with the secant method on phi' (cubic / bisection as safeguards).  For a
    quadratic phi the first secant or extrapolation step lands on the exact minimiser.
    On failure returns the best point of the bracket (``success=False``).
    """
    _check_args(g0, step0, max_evals, max_step)
    if not tol >= 0.0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    start = _Point(0.0, float(f0), float(g0), grad0)
    if not g0 < 0.0:
        return _result(start, 0, False)
    target = tol * abs(g0)
    eps = torch.finfo(grad0.dtype).eps if grad0 is not None else torch.finfo(torch.float64).eps

    def rises(p: _Point, ref: _Point) -> bool:  # f went up by more than rounding noise
        return not p.f <= ref.f + 100.0 * eps * (1.0 + abs(ref.f))

    lo, prev = start, start
    hi: _Point | None = None
    alpha = min(step0, max_step)
    evals = 0
    widths: list[float] = []
    while evals < max_evals:
        cur = _evaluate(phi, alpha)
        evals += 1
        if rises(cur, lo):
            hi = cur
        else:
            if abs(cur.dphi) <= target:
                return _result(cur, evals, True)
            direction = 1.0 if hi is None else hi.alpha - lo.alpha
            if cur.dphi * direction >= 0.0:
                hi = lo
            prev, lo = lo, cur
        if hi is None:  # still descending to the right of every point: extrapolate
            if lo.alpha >= max_step:
                break
            alpha = _extrapolate(prev, lo, _secant_root(prev, lo), max_step)
            continue
        width = abs(hi.alpha - lo.alpha)
        if width <= 4.0 * eps * max(abs(lo.alpha), abs(hi.alpha)):
            break  # bracket collapsed to rounding level
        stalled = len(widths) >= 2 and width > 0.5 * widths[-2]
        widths.append(width)
        trial = None
        if not stalled:
            trial = _secant_root(lo, hi) if lo.dphi * hi.dphi < 0.0 else None
            if trial is None:
                trial = _cubic_minimizer(lo, hi)
            trial = _inside(trial, lo.alpha, hi.alpha, 0.01)
        alpha = 0.5 * (lo.alpha + hi.alpha) if trial is None else trial
    return _result(lo, evals, False)


# --------------------------------------------------------------------------------------
# Shared torch.optim machinery for the line-search baselines.
# --------------------------------------------------------------------------------------

LINE_SEARCHES = ("strong_wolfe", "exact")


class LineSearchOptimizer(Optimizer):
    """Base for optimizers that take one line search per ``step(closure)``.

    All parameters are viewed as one flat vector (like ``torch.optim.LBFGS``); only one
    parameter group, dense gradients and a single dtype/device are supported.  Counters
    live in ``self.state`` under string keys so ``state_dict()`` carries them:
    ``"func_evals"`` (cumulative closure calls), ``"n_iter"`` (steps taken) and
    ``"line_search"`` (last search: ``success``, ``evals``, ``step``).  Per-algorithm
    tensors live in ``self.state[first_param]`` so loading casts them to its dtype/device.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        if defaults["line_search"] not in LINE_SEARCHES:
            raise ValueError(
                f"line_search must be one of {LINE_SEARCHES}, got {defaults['line_search']!r}"
            )
        if not 0.0 < defaults["c1"] < defaults["c2"] < 1.0:
            raise ValueError(f"need 0 < c1 < c2 < 1, got c1={defaults['c1']}, c2={defaults['c2']}")
        if not defaults["max_step"] > 0.0:
            raise ValueError(f"max_step must be > 0, got {defaults['max_step']}")
        if int(defaults["max_evals"]) < 1:
            raise ValueError(f"max_evals must be >= 1, got {defaults['max_evals']}")
        super().__init__(params, defaults)
        params_ = self._params
        if not params_:
            raise ValueError("optimizer got an empty parameter list")
        first = params_[0]
        for p in params_:
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} needs floating-point parameters, got {p.dtype}")
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"{type(self).__name__} needs all parameters on one dtype and device")
        self.state["func_evals"] = 0
        self.state["n_iter"] = 0
        self.state["line_search"] = {"success": None, "evals": 0, "step": 0.0}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if len(self.param_groups) >= 1:
            raise ValueError(f"{type(self).__name__} supports a single parameter group only")
        super().add_param_group(param_group)

    # -- flat views -------------------------------------------------------------------
    @property
    def _params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    @property
    def _algo_state(self) -> dict[str, Any]:
        """Per-algorithm state (tensors), keyed by the first parameter."""
        return self.state[self._params[0]]

    def _numel(self) -> int:
        return sum(p.numel() for p in self._params)

    def _gather_flat_grad(self) -> Tensor:
        views = []
        for p in self._params:
            if p.grad is None:
                views.append(p.new_zeros(p.numel()))
            elif p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            else:
                views.append(p.grad.reshape(-1))
        return torch.cat(views)

    def _gather_flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def _set_flat_params(self, flat: Tensor) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    # -- closure evaluation -----------------------------------------------------------
    def _call(self, closure: Callable[[], Any]) -> tuple[Any, float, Tensor]:
        with torch.enable_grad():
            loss = closure()
        self.state["func_evals"] = int(self.state.get("func_evals", 0)) + 1
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        return loss, value, self._gather_flat_grad()

    def _start(self, closure: Callable[[], Any] | None) -> tuple[Any, float, Tensor]:
        """First closure call of a step; raises on a missing closure or divergence."""
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step requires a closure that zeroes grads, computes the "
                "mini-batch loss, calls backward() and returns the loss"
            )
        loss, f0, g = self._call(closure)
        if not math.isfinite(f0):
            raise FloatingPointError(
                f"{type(self).__name__}: loss is not finite at the start of the step ({f0})"
            )
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(
                f"{type(self).__name__}: gradient is not finite at the start of the step"
            )
        return loss, f0, g

    def _line_search(
        self, closure: Callable[[], Any], x0: Tensor, f0: float, g0: Tensor, d: Tensor, step0: float
    ) -> LineSearchResult:
        """Search along d on this step's closure; leaves params at the accepted point.

        Params move only if the search returned step > 0 (sufficient decrease was found);
        otherwise they are restored to x0 bit for bit.
        """
        group = self.param_groups[0]

        def phi(alpha: float) -> tuple[float, float, Tensor]:
            self._set_flat_params(x0.add(d, alpha=alpha))
            _, f, g = self._call(closure)
            return f, float(g.dot(d)), g

        dphi0 = float(g0.dot(d))
        step0 = min(step0, group["max_step"])
        max_evals, max_step = group["max_evals"], group["max_step"]
        if group["line_search"] == "exact":
            res = exact(
                phi, f0, dphi0, step0, tol=group["exact_tol"],
                max_evals=max_evals, max_step=max_step, grad0=g0,
            )
        else:
            res = strong_wolfe(
                phi, f0, dphi0, step0, c1=group["c1"], c2=group["c2"],
                max_evals=max_evals, max_step=max_step, grad0=g0,
            )
        if res.step > 0.0:
            self._set_flat_params(x0.add(d, alpha=res.step))
        else:
            self._set_flat_params(x0)
        self.state["line_search"] = {
            "success": bool(res.success),
            "evals": int(res.evals),
            "step": float(res.step),
        }
        self.state["n_iter"] = int(self.state.get("n_iter", 0)) + 1
        return res

    @staticmethod
    def _first_step(g: Tensor, max_step: float) -> float:
        """Trial step when there is no curvature information: min(1, 1/|g|_1)."""
        g1 = float(g.abs().sum())
        step = 1.0 if g1 <= 1.0 else 1.0 / g1
        return min(step, max_step)
