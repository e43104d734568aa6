"""Meta-training the L2LBGDBGD LSTM optimizer (Andrychowicz et al. 2016) by truncated BPTT.

An episode runs the optimizee θ from a fresh x⁽⁰⁾ for ``horizon`` steps of
θ_{t+1} = θ_t + g_t, [g_t, h_{t+1}] = m(∇f̂_t(θ_t), h_t; φ) (see :mod:`l2o.learned.l2l`),
cut into unrolls of ``unroll`` steps. After each unroll, Adam takes one step on φ along ∇_φ of the
paper's meta-loss L(φ) = Σ_{t=1}^{U} f̂_{B_t}(θ_t) (weights w_t = 1; f̂ on the mini-batch B_t that
step t also uses for its gradient, so each term is an unbiased estimate of f(θ_t)); θ and h are
then detached and carried into the next unroll (truncation).

As in the paper, second derivatives are dropped by default: the optimizee gradient ∇f̂(θ_t) enters
the LSTM as an input (computed with ``create_graph=False``, hence detached), so the meta-gradient
omits every term through ∂∇f̂(θ_t)/∂θ_t = ∇²f̂(θ_t), i.e. the Hessian–vector products. It is the
exact gradient of a surrogate in which the gradient sequence is frozen at its observed values
(``frozen_grads`` in :func:`unroll_meta_loss`). ``second_order=True`` keeps those terms.

Everything needed to continue is checkpointed after every episode (φ, Adam's state, the two
generators, the episode counter, the meta-loss log), so an interrupted run resumed with
``resume=True`` reproduces the uninterrupted run's weights bit for bit.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from l2o.checkpoint import CheckpointError
from l2o.config import Config, check_field_types
from l2o.learned.l2l import NET_KEYS, TRAIN_KIND, Hidden, check_net, init_hidden, init_net, save_policy, step
from l2o.outer.base import OuterTrainer, config_resume_check, run_outer
from l2o.tasks.base import Task, flatten, unflatten

CHECKPOINT_NAME = "checkpoint.safetensors"
POLICY_NAME = "l2lbgdbgd.safetensors"
LOG_NAME = "metaloss.jsonl"

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_RESUME_MAY_CHANGE = frozenset({"episodes", "data_dir"})


@dataclass(frozen=True)
class MetaL2LConfig(Config):
    """What to meta-train (Andrychowicz et al. 2016 defaults; ``configs/l2l.toml``).

    ``horizon`` T steps per episode in unrolls of ``unroll`` steps; ``meta_lr`` is Adam's step size
    on φ; ``clip_grad_norm`` > 0 clips the meta-gradient's norm (0: off); ``seed`` seeds φ's
    initialisation, the episodes' x⁽⁰⁾ seeds and the mini-batch stream.
    """

    task: str = "mnist:48-48:b64"
    horizon: int = 400
    unroll: int = 20
    episodes: int = 100
    meta_lr: float = 1e-3
    seed: int = 0
    output_scale: float = 0.1
    preprocess_p: float = 10.0
    hidden_size: int = 20
    second_order: bool = False
    clip_grad_norm: float = 0.0
    dtype: str = "float32"
    threads: int = 1
    data_dir: str | None = None

    _label = "l2l"

    def __post_init__(self) -> None:
        check_field_types(self, self._label)
        self.require(ge1=("horizon", "unroll", "episodes", "hidden_size", "threads"), ge0=("seed", "clip_grad_norm"),
                     gt0=("meta_lr", "output_scale", "preprocess_p"), choices={"dtype": tuple(sorted(_DTYPES))})
        self.check(self.horizon % self.unroll == 0, f"horizon ({self.horizon}) must be a multiple of unroll ({self.unroll})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def unrolls_per_episode(self) -> int:
        return self.horizon // self.unroll


class Unroll(NamedTuple):
    """Result of one truncated unroll: the meta-loss (with graph), the final iterate and LSTM
    state (with graph), the gradients fed to the LSTM, and the U + 1 mini-batch losses."""

    meta_loss: Tensor
    x: Tensor
    hidden: Hidden
    grads: list[Tensor]
    losses: list[float]


def _loss_and_grad(task: Task, x: Tensor, indices: Tensor | None, second_order: bool) -> tuple[Tensor, Tensor]:
    """f̂_B(x) (differentiable in x where x carries a graph) and ∇f̂_B(x): detached unless
    ``second_order`` (then with ``create_graph=True``)."""
    with torch.enable_grad():
        xi = x if x.requires_grad else x.detach().requires_grad_(True)
        loss = task.loss(unflatten(xi, task.groups), indices)
        (g,) = torch.autograd.grad(loss, xi, create_graph=second_order, retain_graph=True)
    if not second_order:
        g = g.detach()
    if not x.requires_grad:
        loss = loss.detach()
    return loss, g


def unroll_meta_loss(
    net: Mapping[str, Tensor],
    task: Task,
    x: Tensor,
    hidden: Hidden,
    batches: Sequence[Tensor | None],
    *,
    output_scale: float,
    p: float,
    second_order: bool = False,
    frozen_grads: Sequence[Tensor] | None = None,
) -> Unroll:
    """Run U = ``len(batches) − 1`` optimizer steps from the flat iterate ``x`` and return
    L(φ) = Σ_{t=1}^{U} f̂_{B_t}(θ_t); batch B_t is used for θ_t's loss and gradient.

    ``frozen_grads`` (U tensors) replaces the computed ∇f̂(θ_t) by fixed inputs: with the
    gradients observed at some φ₀, L is then the first-order surrogate whose exact gradient at φ₀
    is the first-order meta-gradient (used to check it by finite differences).
    """
    U = len(batches) - 1
    if U < 1:
        raise ValueError("an unroll needs at least 2 batches (one step)")
    if frozen_grads is not None and len(frozen_grads) != U:
        raise ValueError(f"frozen_grads must hold {U} gradients, got {len(frozen_grads)}")
    meta_loss = x.new_zeros(())
    grads: list[Tensor] = []
    losses: list[float] = []
    for t in range(U + 1):
        if t == U:
            loss = task.loss(unflatten(x, task.groups), batches[t])
        elif frozen_grads is not None:
            loss = task.loss(unflatten(x, task.groups), batches[t])
            g = frozen_grads[t]
        else:
            loss, g = _loss_and_grad(task, x, batches[t], second_order)
        losses.append(float(loss.detach()))
        if t > 0:
            meta_loss = meta_loss + loss
        if t < U:
            grads.append(g.detach())
            update, hidden = step(net, hidden, g, p=p, output_scale=output_scale)
            x = x + update
    return Unroll(meta_loss, x, hidden, grads, losses)


# ---------------------------------------------------------------------------------------------
# Training loop, checkpoints, resume


@dataclass
class MetaTrainResult:
    """What :func:`meta_train` leaves: the weights φ, the per-episode log and the files."""

    net: dict[str, Tensor]
    log: list[dict[str, Any]]
    checkpoint: Path
    policy: Path
    log_file: Path
    wall_s: float


def _seeds(seed: int) -> tuple[int, int]:
    """Seeds of the x⁽⁰⁾-seed generator and of the mini-batch generator."""
    return 2 * seed + 1_000_003, 2 * seed + 2_000_029


def policy_meta(config: MetaL2LConfig, log: list[dict[str, Any]], wall_s: float, command: str | None) -> dict[str, Any]:
    """Metadata stored with the exported weights (architecture, how they were trained)."""
    tail = [r["meta_loss"] for r in log[-10:] if r["meta_loss"] is not None]
    return {
        "method": "L2LBGDBGD (Andrychowicz et al. 2016)",
        "hidden_size": config.hidden_size,
        "preprocess_p": config.preprocess_p,
        "output_scale": config.output_scale,
        "training": {
            "config": asdict(config),
            "episodes": len(log),
            "final_meta_loss_mean_last10": (sum(tail) / len(tail)) if tail else None,
            "meta_loss_definition": "mean over the episode's T steps of the mini-batch loss f̂(θ_t), t = 1..T",
            "wall_s": round(wall_s, 3),
            "command": command,
            "torch": torch.__version__,
        },
    }


class L2LTrainer(OuterTrainer):
    """Truncated-BPTT meta-training of φ as an :class:`~l2o.outer.base.OuterTrainer`: one outer step
    is one episode (:func:`run_episode`). Checkpointed: φ, Adam's state and the two generators
    (tensors), the episode log and the command (JSON)."""

    kind = TRAIN_KIND

    def __init__(self, config: MetaL2LConfig, task_sampler: Callable[[int], Task], command: str | None,
                 path: Path) -> None:
        self.config, self.task_sampler, self.command, self.path = config, task_sampler, command, path
        net = init_net(config.seed, config.hidden_size, config.torch_dtype)
        self.net = {k: v.requires_grad_(True) for k, v in net.items()}
        self.adam = torch.optim.Adam([self.net[k] for k in NET_KEYS], lr=config.meta_lr)
        s_init, s_batch = _seeds(config.seed)
        self.init_gen = torch.Generator().manual_seed(s_init)
        self.batch_gen = torch.Generator().manual_seed(s_batch)
        self.log: list[dict[str, Any]] = []

    @property
    def theta(self) -> Tensor:
        return torch.cat([self.net[k].detach().reshape(-1) for k in NET_KEYS])

    def step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        episode = len(self.log)
        init_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.init_gen))
        record = run_episode(self.net, self.adam, self.task_sampler(episode), init_seed, self.batch_gen, self.config)
        self.log.append({"episode": episode, **record, "wall_s": round(time.perf_counter() - t0, 4)})
        return self.log[-1]

    def state_tensors(self) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {f"net.{k}": self.net[k] for k in NET_KEYS}
        for k in NET_KEYS:
            for name, value in self.adam.state.get(self.net[k], {}).items():
                tensors[f"adam.{k}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        tensors["rng.init"] = self.init_gen.get_state()
        tensors["rng.batch"] = self.batch_gen.get_state()
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return {"episode": len(self.log), "log": self.log, "command": self.command, "torch": torch.__version__}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Restore φ, Adam and the generators; a missing or malformed tensor or non-finite weights
        raise :class:`CheckpointError` naming the file."""
        try:
            check_net({k: tensors[f"net.{k}"] for k in NET_KEYS})
            with torch.no_grad():
                for k in NET_KEYS:
                    self.net[k].copy_(tensors[f"net.{k}"])
            state: dict[int, dict[str, Tensor]] = {}
            for i, k in enumerate(NET_KEYS):
                entry = {n: tensors[f"adam.{k}.{n}"] for n in ("step", "exp_avg", "exp_avg_sq") if f"adam.{k}.{n}" in tensors}
                if entry:
                    state[i] = entry
            self.adam.load_state_dict({"state": state, "param_groups": self.adam.state_dict()["param_groups"]})
            self.init_gen.set_state(tensors["rng.init"])
            self.batch_gen.set_state(tensors["rng.batch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {self.path} {_what(e)}") from e

    def load_state_meta(self, meta: Mapping[str, Any]) -> None:
        try:
            self.log = [dict(r) for r in meta["log"]]
            self.command = meta.get("command") or self.command
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.path} {_what(e)}") from e


