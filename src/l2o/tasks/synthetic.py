"""The objective families of Learning to Optimize (Li & Malik 2016), sampled from seeds.

Each family draws a small synthetic dataset per problem instance; the objective is deterministic
(full batch). Train and test instances come from disjoint seed streams, so a problem used for
meta-training is never an evaluation problem. Constants follow the 2016 paper's description
(3-D data, 100 points, ℓ₂ weight 5e-4, Geman–McClure with c = 1, 2 hidden ReLU units); they are
fields of each family's dataclass so a study can vary them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from l2o.tasks.base import Group, Params, Task

_SPLIT_OFFSET = {"train": 0, "test": 1_000_003}


def _instance_generator(family: str, split: str, index: int, base_seed: int) -> torch.Generator:
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if index < 0:
        raise ValueError(f"instance index must be >= 0, got {index}")
    tag = sum(ord(c) * 31**i for i, c in enumerate(family)) % 100_003
    return torch.Generator().manual_seed(base_seed * 10_000_019 + tag * 2_000_029 + _SPLIT_OFFSET[split] + index)


def _random_gaussian(g: torch.Generator, n: int, dim: int, mean_scale: float) -> Tensor:
    """n points from N(μ, Σ) with μ ~ N(0, mean_scale² I) and Σ = LLᵀ, L random."""
    mu = torch.randn(dim, generator=g, dtype=torch.float64) * mean_scale
    L = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    return mu + torch.randn(n, dim, generator=g, dtype=torch.float64) @ L.T


class _DatasetTask(Task):
    """A full-batch task on a fixed (inputs, targets) dataset with Gaussian initial iterates."""

    init_scale: float = 1.0

    def __init__(self, name: str, inputs: Tensor, targets: Tensor, groups: tuple[Group, ...]) -> None:
        self.name = name
        self.inputs = inputs
        self.targets = targets
        self.groups = groups
        self.num_examples = inputs.shape[0]
        self.batch_size = None

    def init_params(self, seed: int, dtype: torch.dtype = torch.float32) -> Params:
        g = torch.Generator().manual_seed(seed)
        return {
            grp.name: (torch.randn(grp.shape, generator=g, dtype=torch.float64) * self.init_scale).to(dtype)
            for grp in self.groups
        }

    def _data(self, indices: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        x = self.inputs if indices is None else self.inputs[indices]
        y = self.targets if indices is None else self.targets[indices]
        return x.to(dtype), y


class LogisticRegressionTask(_DatasetTask):
    """f(w, b) = mean log(1 + exp(−y' (wᵀx + b))) + (l2/2)|w|², labels y ∈ {0, 1}."""

    def __init__(self, name: str, inputs: Tensor, targets: Tensor, l2: float) -> None:
        d = inputs.shape[1]
        super().__init__(name, inputs, targets, (Group("w", (d,)), Group("b", (1,))))
        self.l2 = l2

    def loss(self, params: Mapping[str, Tensor], indices: Tensor | None = None) -> Tensor:
        x, y = self._data(indices, params["w"].dtype)
        z = x @ params["w"] + params["b"]
        value = torch.nn.functional.binary_cross_entropy_with_logits(z, y.to(z.dtype))
        return value + 0.5 * self.l2 * params["w"].square().sum()


class RobustLinearRegressionTask(_DatasetTask):
    """Geman–McClure regression: f(w, b) = mean r²/(c² + r²), r = y − wᵀx − b."""

    def __init__(self, name: str, inputs: Tensor, targets: Tensor, c: float) -> None:
        d = inputs.shape[1]
        super().__init__(name, inputs, targets, (Group("w", (d,)), Group("b", (1,))))
        self.c = c

    def loss(self, params: Mapping[str, Tensor], indices: Tensor | None = None) -> Tensor:
        x, y = self._data(indices, params["w"].dtype)
        r2 = (y.to(x.dtype) - x @ params["w"] - params["b"]).square()
        return (r2 / (self.c**2 + r2)).mean()


class SmallNetTask(_DatasetTask):
    """A two-layer ReLU net classifier: mean cross-entropy + (l2/2)(|W1|² + |W2|²)."""

    init_scale = 0.5

    def __init__(self, name: str, inputs: Tensor, targets: Tensor, hidden: int, classes: int, l2: float) -> None:
        d = inputs.shape[1]
        groups = (Group("W1", (hidden, d)), Group("b1", (hidden,)), Group("W2", (classes, hidden)), Group("b2", (classes,)))
        super().__init__(name, inputs, targets, groups)
        self.l2 = l2

    def loss(self, params: Mapping[str, Tensor], indices: Tensor | None = None) -> Tensor:
        x, y = self._data(indices, params["W1"].dtype)
        h = torch.relu(x @ params["W1"].T + params["b1"])
        value = torch.nn.functional.cross_entropy(h @ params["W2"].T + params["b2"], y)
        return value + 0.5 * self.l2 * (params["W1"].square().sum() + params["W2"].square().sum())


@dataclass(frozen=True)
class LogisticRegressionFamily:
    """Two classes, each ``points // 2`` samples of a random Gaussian in R^dim (2016 paper)."""

    dim: int = 3
    points: int = 100
    l2: float = 5e-4
    seed: int = 0
    name: str = "logreg"

    def sample(self, split: str, index: int) -> LogisticRegressionTask:
        g = _instance_generator(self.name, split, index, self.seed)
        half = self.points // 2
        x = torch.cat([_random_gaussian(g, half, self.dim, 1.0), _random_gaussian(g, self.points - half, self.dim, 1.0)])
        y = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(self.points - half, dtype=torch.long)])
        return LogisticRegressionTask(f"{self.name}/{split}/{index}", x, y, self.l2)


