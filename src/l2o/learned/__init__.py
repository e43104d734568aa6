"""Learned optimizers: each in one module with its policy, its ``torch.optim`` front end and its
checkpoint format (features live in :mod:`l2o.features`; the meta-trainers in :mod:`l2o.outer`).

- :mod:`.l2l`: L2LBGDBGD, the coordinate-wise LSTM of Andrychowicz et al. (2016);
- :mod:`.psd`: Predicted Step Descent (Li & Malik 2017);
- :mod:`.lto2016`: the learned optimizer of Learning to Optimize (Li & Malik 2016);
- :mod:`.mlp_lopt`: a small per-coordinate MLP learned optimizer (``mlp-lopt``).

Importing this package registers all four with the harness (:mod:`l2o.baselines.registry`), in
this order; the harness finds them through the ``l2o.optimizers`` entry points.
"""

from l2o.learned.l2l import DEFAULT_CHECKPOINT, L2LBGDBGD
from l2o.learned.psd import PredictedStepDescent
from l2o.learned.lto2016 import LearnedOptimizer2016
from l2o.learned.mlp_lopt import MLPLOpt

__all__ = ["DEFAULT_CHECKPOINT", "L2LBGDBGD", "LearnedOptimizer2016", "MLPLOpt", "PredictedStepDescent"]