def _what(e: Exception) -> str:
    return f"lacks {e}" if isinstance(e, KeyError) else f"holds a malformed field ({e})"


def run_episode(
    net: Mapping[str, Tensor], adam: torch.optim.Optimizer, task: Task, init_seed: int,
    batch_gen: torch.Generator, config: MetaL2LConfig,
) -> dict[str, Any]:
    """One episode: ``horizon // unroll`` truncated unrolls, one Adam step on φ after each.

    An unroll whose meta-loss is not finite (the optimizee diverged) ends the episode without
    updating φ. Returns the episode's log record.
    """
    dtype = config.torch_dtype
    x = flatten(task.init_params(init_seed, dtype), task.groups)
    hidden = init_hidden(x.numel(), config.hidden_size, dtype)
    params = [net[k] for k in NET_KEYS]
    idx = task.sample_batch(batch_gen)
    total, steps, grad_norms = 0.0, 0, []
    diverged = False
    for _ in range(config.unrolls_per_episode):
        batches = [idx] + [task.sample_batch(batch_gen) for _ in range(config.unroll)]
        res = unroll_meta_loss(net, task, x, hidden, batches, output_scale=config.output_scale,
                               p=config.preprocess_p, second_order=config.second_order)
        value = float(res.meta_loss.detach())
        if not math.isfinite(value):
            diverged = True
            break
        adam.zero_grad(set_to_none=True)
        res.meta_loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm if config.clip_grad_norm > 0 else math.inf)
        if not math.isfinite(float(gn)):
            diverged = True
            break
        adam.step()
        grad_norms.append(float(gn))
        total += value
        steps += config.unroll
        x, hidden = res.x.detach(), res.hidden.detach()
        idx = batches[-1]
    final_true = task.true_loss(unflatten(x, task.groups)) if not diverged else None
    return {
        "init_seed": init_seed,
        "meta_loss": total / steps if steps else None,
        "steps": steps,
        "diverged": diverged,
        "final_true_loss": final_true if final_true is not None and math.isfinite(final_true) else None,
        "meta_grad_norm_mean": sum(grad_norms) / len(grad_norms) if grad_norms else None,
    }


