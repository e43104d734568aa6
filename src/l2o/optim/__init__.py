"""Learned optimizers as ``torch.optim.Optimizer`` subclasses (registered with the harness)."""

from l2o.optim.l2l import DEFAULT_CHECKPOINT, L2LBGDBGD
from l2o.optim.psd import PredictedStepDescent

__all__ = ["DEFAULT_CHECKPOINT", "L2LBGDBGD", "PredictedStepDescent"]
