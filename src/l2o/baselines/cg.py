"""Nonlinear conjugate gradient baseline (Nocedal & Wright ch. 5.2) on the torch.optim API."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from l2o.baselines.linesearch import DEFAULT_MAX_STEP, LineSearchOptimizer

__all__ = ["ConjugateGradient"]

BETAS = ("PR+", "FR", "HS")


class ConjugateGradient(LineSearchOptimizer):
    """Nonlinear CG: one direction d = -g + beta d_prev and one line search per step.

    beta is Polak-Ribiere+ (``max(0, g'y / |g_prev|^2)``), Fletcher-Reeves or
    Hestenes-Stiefel.  With stochastic closures, y = g_B(x_k+1) - g_B(x_k) is formed on the
    previous step's mini-batch (both ends of its line search), never across two batches;
    the numerators use the current step's gradient.  With a deterministic closure this is
    textbook CG.

    Restarts (d = -g): on the first step, when d is not a descent direction (g'd >= 0),
    when beta's denominator vanishes, after a line search that found no decrease, and
    every ``restart_every`` steps (default: n, the number of coordinates).

    Initial trial step: ``min(1, 1/|g|_1)`` when there is no previous step, otherwise
    ``alpha_prev * (g_prev'd_prev) / (g'd)`` (N&W eq. 3.60); always capped by ``max_step``.
    ``step(closure)`` returns the closure's first loss; params stay put when the line
    search returns step 0.  ``exact_tol`` is the |phi'| tolerance of ``line_search="exact"``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        line_search: str = "strong_wolfe",
        beta: str = "PR+",
        c1: float = 1e-4,
        c2: float = 0.1,
        max_step: float = DEFAULT_MAX_STEP,
        max_evals: int = 20,
        restart_every: int | None = None,
        exact_tol: float = 1e-10,
    ) -> None:
        if beta not in BETAS:
            raise ValueError(f"beta must be one of {BETAS}, got {beta!r}")
        if restart_every is not None and int(restart_every) < 1:
            raise ValueError(f"restart_every must be >= 1 or None, got {restart_every}")
        defaults = dict(
            line_search=line_search,
            beta=beta,
            c1=c1,
            c2=c2,
            max_step=max_step,
            max_evals=int(max_evals),
            restart_every=restart_every,
            exact_tol=exact_tol,
        )
        super().__init__(params, defaults)

    def _beta(self, g: Tensor, st: dict[str, Any]) -> float | None:
        """beta for the new direction, or None to force a restart."""
        kind = self.param_groups[0]["beta"]
        g_prev, d_prev, y = st["g"], st["d"], st["y"]
        if kind == "HS":
            num, den = float(g.dot(y)), float(d_prev.dot(y))
        else:
            den = float(g_prev.dot(g_prev))
            num = float(g.dot(g)) if kind == "FR" else float(g.dot(y))
        if not (math.isfinite(num) and math.isfinite(den)) or den == 0.0:
            return None
        beta = num / den
        return max(beta, 0.0) if kind == "PR+" else beta

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One CG iteration on ``closure``'s mini-batch; returns the loss at the start."""
        loss, f0, g = self._start(closure)
        group = self.param_groups[0]
        st = self._algo_state
        period = group["restart_every"] or self._numel()

        d: Tensor | None = None
        if st.get("d") is not None and st.get("since_restart", 0) < period:
            beta = self._beta(g, st)
            if beta is not None:
                d = g.neg().add(st["d"], alpha=beta)
                if not float(g.dot(d)) < 0.0:
                    d = None
        restarted = d is None
        if d is None:
            d = g.neg()
        dphi0 = float(g.dot(d))

        step0 = self._first_step(g, group["max_step"])
        prev_step, prev_dphi = st.get("prev_step"), st.get("prev_dphi")
        if prev_step is not None and prev_dphi is not None and dphi0 < 0.0:
            ratio_step = prev_step * prev_dphi / dphi0
            if math.isfinite(ratio_step) and ratio_step > 0.0:
                step0 = min(ratio_step, group["max_step"])

        x0 = self._gather_flat_params()
        res = self._line_search(closure, x0, f0, g, d, step0)  # type: ignore[arg-type]
        if res.step > 0.0 and res.grad is not None:
            st["d"] = d
            st["g"] = g
            st["y"] = res.grad - g
            st["prev_step"] = float(res.step)
            st["prev_dphi"] = dphi0
            st["since_restart"] = 1 if restarted else int(st.get("since_restart", 0)) + 1
        else:  # no decrease found: forget the direction, restart next step
            for key in ("d", "g", "y", "prev_step", "prev_dphi"):
                st.pop(key, None)
            st["since_restart"] = 0
        return loss
