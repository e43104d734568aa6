"""Meta-training Predicted Step Descent (Li & Malik 2017, §4) with Convolutional GPS.

A thin driver over :class:`l2o.outer.gps.conv_trainer.ConvGPSTrainer`: it reads the config file, runs
(or resumes) the GPS iterations with a progress bar, and leaves in the output folder the training
checkpoint, the per-iteration log and ``psd.safetensors`` — the π with the lowest true-objective
AUC on held-out seeds of the training objective, with the command and config that produced it.
Shipping it is a copy: ``cp OUT/psd.safetensors OUT/psd.json src/l2o/learned/weights/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l2o.execution import Executor
from l2o.outer.gps.conv_trainer import (
    CHECKPOINT_NAME,
    LOG_NAME,
    ConvGPSConfig,
    ConvGPSTrainer,
)


@dataclass
class MetaPSDResult:
    log: list[dict[str, Any]]
    wall_s: float
    checkpoint: Path
    policy: Path
    log_file: Path


def meta_train(config: ConvGPSConfig, out: str | os.PathLike, resume: bool = False, progress: bool = True,
               command: str | None = None, executor: Executor | None = None) -> MetaPSDResult:
    """Run Convolutional GPS for ``config.iterations`` iterations into ``out``.

    Without ``resume`` an existing checkpoint in ``out`` is an error (so a run is never silently
    mixed with another); with it, training continues from the last finished iteration. ψ's
    trajectories run on ``executor`` (:mod:`l2o.execution`) if given, with the same result.
    """
    out = Path(out)
    if (out / CHECKPOINT_NAME).exists() and not resume:
        raise FileExistsError(f"{out / CHECKPOINT_NAME} exists: pass --resume to continue it, or choose another --out")
    trainer = ConvGPSTrainer(config, out, command=command, progress=progress, executor=executor)
    log = trainer.train()
    return MetaPSDResult(log, trainer.wall, out / CHECKPOINT_NAME, out / trainer.setting.policy.file_name, out / LOG_NAME)


def log_table(log: list[dict[str, Any]]) -> str:
    """The per-iteration log as a Markdown table: ψ's and π's true cost, π's regression error,
    ψ's mean gain on the gradient feature Φ2_0 per group, and ε."""
    groups = [g["group"] for g in log[0]["groups"]] if log else []
    head = ("| iteration | ψ AUC | ψ final | π AUC (held-out) | π final | π rel. RMSE | "
            + " | ".join(f"gain Φ2_0 {g}" for g in groups) + " | ε |")
    lines = [head, "|" + "---|" * (7 + len(groups))]
    fmt = lambda v: "diverged" if v is None else f"{v:.4f}"  # noqa: E731
    for r in log:
        gains = " | ".join(f"{g['gain_K_grad']:.3f}" for g in r["groups"])
        lines.append(f"| {r['iteration']} | {r['psi_auc']:.4f} | {r['psi_final']:.4f} | {fmt(r['pi_auc'])} | "
                     f"{fmt(r['pi_final'])} | {r['pi_regression_rel_rmse']:.3f} | {gains} | {r['epsilon']:g} |")
    return "\n".join(lines)


def plot_log(log: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """ψ's (mean over its samples) and π's (held-out) AUC per GPS iteration, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in log]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(it, [r["psi_auc"] for r in log], "o-", label="ψ (linear-Gaussian, with exploration noise)")
    ax.plot(it, [r["pi_auc"] if r["pi_auc"] is not None else float("nan") for r in log], "s-",
            label="π (LSTM, mean action, held-out seeds)")
    ax.set_xlabel("GPS iteration")
    ax.set_ylabel("AUC: mean true objective over T")
    ax.set_title("Convolutional GPS on the meta-training objective", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m l2o.outer.meta_psd LOG [--iterations N] [--plot PNG]``: print the log's table."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("log", help="log.jsonl of a meta-training run")
    p.add_argument("--iterations", type=int, default=None, help="only the first N iterations")
    p.add_argument("--plot", default=None, help="also write the AUC-per-iteration figure here")
    a = p.parse_args(argv)
    log = [json.loads(line) for line in Path(a.log).read_text().splitlines() if line.strip()]
    log = log[: a.iterations] if a.iterations is not None else log
    print(log_table(log))
    if a.plot:
        print(f"\nfigure: {plot_log(log, a.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
