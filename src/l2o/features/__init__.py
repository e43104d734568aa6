"""Features: the state Φ and observation Ψ of Convolutional GPS (Li & Malik 2017, §3.6)."""

from l2o.features.conv2017 import (
    PHI_DIM,
    PSI_DIM,
    STATE_DIM,
    average_recent,
    observation_features,
    observation_step,
    state_features,
    states,
)

__all__ = ["PHI_DIM", "PSI_DIM", "STATE_DIM", "average_recent", "observation_features", "observation_step",
           "state_features", "states"]
