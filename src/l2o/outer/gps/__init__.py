"""l2o.outer.gps: the numerical core of Guided Policy Search (Li & Malik 2017, §3.4; design note gps.md).

Time-varying linear-Gaussian policies ψ and dynamics p̃ (:mod:`.linear_gaussian`), dynamics
fitting with a NIW prior (:mod:`.dynamics`), quadratic cost models (:mod:`.cost`) and LQG with a
KL trust region (:mod:`.lqg`). Everything is float64 with time as the leading dimension.
On top: Bregman-ADMM updates (:mod:`.badmm`), the environment interface (:mod:`.env`), the one GPS
iteration (:mod:`.loop`) and its settings: conditions (:mod:`.trainer`) and coordinate groups
(:mod:`.conv_trainer`).
"""

from .badmm import (
    dual_step,
    kl_psi_pi,
    pi_covariance,
    pi_targets,
    update_epsilon,
    update_nu,
    weighted_regression_loss,
)
from .cost import (
    QuadraticCost,
    cost_from_derivatives,
    fit_quadratic_cost,
    fit_quadratic_cost_from_moments,
    project_action_block,
)
from .dynamics import (
    DynamicsPrior,
    GaussianPrior,
    GMMPrior,
    fit_dynamics,
    pooled_transitions,
    transition_samples,
)
from .env import (
    Controller,
    Environment,
    LinearGaussianController,
    LinearQuadraticEnv,
    ModuleController,
    Trajectories,
    as_controller,
)
from .errors import GPSError, GPSIterationError, NotPositiveDefiniteError, TrustRegionError
from .linear_gaussian import (
    LinearGaussianDynamics,
    LinearGaussianPolicy,
    StateDistribution,
    fit_linear_gaussian_policy,
    forward,
    kl_divergence,
)
from .lqg import (
    TrustRegionResult,
    ValueFunction,
    augmented_cost,
    backward,
    expected_cost,
    neg_log_policy_cost,
    solve_fixed_eta,
    solve_trust_region,
)

from .trainer import GPSConfig, GPSTrainer, MultiConditionGPSTrainer

__all__ = [
    "QuadraticCost",
    "cost_from_derivatives",
    "fit_quadratic_cost",
    "fit_quadratic_cost_from_moments",
    "project_action_block",
    "DynamicsPrior",
    "GaussianPrior",
    "GMMPrior",
    "fit_dynamics",
    "pooled_transitions",
    "transition_samples",
    "GPSError",
    "NotPositiveDefiniteError",
    "TrustRegionError",
    "LinearGaussianDynamics",
    "LinearGaussianPolicy",
    "StateDistribution",
    "fit_linear_gaussian_policy",
    "forward",
    "kl_divergence",
    "TrustRegionResult",
    "ValueFunction",
    "augmented_cost",
    "backward",
    "expected_cost",
    "neg_log_policy_cost",
    "solve_fixed_eta",
    "solve_trust_region",
    "dual_step",
    "kl_psi_pi",
    "pi_covariance",
    "pi_targets",
    "update_epsilon",
    "update_nu",
    "weighted_regression_loss",
    "Controller",
    "Environment",
    "LinearGaussianController",
    "LinearQuadraticEnv",
    "ModuleController",
    "Trajectories",
    "as_controller",
    "GPSConfig",
    "GPSIterationError",
    "GPSTrainer",
    "MultiConditionGPSTrainer",
]
