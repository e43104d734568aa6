"""L-BFGS baseline with curvature pairs formed within one mini-batch (torch.optim API)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from l2o.baselines.linesearch import DEFAULT_MAX_STEP, LineSearchOptimizer

__all__ = ["LBFGS"]


class LBFGS(LineSearchOptimizer):
    """Limited-memory BFGS: two-loop recursion with H0 = (s'y / y'y) I, one search per step.

    Unlike ``torch.optim.LBFGS(max_iter=1)``, whose pair y = g_Bnew(x) - g_Bold(x) mixes two
    mini-batches (pure noise), each pair comes from ONE step's mini-batch B:
    g = grad f_B(x_k), the line search along d on the same B gives x_k+1 and
    grad f_B(x_k+1); s = x_k+1 - x_k, y = grad f_B(x_k+1) - grad f_B(x_k).  A pair is
    stored only if s'y > curvature_eps |s||y|, else skipped.

    Trial step 1, or ``min(1, 1/|g|_1)`` while the history is empty (first step), capped
    by ``max_step``.  If the two-loop direction is not a descent direction the history is
    dropped and d = -g; a line search that finds no decrease leaves the params untouched
    and drops the history (next step restarts from scaled steepest descent).
    ``step(closure)`` returns the closure's first loss.  With ``line_search="exact"`` and
    history >= n, L-BFGS on a quadratic coincides with CG and terminates in n steps.
    """

    def __init__(
        self,
        params: Iterable[Any],
        history_size: int = 10,
        line_search: str = "strong_wolfe",
        c1: float = 1e-4,
        c2: float = 0.9,
        max_step: float = DEFAULT_MAX_STEP,
        max_evals: int = 20,
        curvature_eps: float = 1e-8,
        exact_tol: float = 1e-10,
    ) -> None:
        if int(history_size) < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        defaults = dict(
            history_size=int(history_size),
            line_search=line_search,
            c1=c1,
            c2=c2,
            max_step=max_step,
            max_evals=int(max_evals),
            curvature_eps=curvature_eps,
            exact_tol=exact_tol,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _two_loop(g: Tensor, old_s: list[Tensor], old_y: list[Tensor]) -> Tensor:
        """d = -H g by the two-loop recursion (N&W Alg. 7.4), H0 = (s'y / y'y) I."""
        q = g.neg()
        if not old_s:
            return q
        rho = [1.0 / s.dot(y) for s, y in zip(old_s, old_y)]
        alphas = [q.new_zeros(())] * len(old_s)
        for i in reversed(range(len(old_s))):
            alphas[i] = rho[i] * old_s[i].dot(q)
            q = q.sub(old_y[i] * alphas[i])
        s_last, y_last = old_s[-1], old_y[-1]
        r = q * (s_last.dot(y_last) / y_last.dot(y_last))
        for i in range(len(old_s)):
            b = rho[i] * old_y[i].dot(r)
            r = r.add(old_s[i] * (alphas[i] - b))
        return r

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One L-BFGS iteration on ``closure``'s mini-batch; returns the loss at the start."""
        loss, f0, g = self._start(closure)
        group = self.param_groups[0]
        st = self._algo_state
        old_s: list[Tensor] = list(st.get("old_s", []))
        old_y: list[Tensor] = list(st.get("old_y", []))

        d = self._two_loop(g, old_s, old_y)
        if old_s and not float(g.dot(d)) < 0.0:  # numerical loss of positive definiteness
            old_s, old_y = [], []
            d = g.neg()
        step0 = 1.0 if old_s else self._first_step(g, group["max_step"])

        x0 = self._gather_flat_params()
        res = self._line_search(closure, x0, f0, g, d, step0)
        if res.step > 0.0 and res.grad is not None:
            s = self._gather_flat_params() - x0
            y = res.grad - g
            sy = float(s.dot(y))
            if math.isfinite(sy) and sy > group["curvature_eps"] * float(s.norm()) * float(y.norm()):
                old_s.append(s)
                old_y.append(y)
                if len(old_s) > group["history_size"]:
                    old_s.pop(0)
                    old_y.pop(0)
        else:
            old_s, old_y = [], []
        st["old_s"], st["old_y"] = old_s, old_y
        return loss
