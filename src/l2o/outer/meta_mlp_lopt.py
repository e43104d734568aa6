"""``l2o meta-train mlp-lopt``: Persistent ES on ``mlp-lopt``'s θ over MNIST MLP optimizees.

Starts from the AdaGrad-equivalent θ₀ (:func:`l2o.learned.mlp_lopt.init_theta`), runs
:class:`l2o.outer.pes.PESTrainer` on :class:`l2o.outer.lopt.MLPLOptProblem` for ``steps`` outer
steps, checkpoints into OUT/checkpoint.safetensors (exact resume), logs one line per outer step to
OUT/log.jsonl and exports the current θ as OUT/mlp-lopt.safetensors (+ .json) at every checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from l2o.config import check_field_types, check_keys, read_config_file
from l2o.learned.mlp_lopt import MLPLOptArch, flat_to_theta, init_theta, save_policy, theta_to_flat
from l2o.outer.base import OuterRunResult, run_outer
from l2o.outer.lopt import MLPLOptProblem
from l2o.outer.pes import PESConfig, PESTrainer

TRAIN_KIND = "l2o-meta-mlp-lopt-train"
POLICY_NAME = "mlp-lopt.safetensors"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_RESUME_MAY_CHANGE = frozenset({"steps", "data_dir", "checkpoint_every"})


@dataclass(frozen=True)
class MetaMLPLOptConfig:
    """What to meta-train (``configs/mlp-lopt-pes.toml``).

    Architecture: ``hidden`` (≤ 32), ``base_lr`` α₀, ``mlp_scale`` α₁, ``init_seed`` (W1's draw).
    PES: ``n_pairs`` N, ``sigma`` σ, ``truncation`` W, ``horizon`` T, ``persistent``, ``stagger``,
    ``rank_shaping``, ``meta_lr`` (Adam on θ), ``loss_clip`` (0 = off). Budget: ``steps`` outer
    steps; ``checkpoint_every`` outer steps per checkpoint; ``seed`` seeds every draw.
    """

    task: str = "mnist:48-48:b64"
    hidden: int = 32
    base_lr: float = 0.1
    mlp_scale: float = 0.01
    init_seed: int = 0
    n_pairs: int = 8
    sigma: float = 0.01
    truncation: int = 20
    horizon: int = 400
    persistent: bool = True
    stagger: bool = True
    rank_shaping: bool = False
    meta_lr: float = 1e-3
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
        try:
            self.arch, self.pes  # noqa: B018 - validates both
        except ValueError as e:
            raise ValueError(f"mlp-lopt config: {e}") from e

    @property
    def arch(self) -> MLPLOptArch:
        return MLPLOptArch(hidden=self.hidden, base_lr=self.base_lr, mlp_scale=self.mlp_scale)

    @property
    def pes(self) -> PESConfig:
        return PESConfig(n_pairs=self.n_pairs, sigma=self.sigma, truncation=self.truncation, horizon=self.horizon,
                         persistent=self.persistent, stagger=self.stagger, rank_shaping=self.rank_shaping,
                         meta_lr=self.meta_lr, loss_clip=self.loss_clip)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetaMLPLOptConfig:
        """Build from a mapping (e.g. parsed TOML), rejecting unknown keys by name."""
        check_keys(cls, dict(d), "mlp-lopt")
        return cls(**dict(d))

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> MetaMLPLOptConfig:
        return cls.from_dict(read_config_file(path, overrides))


class _Trainer(PESTrainer):
    kind = TRAIN_KIND


def build_trainer(config: MetaMLPLOptConfig, task: Any = None) -> PESTrainer:
    """The PES trainer for ``config`` at θ₀ (``task`` overrides ``config.task``, e.g. in tests)."""
    if task is None:
        from l2o.tasks.registry import make_task

        task = make_task(config.task, data_dir=config.data_dir)
    dtype = _DTYPES[config.dtype]
    arch = config.arch
    problem = MLPLOptProblem(task, arch, dtype)
    theta0 = theta_to_flat(init_theta(arch, config.init_seed, dtype))
    return _Trainer(problem, config.pes, theta0, seed=config.seed)


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

        def check(saved: Mapping[str, Any]) -> None:
            old = saved.get("config", {})
            new = asdict(config)
            diff = sorted(k for k in new if k not in _RESUME_MAY_CHANGE and old.get(k) != new[k])
            if diff:
                detail = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
                raise ValueError(f"cannot resume {out}: config differs from the checkpoint's ({detail})")

        def export(tr: Any, step: int, log: list[dict[str, Any]], wall: float) -> None:
            tail = [r["meta_loss"] for r in log[-100:] if r.get("meta_loss") is not None]
            info = {"method": "Persistent ES (Vicol et al. 2021) from the AdaGrad-equivalent θ₀",
                    "outer_steps": step, "wall_s": round(wall, 2), "config": asdict(config), "command": command,
                    "meta_loss_mean_last100": sum(tail) / len(tail) if tail else None,
                    "meta_loss_definition": "mean mini-batch loss f̂(x_t) over a truncation of W steps, "
                                            "averaged over the 2N branches", "torch": torch.__version__}
            save_policy(out / POLICY_NAME, flat_to_theta(tr.theta.to(torch.float32), arch), arch, info)

        return run_outer(trainer, out, config.steps, meta=meta, resume=resume, checkpoint_every=config.checkpoint_every,
                         stop_after=stop_after, progress=progress, desc="meta-train mlp-lopt (PES)",
                         on_checkpoint=export, resume_check=check)
    finally:
        torch.set_num_threads(threads)


def cli_run(args: Any) -> int:
    """``l2o meta-train mlp-lopt --config FILE --out DIR [--iterations N] [--data-dir DIR] [--resume]``
    (``--iterations`` overrides the config's outer-step budget ``steps``)."""
    import shlex

    overrides = {"data_dir": args.data_dir, "steps": args.iterations}
    if args.config:
        config = MetaMLPLOptConfig.from_file(Path(args.config), **overrides)
    else:
        config = MetaMLPLOptConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out or "runs/meta-train-mlp-lopt")
    words = ["l2o", "meta-train", "mlp-lopt"] + (["--config", args.config] if args.config else []) + ["--out", str(out)]
    if args.iterations is not None:
        words += ["--iterations", str(args.iterations)]
    if args.data_dir:
        words += ["--data-dir", args.data_dir]
    result = meta_train(config, out, resume=args.resume, progress=not args.quiet, command=shlex.join(words))
    tail = [r["meta_loss"] for r in result.log[-100:] if r.get("meta_loss") is not None]
    print(f"outer steps: {result.steps}  wall: {result.wall_s:.1f} s  "
          f"meta-loss (mean of last {len(tail)}): {sum(tail) / max(1, len(tail)):.4f}")
    for name, path in (("checkpoint", result.checkpoint), ("weights", out / POLICY_NAME), ("log", result.log_file)):
        print(f"{name}: {path}")
    return 0
