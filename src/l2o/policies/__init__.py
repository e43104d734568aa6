"""Learned update rules as pure functions of their weights (meta-trained elsewhere)."""

from l2o.policies.l2l_lstm import (
    HIDDEN_SIZE,
    OUTPUT_SCALE,
    PREPROCESS_P,
    Hidden,
    init_hidden,
    init_net,
    preprocess_gradient,
    step,
)

__all__ = ["HIDDEN_SIZE", "OUTPUT_SCALE", "PREPROCESS_P", "Hidden", "init_hidden", "init_net", "preprocess_gradient", "step"]
