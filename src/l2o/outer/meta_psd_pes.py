"""``l2o meta-train psd-pes``: Persistent ES on PSD's LSTM over MNIST MLP optimizees (issue 12's
"PES × PSD-LSTM" cell).

Starts from the ω of a PSD policy checkpoint (``init_from``; ``"default"`` = the packaged
``psd.safetensors``), whose feature set (``paper2017`` or ``scale-free``) and frozen entries (input
normalisation, output scale, and any of W_ih, W_hh, b, W_out, b_out not listed in ``train``) it
keeps; θ = the ``train`` entries of ω, flattened. Runs :class:`l2o.outer.pes.PESTrainer` on
:class:`l2o.outer.psd_problem.PSDProblem` for ``steps`` outer steps, checkpoints into
OUT/checkpoint.safetensors (exact resume; the starting checkpoint's SHA-256 is recorded and checked
on resume), logs one line per outer step to OUT/log.jsonl and exports the current ω at every
checkpoint as OUT/psd-pes.safetensors (+ .json) in PSD's checkpoint format:
``l2o benchmark --optimizers psd:checkpoint=OUT/psd-pes.safetensors`` runs it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from l2o.config import check_field_types, check_keys, read_config_file
from l2o.features.sets import get_feature_set
from l2o.learned.psd import BASE_KEYS, DEFAULT_CHECKPOINT, TRAINED_KEYS, init_base, load_policy, save_policy
from l2o.outer.base import cli_meta_train, OuterRunResult, config_resume_check, run_outer
from l2o.outer.pes import PESFields, PESTrainer, training_info
from l2o.outer.psd_problem import PSDProblem

TRAIN_KIND = "l2o-meta-psd-pes-train"
POLICY_NAME = "psd-pes.safetensors"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_RESUME_MAY_CHANGE = frozenset({"steps", "data_dir", "checkpoint_every"})


@dataclass(frozen=True)
class MetaPSDPESConfig(PESFields):
    """What to meta-train (``configs/psd-pes.toml``).

    ``task``: one mini-batch MNIST MLP spec. ``init_from``: the starting PSD policy checkpoint
    (``"default"`` = the packaged weights). ``base = "adagrad"`` gives the starting ω the base step
    of :func:`l2o.learned.psd.init_base`, AdaGrad at lr ``base_lr`` (scale-free Ψ only), with the
    LSTM's output layer zeroed, so the starting π is exactly AdaGrad and the LSTM learns a
    correction; its step size reads all of Ψ (``base_schedule = "all"``) or only the step-count
    embedding tanh(t/τ) (``"time"``: a learned schedule in t, as mlp-lopt's); ``base_directions``
    names the Ψ features it combines (default: the feature set's update directions). ``train``:
    which of ω's entries θ holds (a list from W_ih, W_hh, b, W_out, b_out and, with a base, base_u,
    base_c; default the first five). PES (:class:`~l2o.outer.pes.PESFields`):
    ``n_pairs`` N, ``sigma`` σ, ``truncation`` W, ``horizon`` T, ``persistent``, ``stagger``,
    ``rank_shaping``, ``meta_lr`` (Adam on θ), ``loss_clip`` (0 = off). Budget: ``steps`` outer
    steps; ``checkpoint_every``; ``seed`` seeds every draw (optimizee seeds ≥ 10⁶, mini-batches,
    perturbations).
    """

    task: str = "mnist:48-48:b64"
    init_from: str = "default"
    base: str | None = None
    base_lr: float = 0.1
    base_schedule: str = "all"
    base_directions: list[str] | None = None
    train: list[str] | None = None
    # the PES fields are PESFields'; these override its defaults
    meta_lr: float = 1e-4
    loss_clip: float = 10.0
    steps: int = 500
    checkpoint_every: int = 10
    seed: int = 0
    dtype: str = "float32"
    threads: int = 1
    data_dir: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "psd-pes")
        for name in ("steps", "checkpoint_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"psd-pes config: {name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"psd-pes config: seed must be >= 0, got {self.seed}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"psd-pes config: dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.base not in (None, "adagrad"):
            raise ValueError(f"psd-pes config: base must be \"adagrad\" or left out, got {self.base!r}")
        if self.base_lr <= 0:
            raise ValueError(f"psd-pes config: base_lr must be > 0, got {self.base_lr!r}")
        if self.base_schedule not in ("all", "time"):
            raise ValueError(f"psd-pes config: base_schedule must be \"all\" or \"time\", got {self.base_schedule!r}")
        names = TRAINED_KEYS + (BASE_KEYS[:2] if self.base else ())
        if self.train is not None:
            if (not isinstance(self.train, list) or not self.train or len(set(self.train)) != len(self.train)
                    or any(k not in names for k in self.train)):
                raise ValueError(f"psd-pes config: train must be a non-empty list of distinct names from "
                                 f"{list(names)}, got {self.train!r}")
        from l2o.tasks.registry import MLPTaskSpec, parse_task

        try:
            spec = parse_task(self.task)
        except ValueError as e:
            raise ValueError(f"psd-pes config: task: {e}") from e
        if not isinstance(spec, MLPTaskSpec) or spec.dataset != "mnist" or spec.batch_size is None:
            raise ValueError(f"psd-pes config: task {self.task!r} is not a mini-batch MNIST MLP task "
                             "(DATASET:IN-HIDDEN:bBATCH with DATASET = mnist); meta-training uses MNIST only")
        try:
            self.pes  # noqa: B018 - validates the PES fields
        except ValueError as e:
            raise ValueError(f"psd-pes config: {e}") from e

    @property
    def train_keys(self) -> tuple[str, ...]:
        return tuple(self.train) if self.train is not None else TRAINED_KEYS

    @property
    def init_path(self) -> Path:
        return DEFAULT_CHECKPOINT if self.init_from == "default" else Path(self.init_from)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetaPSDPESConfig:
        """Build from a mapping (e.g. parsed TOML), rejecting unknown keys by name."""
        check_keys(cls, dict(d), "psd-pes")
        return cls(**dict(d))

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> MetaPSDPESConfig:
        return cls.from_dict(read_config_file(path, overrides))


class _Trainer(PESTrainer):
    kind = TRAIN_KIND


def load_init(config: MetaPSDPESConfig) -> tuple[dict[str, torch.Tensor], str, str]:
    """The starting ω, its feature set's name and the checkpoint file's SHA-256."""
    path = config.init_path
    if not path.is_file():
        raise ValueError(f"psd-pes config: init_from {str(path)!r} is not a file (a PSD policy checkpoint, "
                         "e.g. OUT/psd.safetensors of `l2o meta-train psd`, or \"default\")")
    net, meta = load_policy(path)
    features = meta.get("features", "paper2017")
    if not isinstance(features, str):
        raise ValueError(f"psd-pes: {path}: metadata 'features' must be a string, got {features!r}")
    if config.base is not None:
        if "base_u" in net:
            raise ValueError(f"psd-pes config: base = {config.base!r} but {path} already has a base step")
        fs = get_feature_set(features)
        if "g/sqrtG" not in fs.obs_names:
            raise ValueError(f"psd-pes config: base = 'adagrad' needs AdaGrad's direction g/√G in Ψ (the scale-free "
                             f"features); {path} reads {features!r}")
        schedule = None if config.base_schedule == "all" else [i for i, n in enumerate(fs.obs_names)
                                                                 if n.startswith("tanh(t/")]
        names = config.base_directions
        unknown = [n for n in names or () if n not in fs.obs_names]
        if unknown:
            raise ValueError(f"psd-pes config: base_directions {unknown} are not Ψ features of {features!r}: "
                             f"{list(fs.obs_names)}")
        directions = fs.obs_directions if names is None else [fs.obs_names.index(n) for n in names]
        net = init_base(net, directions, fs.obs_names.index("g/sqrtG"), config.base_lr, schedule)
    return net, features, hashlib.sha256(path.read_bytes()).hexdigest()


def build_problem(config: MetaPSDPESConfig, task: Any = None) -> PSDProblem:
    """The inner problem for ``config``; ``task`` (a :class:`~l2o.tasks.base.Task`, e.g. in tests)
    overrides ``config.task``."""
    if task is None:
        from l2o.tasks.registry import make_task

        task = make_task(config.task, data_dir=config.data_dir)
    net, features, _ = load_init(config)
    return PSDProblem(task, net, features, config.train_keys, _DTYPES[config.dtype])


def meta_train(config: MetaPSDPESConfig, out: str | os.PathLike, *, resume: bool = False, progress: bool = True,
               stop_after: int | None = None, task: Any = None, command: str | None = None) -> OuterRunResult:
    """Meta-train PSD's ω by PES; see the module docstring for the files written into ``out``."""
    out = Path(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        problem = build_problem(config, task)
        _, features, sha = load_init(config)
        trainer = _Trainer(problem, config.pes, problem.theta0(), seed=config.seed)
        cfg = asdict(config)
        meta = {"config": cfg, "init_sha256": sha, "features": features, "dim": problem.dim,
                "command": command, "torch": torch.__version__}
        check_config = config_resume_check(out, cfg, _RESUME_MAY_CHANGE, defaults={"late_weight": 0.0})

        def check(saved: Mapping[str, Any]) -> None:
            check_config(saved)
            if saved.get("init_sha256") != sha:
                raise ValueError(f"cannot resume {out}: init_from {config.init_path} is not the file the run started "
                                 f"from (SHA-256 {sha[:12]}…, the checkpoint's {str(saved.get('init_sha256'))[:12]}…)")

        def export(tr: Any, step: int, log: list[dict[str, Any]], wall: float) -> None:
            info = {"features": features,
                    "method": f"PSD's LSTM meta-trained by Persistent ES (Vicol et al. 2021) from {config.init_path}",
                    "training": training_info(step, wall, log, cfg, command, init_sha256=sha,
                                              trained=list(problem.train_keys), dim=problem.dim)}
            save_policy(out / POLICY_NAME, problem.net(tr.theta.to(problem.dtype)), info)

        return run_outer(trainer, out, config.steps, meta=meta, resume=resume, checkpoint_every=config.checkpoint_every,
                         stop_after=stop_after, progress=progress, desc="meta-train psd-pes (PES)",
                         on_checkpoint=export, resume_check=check)
    finally:
        torch.set_num_threads(threads)


def cli_run(args: Any) -> int:
    """``l2o meta-train psd-pes``: :func:`l2o.outer.base.cli_meta_train` with this trainer."""
    return cli_meta_train(args, "psd-pes", MetaPSDPESConfig, meta_train, POLICY_NAME)
