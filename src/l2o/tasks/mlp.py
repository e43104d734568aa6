"""Two-layer MLP classifiers on randomly projected, normalised datasets (Li & Malik 2017, §4).

The paper's objective: a neural net with ``input`` inputs, ``hidden`` hidden units and one output
per class, trained with softmax cross-entropy on a dataset randomly projected to ``input``
dimensions and normalised to unit variance in each dimension. The projection seed is part of the
task's identity. CHOICES the paper leaves open, stated here: ReLU hidden units (the paper's
example of structure a learned optimizer should exploit); projection by a Gaussian matrix with
entries N(0, 1/P) applied to pixels scaled to [0, 1]; each projected dimension standardised to
zero mean and unit variance over the split; weights initialised N(0, 1/fan_in), biases zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from l2o.tasks.base import Group, Params, Task


@dataclass(frozen=True)
class ProjectedData:
    """Examples X ∈ R^{N×input} (standardised) and integer labels y."""

    inputs: Tensor
    targets: Tensor
    num_classes: int
    description: str


def project(
    images: np.ndarray, labels: np.ndarray, num_classes: int, dim: int, seed: int, description: str = ""
) -> ProjectedData:
    """Randomly project flattened images to ``dim`` dimensions and standardise each dimension."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if dim < 1:
        raise ValueError(f"projection dimension must be positive, got {dim}")
    x = torch.from_numpy(np.ascontiguousarray(images.reshape(images.shape[0], -1))).to(torch.float64) / 255.0
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(x.shape[1], dim, generator=g, dtype=torch.float64) / math.sqrt(x.shape[1])
    z = x @ proj
    std = z.std(dim=0, keepdim=True)
    z = (z - z.mean(dim=0, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))
    y = torch.from_numpy(labels.astype(np.int64))
    desc = f"{description}, randomly projected to {dim} dims (seed {seed}), standardised"
    return ProjectedData(z.to(torch.float32).contiguous(), y, num_classes, desc)


class MLPClassifierTask(Task):
    """f(W1, b1, W2, b2) = mean cross-entropy of softmax(W2 relu(W1 x + b1) + b2), + (l2/2)|W|².

    Coordinate groups: ``W1`` [hidden, input], ``b1`` [hidden], ``W2`` [classes, hidden],
    ``b2`` [classes] — one per weight matrix or bias vector, as in Convolutional GPS.
    """

    def __init__(
        self,
        data: ProjectedData,
        hidden: int,
        batch_size: int | None,
        name: str,
        l2: float = 0.0,
    ) -> None:
        if hidden < 1:
            raise ValueError(f"hidden units must be positive, got {hidden}")
        if batch_size is not None and not 1 <= batch_size <= data.inputs.shape[0]:
            raise ValueError(f"batch size must be in [1, {data.inputs.shape[0]}], got {batch_size}")
        self.data = data
        self.name = name
        self.l2 = l2
        self.batch_size = batch_size
        self.num_examples = data.inputs.shape[0]
        d_in, k = data.inputs.shape[1], data.num_classes
        self.groups = (
            Group("W1", (hidden, d_in)),
            Group("b1", (hidden,)),
            Group("W2", (k, hidden)),
            Group("b2", (k,)),
        )

    def init_params(self, seed: int, dtype: torch.dtype = torch.float32) -> Params:
        g = torch.Generator().manual_seed(seed)
        out: Params = {}
        for grp in self.groups:
            if len(grp.shape) == 2:
                out[grp.name] = (torch.randn(grp.shape, generator=g, dtype=torch.float64) / math.sqrt(grp.shape[1])).to(dtype)
            else:
                out[grp.name] = torch.zeros(grp.shape, dtype=dtype)
        return out

    def loss(self, params: Mapping[str, Tensor], indices: Tensor | None = None) -> Tensor:
        dtype = params["W1"].dtype
        x = self.data.inputs if indices is None else self.data.inputs[indices]
        y = self.data.targets if indices is None else self.data.targets[indices]
        x = x.to(dtype)
        h = torch.relu(x @ params["W1"].T + params["b1"])
        logits = h @ params["W2"].T + params["b2"]
        value = torch.nn.functional.cross_entropy(logits, y)
        if self.l2:
            value = value + 0.5 * self.l2 * (params["W1"].square().sum() + params["W2"].square().sum())
        return value
