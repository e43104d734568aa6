"""l2o: learned optimizers (Li & Malik 2016, 2017)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["PredictedStepDescent", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import l2o`` stays light (no torch import until an optimizer is asked for).
    if name == "PredictedStepDescent":
        from l2o.optim.psd import PredictedStepDescent

        return PredictedStepDescent
    raise AttributeError(f"module 'l2o' has no attribute {name!r}")
