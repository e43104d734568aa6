"""``l2o meta-train mlp-lopt``: Persistent ES on ``mlp-lopt``'s θ over MNIST MLP optimizees.

Starts from the AdaGrad-equivalent θ₀ (:func:`l2o.learned.mlp_lopt.init_theta`) or from the θ of
an ``init_from`` checkpoint, runs :class:`l2o.outer.pes.PESTrainer` on
:class:`l2o.outer.lopt.MLPLOptProblem` (one ``task``) or :class:`l2o.outer.lopt.MLPLOptMixture`
(a mixture of MNIST ``tasks``, e.g. one net at batch sizes 64 and 10) for ``steps`` outer steps,
checkpoints into OUT/checkpoint.safetensors (exact resume), logs one line per outer step to
OUT/log.jsonl and exports the current θ as OUT/mlp-lopt.safetensors (+ .json) at every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from l2o.config import check_field_types, check_keys, read_config_file
from l2o.learned.mlp_lopt import (MLPLOptArch, flat_to_theta, init_theta, load_policy, save_policy,
                                  theta_to_flat, with_snr)
from l2o.outer.base import cli_meta_train, OuterRunResult, config_resume_check, run_outer
from l2o.outer.lopt import MLPLOptMixture, MLPLOptProblem
from l2o.outer.pes import PESFields, PESTrainer, centred_ranks, training_info

TRAIN_KIND = "l2o-meta-mlp-lopt-train"
POLICY_NAME = "mlp-lopt.safetensors"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_RESUME_MAY_CHANGE = frozenset({"steps", "data_dir", "checkpoint_every"})


@dataclass(frozen=True)
class MetaMLPLOptConfig(PESFields):
    """What to meta-train (``configs/mlp-lopt-pes.toml``).

    Architecture: ``hidden`` (≤ 32), ``base_lr`` α₀, ``mlp_scale`` α₁, ``snr`` (the step size also
    reads the per-tensor signal-to-noise ratio ρ, :mod:`l2o.learned.mlp_lopt`), ``init_seed`` (W1's draw).
    PES (:class:`~l2o.outer.pes.PESFields`): ``n_pairs`` N, ``sigma`` σ, ``truncation`` W,
    ``horizon`` T, ``persistent``, ``stagger``, ``rank_shaping``, ``meta_lr`` (Adam on θ),
    ``loss_clip`` (0 = off). Budget: ``steps`` outer steps; ``checkpoint_every`` outer steps per
    checkpoint; ``seed`` seeds every draw.

    Tasks: ``task`` (one spec), or ``tasks``, a list of MNIST MLP specs (any nets and batch sizes,
    e.g. ``["mnist:48-48:b64", "mnist:48-48:b10"]``) among which the particles are assigned
    round-robin (needs ``n_pairs`` ≥ the number of tasks); ``tasks`` replaces ``task`` (a config
    file may give only one of the two). ``init_from``: a policy (``mlp-lopt.safetensors``) or PES
    training checkpoint whose θ starts the run instead of θ₀ (its arch must equal this one's, except
    that a θ without the snr term starts an ``snr`` run with c₄ = 0: the same optimizer).
    With ``tasks``, ``rank_shaping`` ranks within each task's particles (tasks weigh equally);
    without it the raw losses are used, and the task whose loss reacts most to θ dominates.
    """

    task: str = "mnist:48-48:b64"
    tasks: list[str] | None = None
    init_from: str | None = None
    hidden: int = 32
    base_lr: float = 0.1
    mlp_scale: float = 0.01
    snr: bool = False
    init_seed: int = 0
    # the PES fields are PESFields'; these override its defaults
    loss_clip: float = 10.0
    steps: int = 1000
    checkpoint_every: int = 1
    seed: int = 0
    dtype: str = "float32"
    threads: int = 1
    data_dir: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "mlp-lopt")
        for name in ("steps", "checkpoint_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"mlp-lopt config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "init_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"mlp-lopt config: {name} must be >= 0, got {getattr(self, name)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"mlp-lopt config: dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.tasks is not None:
            _check_mixture(self.tasks, self.n_pairs)
        try:
            self.arch, self.pes  # noqa: B018 - validates both
        except ValueError as e:
            raise ValueError(f"mlp-lopt config: {e}") from e

    @property
    def task_specs(self) -> list[str]:
        """The meta-training task specs: ``tasks``, or ``[task]``."""
        return list(self.tasks) if self.tasks is not None else [self.task]

    @property
    def arch(self) -> MLPLOptArch:
        return MLPLOptArch(hidden=self.hidden, base_lr=self.base_lr, mlp_scale=self.mlp_scale, snr=self.snr)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetaMLPLOptConfig:
        """Build from a mapping (e.g. parsed TOML), rejecting unknown keys by name."""
        check_keys(cls, dict(d), "mlp-lopt")
        if "task" in d and "tasks" in d:
            raise ValueError("mlp-lopt config: give either task (one) or tasks (a mixture), not both")
        return cls(**dict(d))

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> MetaMLPLOptConfig:
        return cls.from_dict(read_config_file(path, overrides))


def _check_mixture(tasks: Any, n_pairs: int) -> None:
    """``tasks`` must be a non-empty list of distinct mini-batch MNIST MLP specs (any nets and batch
    sizes), at most ``n_pairs`` of them (every task needs a particle)."""
    from l2o.tasks.registry import MLPTaskSpec, parse_task

    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"mlp-lopt config: tasks must be a list of task spec strings, got {tasks!r}")
    if not tasks:
        raise ValueError("mlp-lopt config: tasks is empty; give at least one MNIST task, e.g. [\"mnist:48-48:b64\"]")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"mlp-lopt config: tasks lists a task twice: {tasks!r}")
    for spec in tasks:
        try:
            parsed = parse_task(spec)
        except ValueError as e:
            raise ValueError(f"mlp-lopt config: tasks: {e}") from e
        if not isinstance(parsed, MLPTaskSpec) or parsed.dataset != "mnist":
            raise ValueError(f"mlp-lopt config: tasks: {spec!r} is not an MNIST MLP task; meta-training may only "
                             f"use MNIST tasks (DATASET:IN-HIDDEN:bBATCH with DATASET = mnist)")
        if parsed.batch_size is None:
            raise ValueError(f"mlp-lopt config: tasks: {spec!r} is full-batch; meta-training needs mini-batch tasks")
    if len(tasks) > n_pairs:
        raise ValueError(f"mlp-lopt config: {len(tasks)} tasks need n_pairs >= {len(tasks)} (one particle each), "
                         f"got n_pairs = {n_pairs}")


class _Trainer(PESTrainer):
    """PES; on a mixture, also logs each task's meta-loss (``meta_loss_by_task``), and
    ``rank_shaping`` ranks the losses within each task's particles (each task's pairs then weigh
    the same in ĝ, whatever the scale or sensitivity of its loss)."""

    kind = TRAIN_KIND
    _last_loss: Any = None

    def score(self, L: Any) -> Any:
        if not (self.config.rank_shaping and isinstance(self.problem, MLPLOptMixture)):
            return super().score(L)
        task_of = self.problem.assignment(self.config.n_pairs)
        out = torch.empty_like(L)
        for k in range(len(self.problem.problems)):
            sel = task_of == k
            out[:, sel] = centred_ranks(L[:, sel])
        return out

    def _unroll(self, theta_pm: Any) -> Any:
        self._last_loss = L = super()._unroll(theta_pm)
        return L

    def estimate(self) -> tuple[Any, dict[str, Any]]:
        ghat, info = super().estimate()
        if isinstance(self.problem, MLPLOptMixture):
            task_of = self.problem.assignment(self.config.n_pairs)
            info["meta_loss_by_task"] = {name: float(self._last_loss[:, task_of == k].mean())
                                         for k, name in enumerate(self.problem.names)}
        return ghat, info


def initial_theta(config: MetaMLPLOptConfig) -> torch.Tensor:
    """θ₀ [D]: the AdaGrad-equivalent init, or the θ of ``config.init_from``."""
    dtype, arch = _DTYPES[config.dtype], config.arch
    if config.init_from is None:
        return theta_to_flat(init_theta(arch, config.init_seed, dtype))
    theta, saved_arch, _ = load_policy(config.init_from)
    if arch.snr and saved_arch == dataclasses.replace(arch, snr=False):
        theta, saved_arch = with_snr(theta, saved_arch)  # c₄ = 0: starts as the same optimizer
    if saved_arch != arch:
        raise ValueError(f"mlp-lopt config: init_from {config.init_from} has arch {saved_arch}, the config's is {arch}")
    return theta_to_flat(theta).to(dtype)


def build_trainer(config: MetaMLPLOptConfig, task: Any = None) -> PESTrainer:
    """The PES trainer for ``config`` at its θ₀. ``task`` (a :class:`~l2o.tasks.base.Task`, or a list
    of them for a mixture, e.g. in tests) overrides ``config.task``/``config.tasks``."""
    if task is None:
        from l2o.tasks.registry import make_task

        task = [make_task(s, data_dir=config.data_dir) for s in config.task_specs]
        if config.tasks is None:
            task = task[0]
    dtype = _DTYPES[config.dtype]
    arch = config.arch
    if isinstance(task, (list, tuple)):
        if len(task) > config.n_pairs:
            raise ValueError(f"mlp-lopt: {len(task)} tasks need n_pairs >= {len(task)}")
        problems = [MLPLOptProblem(t, arch, dtype) for t in task]
        problem: Any = problems[0] if len(problems) == 1 else MLPLOptMixture(problems)
    else:
        problem = MLPLOptProblem(task, arch, dtype)
    return _Trainer(problem, config.pes, initial_theta(config), seed=config.seed)


def meta_train(config: MetaMLPLOptConfig, out: str | os.PathLike, *, resume: bool = False, progress: bool = True,
               stop_after: int | None = None, task: Any = None, command: str | None = None) -> OuterRunResult:
    """Meta-train θ by PES; see the module docstring for the files written into ``out``."""
    out = Path(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        trainer = build_trainer(config, task)
        arch = config.arch
        meta = {"config": asdict(config), "arch": asdict(arch), "command": command, "torch": torch.__version__}

        def export(tr: Any, step: int, log: list[dict[str, Any]], wall: float) -> None:
            start = "the AdaGrad-equivalent θ₀" if config.init_from is None else f"the θ of {config.init_from}"
            info = {"method": f"Persistent ES (Vicol et al. 2021) from {start}",
                    **training_info(step, wall, log, asdict(config), command)}
            save_policy(out / POLICY_NAME, flat_to_theta(tr.theta.to(torch.float32), arch), arch, info)

        return run_outer(trainer, out, config.steps, meta=meta, resume=resume, checkpoint_every=config.checkpoint_every,
                         stop_after=stop_after, progress=progress, desc="meta-train mlp-lopt (PES)",
                         on_checkpoint=export,
                         resume_check=config_resume_check(out, asdict(config), _RESUME_MAY_CHANGE,
                                                          defaults={"snr": False, "late_weight": 0.0}))
    finally:
        torch.set_num_threads(threads)


def cli_run(args: Any) -> int:
    """``l2o meta-train mlp-lopt``: :func:`l2o.outer.base.cli_meta_train` with this trainer."""
    return cli_meta_train(args, "mlp-lopt", MetaMLPLOptConfig, meta_train, POLICY_NAME)
