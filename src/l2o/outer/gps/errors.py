"""Exceptions raised by the GPS numerical core."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class GPSError(RuntimeError):
    """Base class of the errors of :mod:`l2o.outer.gps`."""


class NotPositiveDefiniteError(GPSError):
    """Q_uu (the action block of the Q-function) is not positive definite at time step ``t``.

    Raised by :func:`l2o.outer.gps.lqg.backward` instead of returning NaNs; the trust-region dual
    (:func:`l2o.outer.gps.lqg.solve_trust_region`) catches it and increases η.
    """

    def __init__(self, t: int, group: Any = None, detail: str = "") -> None:
        self.t = t
        self.group = group
        self.detail = detail
        where = f"t={t}" if group is None else f"group={group!r}, t={t}"
        msg = f"Q_uu is not positive definite ({where})"
        super().__init__(msg + (f": {detail}" if detail else ""))


class TrustRegionError(GPSError):
    """No Lagrange multiplier η within its bounds gives a PD Q_uu and KL ≤ ε."""

    def __init__(self, message: str, group: Any = None, t: int | None = None) -> None:
        self.group = group
        self.t = t
        super().__init__(message)


class GPSIterationError(GPSError):
    """A GPS iteration failed (sampling, a fit, the LQG or the π-step); names the iteration,
    the stage and, where known, the time step t."""

    def __init__(self, iteration: int, stage: str, message: str, t: int | None = None) -> None:
        self.iteration, self.stage, self.t = iteration, stage, t
        where = f"GPS iteration {iteration}, {stage}" + (f", t={t}" if t is not None else "")
        super().__init__(f"{where}: {message}")

    @staticmethod
    @contextmanager
    def raised_in(iteration: int, stage: str) -> Iterator[None]:
        """Turn a ``ValueError``/``RuntimeError`` of the block into this error for ``stage`` (with
        the original's time step ``t`` if it has one)."""
        try:
            yield
        except (ValueError, RuntimeError) as e:
            raise GPSIterationError(iteration, stage, str(e), t=getattr(e, "t", None)) from e
