"""Wall time of one GPS iteration of the 2016 small-net family, by stage (issue 14).

Builds exactly the trainer of ``l2o meta-train gps2016 --config configs/lto2016-smallnet.toml``
(8 conditions, 20 samples of 40 steps each, 637-dim state; nothing reduced), runs one iteration
(``trainer.step()``) in one process with one thread, and reports the time spent in each stage,
*exclusive* of the stages nested inside it:

* sampling       ψ's rollouts (OptimizerEnv2016.rollout with a linear-Gaussian controller)
* hessians       the mean Hessians H̄_t of the objectives at the samples (_mean_hessians)
* dynamics fit   local_dynamics (without its Hessians)
* cost model     local_cost (without its Hessians)
* π̂ fit          fit_linear_gaussian_policy (the linear-Gaussian fit of π on ψ's states)
* LQG ψ-step     solve_trust_region (the η dual: backward passes, forward passes, KLs)
* model costs    expected_cost of ψ_old and ψ_new (the ε ratio test's prediction)
* π-step         the Adam regression of π onto the ψ's
* evaluation     π's rollouts (OptimizerEnv2016.rollout with π as the controller)
* other          the rest of the iteration (BADMM dual steps, KLs, logging, checkpoint)

Works on both the current layout (``l2o.outer``) and the layout of commit f9a2d4b
(``l2o.gps``, ``l2o.experiments``), so the same script times the old code:

    git worktree add /tmp/old f9a2d4b
    PYTHONPATH=/tmp/old/src python benchmarks/bench_gps_iteration.py     # before
    python benchmarks/bench_gps_iteration.py                              # after

Options: ``--config`` (default configs/lto2016-smallnet.toml), ``--json PATH`` (write the
timings), ``--log PATH`` (copy the iteration's log record, to compare runs bitwise).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import platform
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _layout():
    """(meta_gps2016 module, lqg-importing loop module, trainer class, π-step attr, layout name)."""
    try:
        meta = importlib.import_module("l2o.outer.meta_gps2016")
        loop = importlib.import_module("l2o.outer.gps.loop")
        trainer_mod = importlib.import_module("l2o.outer.gps.trainer")
        return meta, loop, trainer_mod.MultiConditionGPSTrainer, (trainer_mod.ConditionSetting, "fit_pi"), "l2o.outer"
    except ModuleNotFoundError:
        meta = importlib.import_module("l2o.experiments.meta_gps2016")
        loop = importlib.import_module("l2o.gps.multi_trainer")
        return meta, loop, loop.MultiConditionGPSTrainer, (loop.MultiConditionGPSTrainer, "_pi_step"), "l2o.gps"


class Timers:
    """Exclusive wall time per stage: a stage's time excludes the stages called inside it."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[float]] = []  # [start, time of nested stages]

    def wrap(self, owner, attr: str, stage, static: bool = False) -> None:
        fn = getattr(owner, attr)
        timers = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            name = stage(args, kwargs) if callable(stage) else stage
            frame = [time.perf_counter(), 0.0]
            timers._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                timers._stack.pop()
                dt = time.perf_counter() - frame[0]
                timers.total[name] = timers.total.get(name, 0.0) + dt - frame[1]
                timers.calls[name] = timers.calls.get(name, 0) + 1
                if timers._stack:
                    timers._stack[-1][1] += dt

        setattr(owner, attr, staticmethod(wrapper) if static else wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "lto2016-smallnet.toml"))
    ap.add_argument("--json", default=None, help="write the timings here")
    ap.add_argument("--log", default=None, help="copy the iteration's log.jsonl here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta, loop, Trainer, (pi_owner, pi_attr), layout = _layout()
    import l2o
    with open(args.config, "rb") as f:
        config = meta.LTO2016Config.from_dict(tomllib.load(f))
    env_mod = sys.modules[meta.OptimizerEnv2016.__module__]
    Env = env_mod.OptimizerEnv2016

    timers = Timers()

    def rollout_stage(a, kw):
        ctrl = a[1] if len(a) > 1 else kw.get("controller")
        return "sampling" if "LinearGaussian" in type(ctrl).__name__ else "evaluation"

    timers.wrap(Env, "rollout", rollout_stage)
    timers.wrap(Env, "_mean_hessians", "hessians")
    timers.wrap(Env, "local_dynamics", "dynamics fit")
    timers.wrap(Env, "local_cost", "cost model")
    timers.wrap(loop, "fit_linear_gaussian_policy", "pi-hat fit", static=False)
    timers.wrap(loop, "solve_trust_region", "LQG psi-step")
    timers.wrap(loop, "expected_cost", "model costs")
    timers.wrap(pi_owner, pi_attr, "pi-step")

    env, pi = meta.build(config)
    envs = meta.build_conditions(config)
    gps = meta.GPSConfig.from_dict({**config.gps_config().to_dict(), "progress": False})
    psi0 = meta.gradient_descent_psi(env, config.init_lr, config.init_noise)
    out = Path(tempfile.mkdtemp(prefix="bench_gps_iteration_"))
    try:
        trainer = Trainer(envs, pi, gps, out, initial_psi=psi0)
        t0 = time.perf_counter()
        rec = trainer.step()
        wall = time.perf_counter() - t0
        log = (out / "log.jsonl").read_text()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if args.log:
        Path(args.log).write_text(log)
    stages = ["sampling", "hessians", "dynamics fit", "cost model", "pi-hat fit", "LQG psi-step", "model costs",
              "pi-step", "evaluation"]
    other = wall - sum(timers.total.values())
    print(f"one GPS iteration of {Path(args.config).name} ({len(envs)} conditions, T={env.horizon}, "
          f"D={env.state_dim}, d={env.action_dim}); code: {layout} from {Path(l2o.__file__).parent}; "
          f"torch {torch.__version__}, 1 thread, {platform.processor() or platform.machine()}")
    for s in stages:
        t = timers.total.get(s, 0.0)
        print(f"  {s:<14} {t:9.2f} s  {100 * t / wall:5.1f} %   ({timers.calls.get(s, 0)} calls)")
    print(f"  {'other':<14} {other:9.2f} s  {100 * other / wall:5.1f} %")
    print(f"  {'total':<14} {wall:9.2f} s   (psi cost {rec.get('psi_cost')}, eval {rec.get('eval_cost', rec.get('eval'))})")
    if args.json:
        Path(args.json).write_text(json.dumps({"layout": layout, "wall_s": wall, "other_s": other,
                                               "stages": timers.total, "calls": timers.calls}, indent=1))


if __name__ == "__main__":
    main()
