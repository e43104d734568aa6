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

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from l2o.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_text_atomic
from l2o.config import Config, check_field_types
from l2o.learned.l2l import NET_KEYS, TRAIN_KIND, Hidden, check_net, init_hidden, init_net, save_policy, step
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


def _save_state(path: Path, config: MetaL2LConfig, net: Mapping[str, Tensor], adam: torch.optim.Adam,
                init_gen: torch.Generator, batch_gen: torch.Generator, log: list[dict[str, Any]],
                wall_s: float, command: str | None) -> None:
    tensors: dict[str, Tensor] = {f"net.{k}": net[k] for k in NET_KEYS}
    for k in NET_KEYS:
        st = adam.state.get(net[k], {})
        for name, value in st.items():
            tensors[f"adam.{k}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.init"] = init_gen.get_state()
    tensors["rng.batch"] = batch_gen.get_state()
    meta = {"config": asdict(config), "episode": len(log), "log": log, "wall_s": wall_s, "command": command,
            "torch": torch.__version__}
    save_checkpoint(path, tensors, meta, kind=TRAIN_KIND)


def _load_state(path: Path, config: MetaL2LConfig, net: dict[str, Tensor], adam: torch.optim.Adam,
                init_gen: torch.Generator, batch_gen: torch.Generator) -> tuple[list[dict[str, Any]], float, str | None]:
    """Restore a training checkpoint; a missing or malformed field or non-finite weights raise
    :class:`CheckpointError` naming the file (not a bare KeyError)."""
    tensors, meta = load_checkpoint(path, kind=TRAIN_KIND)
    try:
        check_net({k: tensors[f"net.{k}"] for k in NET_KEYS})
        return _restore(path, tensors, meta, config, net, adam, init_gen, batch_gen)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else f"holds a malformed field ({e})"
        raise CheckpointError(f"checkpoint {path} {what}") from e
    except ValueError as e:
        if isinstance(e, CheckpointError) or str(e).startswith("cannot resume"):
            raise
        raise CheckpointError(f"checkpoint {path}: {e}") from e


def _restore(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any], config: MetaL2LConfig,
             net: dict[str, Tensor], adam: torch.optim.Adam, init_gen: torch.Generator,
             batch_gen: torch.Generator) -> tuple[list[dict[str, Any]], float, str | None]:
    saved = meta["config"]
    diff = sorted(k for k in asdict(config) if k not in _RESUME_MAY_CHANGE and saved.get(k) != asdict(config)[k])
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in diff)
        raise ValueError(f"cannot resume {path}: config differs from the checkpoint's ({detail})")
    if meta["episode"] > config.episodes:
        raise ValueError(f"cannot resume {path}: it already holds {meta['episode']} episodes > episodes = {config.episodes}")
    with torch.no_grad():
        for k in NET_KEYS:
            net[k].copy_(tensors[f"net.{k}"])
    sd = adam.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for i, k in enumerate(NET_KEYS):
        entry = {name: tensors[f"adam.{k}.{name}"] for name in ("step", "exp_avg", "exp_avg_sq") if f"adam.{k}.{name}" in tensors}
        if entry:
            state[i] = entry
    adam.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    init_gen.set_state(tensors["rng.init"])
    batch_gen.set_state(tensors["rng.batch"])
    return list(meta["log"]), float(meta["wall_s"]), meta.get("command")


def _write_log(path: Path, log: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in log))


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
    """Meta-train φ for ``config.episodes`` episodes, checkpointing into ``out`` after each.

    ``out`` receives ``checkpoint.safetensors`` (the resumable state), ``metaloss.jsonl`` (one
    line per episode; ``meta_loss`` is the episode's mean mini-batch loss over its T steps) and
    ``l2lbgdbgd.safetensors`` + ``.json`` (the weights for :class:`l2o.learned.l2l.L2LBGDBGD`).
    ``resume=True`` continues from the checkpoint (the config must match except ``episodes`` and
    ``data_dir``); without it an existing checkpoint is an error. ``stop_after`` ends the call once
    that many episodes are complete (simulates an interruption). ``task_sampler(episode)`` replaces
    the config's task, e.g. by a family of random problems (episode index → task).
    """
    out = Path(out)
    ckpt_path, log_path, policy_path = out / CHECKPOINT_NAME, out / LOG_NAME, out / POLICY_NAME
    if ckpt_path.exists() and not resume:
        raise ValueError(f"{ckpt_path} exists: pass resume=True (--resume) to continue it, or choose another output folder")
    if resume and not ckpt_path.exists():
        raise CheckpointError(f"cannot resume: checkpoint {ckpt_path} not found")
    if task_sampler is None:
        from l2o.tasks.registry import make_task

        fixed = make_task(config.task, data_dir=config.data_dir)

        def task_sampler(episode: int) -> Task:
            return fixed

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        net = {k: v.requires_grad_(True) for k, v in init_net(config.seed, config.hidden_size, config.torch_dtype).items()}
        adam = torch.optim.Adam([net[k] for k in NET_KEYS], lr=config.meta_lr)
        s_init, s_batch = _seeds(config.seed)
        init_gen = torch.Generator().manual_seed(s_init)
        batch_gen = torch.Generator().manual_seed(s_batch)
        log: list[dict[str, Any]] = []
        wall = 0.0
        if resume:
            log, wall, saved_command = _load_state(ckpt_path, config, net, adam, init_gen, batch_gen)
            command = saved_command or command
        out.mkdir(parents=True, exist_ok=True)
        target = config.episodes if stop_after is None else min(config.episodes, stop_after)

        from tqdm.auto import tqdm

        bar = tqdm(total=config.episodes, initial=len(log), desc="meta-train l2l", unit="ep", disable=not progress)
        try:
            while len(log) < target:
                t0 = time.perf_counter()
                episode = len(log)
                init_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=init_gen))
                record = run_episode(net, adam, task_sampler(episode), init_seed, batch_gen, config)
                dt = time.perf_counter() - t0
                wall += dt
                log.append({"episode": episode, **record, "wall_s": round(dt, 4)})
                _save_state(ckpt_path, config, net, adam, init_gen, batch_gen, log, wall, command)
                _write_log(log_path, log)
                save_policy(policy_path, net, policy_meta(config, log, wall, command))
                bar.update()
                if record["meta_loss"] is not None:
                    bar.set_postfix(meta_loss=f"{record['meta_loss']:.4f}")
        finally:
            bar.close()
        if not log_path.exists():
            _write_log(log_path, log)
    finally:
        torch.set_num_threads(threads)
    return MetaTrainResult({k: v.detach() for k, v in net.items()}, log, ckpt_path, policy_path, log_path, wall)
