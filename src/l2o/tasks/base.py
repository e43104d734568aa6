"""The task abstraction: an objective function an optimizer is run on.

A task gives named coordinate groups (one per weight matrix or bias vector, as in §3.5 of the
2017 paper), a seeded initial iterate x⁽⁰⁾, the stochastic objective f̂ on a mini-batch drawn by a
seeded generator, and the true objective f on the full training set (the MDP's cost, and what the
paper's figures plot). Losses are pure functions of a ``{group name: tensor}`` mapping, so many
instances can be evaluated at once with ``torch.func.vmap`` (see :func:`batched_value_and_grad`).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Group:
    """A coordinate group: the coordinates of one weight matrix or bias vector."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class Task(abc.ABC):
    """An objective f with coordinate groups, seeded initial iterates and mini-batch sampling.

    Subclasses implement :meth:`init_params` and :meth:`loss`. ``loss(params, None)`` is the true
    objective f (all training examples); ``loss(params, idx)`` is f̂ on the examples ``idx``.
    """

    name: str
    groups: tuple[Group, ...]
    num_examples: int
    batch_size: int | None  # None: deterministic (full-batch) objective

    @abc.abstractmethod
    def init_params(self, seed: int, dtype: torch.dtype = torch.float32) -> Params:
        """The initial iterate x⁽⁰⁾ for ``seed``: one tensor per coordinate group."""

    @abc.abstractmethod
    def loss(self, params: Mapping[str, Tensor], indices: Tensor | None = None) -> Tensor:
        """f̂ on the examples ``indices`` (a 1-D long tensor), or the true f when ``None``."""

    @property
    def dim(self) -> int:
        """Total number of coordinates n."""
        return sum(g.numel for g in self.groups)

    def sample_batch(self, generator: torch.Generator) -> Tensor | None:
        """Indices of one mini-batch, drawn without replacement by ``generator``."""
        if self.batch_size is None:
            return None
        return torch.randperm(self.num_examples, generator=generator)[: self.batch_size]

    @torch.no_grad()
    def true_loss(self, params: Mapping[str, Tensor]) -> float:
        """The true objective f(x) on the full training set, as a Python float."""
        return float(self.loss({k: v.detach() for k, v in params.items()}, None))

    def check_params(self, params: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` naming the group if ``params`` does not match the groups."""
        names = [g.name for g in self.groups]
        if sorted(params) != sorted(names):
            raise ValueError(f"{self.name}: expected parameter groups {names}, got {sorted(params)}")
        for g in self.groups:
            if tuple(params[g.name].shape) != g.shape:
                raise ValueError(
                    f"{self.name}: group {g.name!r} must have shape {g.shape}, "
                    f"got {tuple(params[g.name].shape)}"
                )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={self.dim})"


def value_and_grad(task: Task, params: Mapping[str, Tensor], indices: Tensor | None) -> tuple[Tensor, Params]:
    """(f̂(x), ∇f̂(x)) by ``torch.func`` — a pure function of ``params``."""
    grads, value = torch.func.grad_and_value(task.loss)(dict(params), indices)
    return value, grads


def batched_value_and_grad(
    task: Task, params: Mapping[str, Tensor], indices: Tensor | None
) -> tuple[Tensor, Params]:
    """f̂ and ∇f̂ for M iterates at once: each tensor in ``params`` has a leading dimension M,
    and ``indices`` is an [M, B] tensor of mini-batches (or ``None`` for the full objective)."""
    fn = torch.func.grad_and_value(task.loss)
    in_dims = (0, None if indices is None else 0)
    grads, values = torch.func.vmap(fn, in_dims=in_dims)(dict(params), indices)
    return values, grads


def flatten(params: Mapping[str, Tensor], groups: tuple[Group, ...]) -> Tensor:
    """Concatenate the groups of ``params`` into one vector x (group order)."""
    return torch.cat([params[g.name].reshape(-1) for g in groups])


def unflatten(x: Tensor, groups: tuple[Group, ...]) -> Params:
    """Split a vector x back into ``{group name: tensor}`` (views of x)."""
    out: Params = {}
    i = 0
    for g in groups:
        out[g.name] = x[i : i + g.numel].view(g.shape)
        i += g.numel
    if i != x.numel():
        raise ValueError(f"vector has {x.numel()} entries, groups need {i}")
    return out
