"""Tasks: the objective functions optimizers are run on (see :mod:`l2o.tasks.base`)."""

from l2o.tasks.base import Group, Params, Task, batched_value_and_grad, flatten, unflatten, value_and_grad
from l2o.tasks.mlp import MLPClassifierTask, ProjectedData, project
from l2o.tasks.registry import META_TRAINING_TASK, MLPTaskSpec, make_task, parse_task
from l2o.tasks.synthetic import (
    FAMILIES,
    LogisticRegressionFamily,
    RobustLinearRegressionFamily,
    SmallNetFamily,
)

__all__ = [
    "FAMILIES",
    "META_TRAINING_TASK",
    "Group",
    "LogisticRegressionFamily",
    "MLPClassifierTask",
    "MLPTaskSpec",
    "Params",
    "ProjectedData",
    "RobustLinearRegressionFamily",
    "SmallNetFamily",
    "Task",
    "batched_value_and_grad",
    "flatten",
    "make_task",
    "parse_task",
    "project",
    "unflatten",
    "value_and_grad",
]
