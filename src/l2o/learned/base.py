"""What every learned optimizer's ``torch.optim`` front end shares."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def params_with_grad(optimizer: torch.optim.Optimizer, name: str) -> Iterator[tuple[int, int, Tensor]]:
    """(group index, index in its group, parameter) for every parameter that has a gradient, in
    order; a parameter without one is skipped (its state is left as is), a sparse gradient is an
    error naming the optimizer."""
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients")
            yield gi, pi, p
