"""l2o: learned optimizers (Li & Malik 2016, 2017)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["PredictedStepDescent", "__version__", "make_optimizer"]


def make_optimizer(spec: str, params: Any) -> Any:
    """Build any optimizer of the harness from its spec string, e.g. ``make_optimizer("adam:lr=0.01",
    model.parameters())`` or ``make_optimizer("mlp-lopt", model.parameters())`` (learned optimizers
    load their packaged weights; ``"mlp-lopt:checkpoint=PATH"`` another file). A bare baseline name
    (``"adagrad"``) uses its tuned settings (``l2o/baselines/tuned.json``), as ``l2o benchmark`` does."""
    from l2o.baselines.registry import parse_optimizer

    text = spec.strip()
    if ":" not in text:
        from l2o.baselines.tuned import load_tuned

        tuned = load_tuned()
        if text in tuned.settings:
            return tuned.spec(text).build(params)
    return parse_optimizer(text).build(params)


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import l2o`` stays light (no torch import until an optimizer is asked for).
    if name == "PredictedStepDescent":
        from l2o.learned.psd import PredictedStepDescent

        return PredictedStepDescent
    raise AttributeError(f"module 'l2o' has no attribute {name!r}")
