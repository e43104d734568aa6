"""Learned optimizers meta-trained by the outer trainers of :mod:`l2o.outer` (``mlp-lopt``)."""

from l2o.learned.mlp_lopt import MLPLOpt, MLPLOptArch, init_theta, load_policy, policy_step, save_policy

__all__ = ["MLPLOpt", "MLPLOptArch", "init_theta", "load_policy", "policy_step", "save_policy"]