def meta_train(
    config: MetaL2LConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    task_sampler: Callable[[int], Task] | None = None,
    command: str | None = None,
) -> MetaTrainResult:
    """Meta-train φ for ``config.episodes`` episodes, checkpointing into ``out`` after each
    (:func:`~l2o.outer.base.run_outer` drives :class:`L2LTrainer`).

    ``out`` receives ``checkpoint.safetensors`` (the resumable state), ``metaloss.jsonl`` (one
    line per episode; ``meta_loss`` is the episode's mean mini-batch loss over its T steps) and
    ``l2lbgdbgd.safetensors`` + ``.json`` (the weights for :class:`l2o.learned.l2l.L2LBGDBGD`).
    ``resume=True`` continues from the checkpoint (the config must match except ``episodes`` and
    ``data_dir``); without it an existing checkpoint is an error. ``stop_after`` ends the call once
    that many episodes are complete (simulates an interruption). ``task_sampler(episode)`` replaces
    the config's task, e.g. by a family of random problems (episode index → task).
    """
    out = Path(out)
    ckpt_path, policy_path = out / CHECKPOINT_NAME, out / POLICY_NAME
    if task_sampler is None:
        from l2o.tasks.registry import make_task

        fixed = make_task(config.task, data_dir=config.data_dir)

        def task_sampler(episode: int) -> Task:
            return fixed

    same_config = config_resume_check(out, asdict(config), _RESUME_MAY_CHANGE)

    def check(saved: Mapping[str, Any]) -> None:
        if not isinstance(saved.get("config"), dict):
            raise CheckpointError(f"checkpoint {ckpt_path} {'lacks' if 'config' not in saved else 'holds a malformed'} "
                                  "'config'")
        same_config(saved)

    def export(trainer: OuterTrainer, _n: int, _log: list[dict[str, Any]], wall: float) -> None:
        assert isinstance(trainer, L2LTrainer)
        save_policy(policy_path, trainer.net, policy_meta(config, trainer.log, wall, trainer.command))

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        trainer = L2LTrainer(config, task_sampler, command, ckpt_path)
        res = run_outer(trainer, out, config.episodes, meta={"config": asdict(config)}, resume=resume,
                        stop_after=stop_after, progress=progress, desc="meta-train l2l", on_checkpoint=export,
                        resume_check=check, log_name=LOG_NAME)
    finally:
        torch.set_num_threads(threads)
    return MetaTrainResult({k: v.detach() for k, v in trainer.net.items()}, trainer.log, ckpt_path, policy_path,
                           res.log_file, res.wall_s)