@dataclass(frozen=True)
class RobustLinearRegressionFamily:
    """``clusters`` random Gaussian clusters, each with its own random linear map y = wᵀx + b + noise."""

    dim: int = 3
    clusters: int = 4
    points_per_cluster: int = 25
    noise: float = 0.1
    c: float = 1.0
    seed: int = 0
    name: str = "robust-linreg"

    def sample(self, split: str, index: int) -> RobustLinearRegressionTask:
        g = _instance_generator(self.name, split, index, self.seed)
        xs, ys = [], []
        for _ in range(self.clusters):
            x = _random_gaussian(g, self.points_per_cluster, self.dim, 1.0)
            w = torch.randn(self.dim, generator=g, dtype=torch.float64)
            b = torch.randn((), generator=g, dtype=torch.float64)
            ys.append(x @ w + b + self.noise * torch.randn(self.points_per_cluster, generator=g, dtype=torch.float64))
            xs.append(x)
        return RobustLinearRegressionTask(f"{self.name}/{split}/{index}", torch.cat(xs), torch.cat(ys), self.c)


@dataclass(frozen=True)
class SmallNetFamily:
    """Each class a mixture of ``clusters_per_class`` random Gaussians in R^dim; a ReLU net with
    ``hidden`` units classifies them."""

    dim: int = 2
    classes: int = 2
    clusters_per_class: int = 2
    points_per_cluster: int = 25
    hidden: int = 2
    l2: float = 5e-4
    seed: int = 0
    name: str = "smallnet"

    def sample(self, split: str, index: int) -> SmallNetTask:
        g = _instance_generator(self.name, split, index, self.seed)
        xs, ys = [], []
        for k in range(self.classes):
            for _ in range(self.clusters_per_class):
                xs.append(_random_gaussian(g, self.points_per_cluster, self.dim, 2.0))
                ys.append(torch.full((self.points_per_cluster,), k, dtype=torch.long))
        return SmallNetTask(
            f"{self.name}/{split}/{index}", torch.cat(xs), torch.cat(ys), self.hidden, self.classes, self.l2
        )


FAMILIES = {
    "logreg": LogisticRegressionFamily,
    "robust-linreg": RobustLinearRegressionFamily,
    "smallnet": SmallNetFamily,
}
