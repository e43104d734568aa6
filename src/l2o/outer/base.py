"""The outer-trainer interface: meta-parameters θ, an inner problem (the task distribution and the
meta-objective), a budget of outer steps, a checkpoint after every step and exact resume.

An :class:`InnerProblem` is a distribution over inner runs (optimizee instances) of a policy with
parameters θ ∈ R^D. Its state holds a batch of runs with leading dimensions ``[2, N]`` (the two
antithetic branches of N particles); :meth:`InnerProblem.step` advances every run by one inner step
with its own θ (one batched computation) and returns each run's loss at that step. The
meta-objective is the mean of those losses over the inner run (for an optimizer: the mean
mini-batch objective f̂(x_t) over its trajectory, an unbiased estimate of the paper's mean true
objective).

An :class:`OuterTrainer` owns θ and everything needed to continue (outer optimiser state, RNG
states, inner runs in flight); :func:`run_outer` drives it for a budget of outer steps, writing
``checkpoint.safetensors`` (through :mod:`l2o.checkpoint`) every ``checkpoint_every`` steps and one
``log.jsonl`` line per outer step; with ``resume=True`` it continues bit for bit.
"""

from __future__ import annotations

import abc
import json
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from l2o.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_text_atomic

State = dict[str, Tensor]
CHECKPOINT_NAME = "checkpoint.safetensors"
LOG_NAME = "log.jsonl"


class InnerProblem(Protocol):
    """A task distribution + meta-objective for a policy with flat parameters θ ∈ R^D."""

    dim: int

    def init_runs(self, n: int, gen: torch.Generator) -> State:
        """Fresh inner runs for n particles: tensors with leading dimension n."""

    def step(self, theta: Tensor, state: State, t: Tensor, gen: torch.Generator) -> tuple[Tensor, State]:
        """One inner step of every run. ``theta`` [2, N, D], ``state`` tensors [2, N, ...], ``t`` [N]
        (0-based step index of each particle's run). Randomness (mini-batches) is drawn once per
        particle and shared by its two branches. Returns (loss at this step [2, N], new state)."""


