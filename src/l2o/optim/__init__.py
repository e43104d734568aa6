"""Learned optimizers as ``torch.optim.Optimizer`` subclasses (registered with the harness)."""

from l2o.optim.l2l import DEFAULT_CHECKPOINT, L2LBGDBGD

__all__ = ["DEFAULT_CHECKPOINT", "L2LBGDBGD"]
