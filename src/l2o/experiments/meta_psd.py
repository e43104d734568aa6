"""Meta-training Predicted Step Descent (Li & Malik 2017, §4) with Convolutional GPS.

A thin driver over :class:`l2o.gps.conv_trainer.ConvGPSTrainer`: it reads the config file, runs
(or resumes) the GPS iterations with a progress bar, and leaves in the output folder the training
checkpoint, the per-iteration log and ``psd.safetensors`` — the π with the lowest true-objective
AUC on held-out seeds of the training objective, with the command and config that produced it.
Shipping it is a copy: ``cp OUT/psd.safetensors OUT/psd.json src/l2o/optim/weights/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l2o.gps.conv_trainer import (
    CHECKPOINT_NAME,
    LOG_NAME,
    POLICY_NAME,
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
               command: str | None = None) -> MetaPSDResult:
    """Run Convolutional GPS for ``config.iterations`` iterations into ``out``.

    Without ``resume`` an existing checkpoint in ``out`` is an error (so a run is never silently
    mixed with another); with it, training continues from the last finished iteration.
    """
    out = Path(out)
    if (out / CHECKPOINT_NAME).exists() and not resume:
        raise FileExistsError(f"{out / CHECKPOINT_NAME} exists: pass --resume to continue it, or choose another --out")
    trainer = ConvGPSTrainer(config, out, command=command, progress=progress)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.iterations, desc="Convolutional GPS", unit="it")

    def report(rec: dict[str, Any]) -> None:
        if bar is not None:
            bar.n = rec["iteration"] + 1
            bar.set_postfix(psi=f"{rec['psi_auc']:.4f}", pi=f"{rec['pi_auc'] or float('nan'):.4f}", refresh=False)
            bar.refresh()

    try:
        log = trainer.train(callback=report)
    finally:
        if bar is not None:
            bar.close()
    return MetaPSDResult(log, trainer.wall, out / CHECKPOINT_NAME, out / POLICY_NAME, out / LOG_NAME)