class OuterTrainer(abc.ABC):
    """θ plus everything needed to continue meta-training; one :meth:`step` = one update of θ."""

    kind: str = "l2o-outer"

    @property
    @abc.abstractmethod
    def theta(self) -> Tensor:
        """The current flat meta-parameters θ [D]."""

    @abc.abstractmethod
    def step(self) -> dict[str, Any]:
        """One outer step; returns a JSON-serialisable log record."""

    @abc.abstractmethod
    def state_tensors(self) -> dict[str, Tensor]:
        """Everything needed for exact resume, as named tensors."""

    @abc.abstractmethod
    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_tensors`' output."""

    def state_meta(self) -> dict[str, Any]:
        """JSON state saved beside the tensors (merged into the checkpoint's metadata); none by default."""
        return {}

    def load_state_meta(self, meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state_meta` from the checkpoint's metadata (after :meth:`load_state_tensors`)."""

    def postfix(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """What the progress bar shows of a step's record."""
        loss = record.get("meta_loss")
        return {} if loss is None else {"meta_loss": f"{loss:.4f}"}


@dataclass
class OuterRunResult:
    """What :func:`run_outer` leaves."""

    theta: Tensor
    steps: int
    log: list[dict[str, Any]]
    checkpoint: Path
    log_file: Path
    wall_s: float


def read_log(path: Path, steps: int) -> list[dict[str, Any]]:
    """The first ``steps`` records of a ``log.jsonl`` (an error if it holds fewer)."""
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if len(lines) < steps:
        raise CheckpointError(f"{path} holds {len(lines)} records but the checkpoint is at step {steps}")
    return lines[:steps]


def config_resume_check(out: str | os.PathLike, config: Mapping[str, Any], may_change: Collection[str],
                        defaults: Mapping[str, Any] | None = None) -> Callable[[Mapping[str, Any]], None]:
    """A ``resume_check`` for :func:`run_outer`: rejects (:class:`CheckpointError`) resuming ``out``
    when a field of ``config`` (a dataclass as a dict) other than ``may_change`` differs from the
    checkpoint's ``meta['config']``; a field the checkpoint lacks (added since) counts as its value
    in ``defaults``."""

    def check(saved: Mapping[str, Any]) -> None:
        old = {**(defaults or {}), **saved.get("config", {})}
        diff = sorted(k for k in config if k not in may_change and old.get(k) != config[k])
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {config[k]!r}" for k in diff)
            raise CheckpointError(f"cannot resume {out}: config differs from the checkpoint's ({detail}); continue "
                                  "it with the same config, or start a run with a different config in a new folder")

    return check


def restore(trainer: OuterTrainer, ckpt: Path, resume_check: Callable[[Mapping[str, Any]], None] | None = None
            ) -> Mapping[str, Any]:
    """Load checkpoint ``ckpt`` (of ``trainer.kind``) into ``trainer``, after ``resume_check`` of its
    meta; returns the meta."""
    tensors, saved = load_checkpoint(ckpt, kind=trainer.kind)
    if resume_check is not None:
        resume_check(saved)
    trainer.load_state_tensors(tensors)
    trainer.load_state_meta(saved)
    return saved


def run_outer(trainer: OuterTrainer, out: str | os.PathLike, steps: int, *, meta: Mapping[str, Any],
              resume: bool = False, checkpoint_every: int = 1, stop_after: int | None = None,
              max_new: int | None = None, progress: bool = True, desc: str = "meta-train",
              on_checkpoint: Callable[[OuterTrainer, int, list[dict[str, Any]], float], None] | None = None,
              resume_check: Callable[[Mapping[str, Any]], None] | None = None,
              log_name: str = LOG_NAME) -> OuterRunResult:
    """Run ``trainer`` until it has taken ``steps`` outer steps, checkpointing into ``out``.

    ``meta`` (JSON) is stored in the checkpoint with ``trainer.state_meta()``; on resume
    ``resume_check(saved_meta)`` may reject a changed configuration. The checkpoint is written every
    ``checkpoint_every`` steps and at the end; ``log.jsonl`` (one record per step: ``step``, the
    step's ``wall_s`` unless the record has its own, and the trainer's fields) is rewritten just
    before it, so a resumed run's log equals an uninterrupted one's. ``stop_after`` ends the call
    after that many total steps, ``max_new`` after that many more (simulate an interruption).
    ``on_checkpoint(trainer, step, log, wall_s)`` runs after every checkpoint (e.g. exports θ).
    ``log_name`` names the log file in ``out``.
    """
    out = Path(out)
    ckpt, log_path = out / CHECKPOINT_NAME, out / log_name
    if ckpt.exists() and not resume:
        raise ValueError(f"{ckpt} exists: pass resume=True (--resume) to continue it, or choose another output folder")
    if resume and not ckpt.exists():
        raise CheckpointError(f"cannot resume: checkpoint {ckpt} not found")
    done, wall = 0, 0.0
    if resume:
        saved = restore(trainer, ckpt, resume_check)
        done, wall = int(saved["step"]), float(saved["wall_s"])
        if done > steps:
            raise ValueError(f"cannot resume {ckpt}: it already holds {done} steps > the budget of {steps}")
    log = read_log(log_path, done)
    out.mkdir(parents=True, exist_ok=True)
    target = steps if stop_after is None else min(steps, stop_after)
    target = target if max_new is None else min(target, done + max_new)

    def save(n: int) -> None:
        # The log first: a kill between the two writes leaves a log ahead of the checkpoint, which
        # resuming truncates, never one behind it.
        write_text_atomic(log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in log))
        save_checkpoint(ckpt, trainer.state_tensors(), {**meta, **trainer.state_meta(), "step": n, "wall_s": wall},
                        kind=trainer.kind)
        if on_checkpoint is not None:
            on_checkpoint(trainer, n, log, wall)

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=done, desc=desc, unit="step", disable=not progress)
    try:
        n = done
        while n < target:
            t0 = time.perf_counter()
            record = trainer.step()
            dt = time.perf_counter() - t0
            wall += dt
            n += 1
            log.append({"step": n, "wall_s": round(dt, 5), **record})
            bar.update()
            bar.set_postfix(trainer.postfix(record))
            if n % checkpoint_every == 0 or n == target:
                save(n)
        if n == done and not ckpt.exists():
            save(n)
    finally:
        bar.close()
    return OuterRunResult(trainer.theta.detach().clone(), len(log), log, ckpt, log_path, wall)


def cli_meta_train(args: Any, name: str, config_cls: Any, meta_train: Callable[..., OuterRunResult],
                   policy_name: str) -> int:
    """``l2o meta-train NAME --config FILE --out DIR [--iterations N] [--data-dir DIR] [--resume]`` for a
    run_outer-based trainer (``--iterations`` overrides the config's outer-step budget ``steps``);
    prints the budget, wall time, recent meta-loss and the files written."""
    import shlex

    overrides = {"data_dir": args.data_dir, "steps": args.iterations}
    if args.config:
        config = config_cls.from_file(Path(args.config), **overrides)
    else:
        config = config_cls.from_dict({k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out or f"runs/meta-train-{name}")
    words = ["l2o", "meta-train", name] + (["--config", args.config] if args.config else []) + ["--out", str(out)]
    if args.iterations is not None:
        words += ["--iterations", str(args.iterations)]
    if args.data_dir:
        words += ["--data-dir", args.data_dir]
    result = meta_train(config, out, resume=args.resume, progress=not args.quiet, command=shlex.join(words))
    tail = [r["meta_loss"] for r in result.log[-100:] if r.get("meta_loss") is not None]
    print(f"outer steps: {result.steps}  wall: {result.wall_s:.1f} s  "
          f"meta-loss (mean of last {len(tail)}): {sum(tail) / max(1, len(tail)):.4f}")
    for label, path in (("checkpoint", result.checkpoint), ("weights", out / policy_name), ("log", result.log_file)):
        print(f"{label}: {path}")
    return 0
