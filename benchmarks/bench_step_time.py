"""Per-iteration cost of each optimizer relative to Adam, measured in one process.

Times ``closure + optimizer.step`` (one mini-batch; the true-objective evaluation the harness adds
is excluded) for every registered optimizer with its tuned hyperparameters, and prints the ratio to
Adam on the same task, parameters and batches. Ratios, not seconds, are the result: they transfer
between machines. Usage:

    python benchmarks/bench_step_time.py [--task mnist:48-48:b64] [--steps 200] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from l2o.baselines.registry import BASELINES, parse_optimizer
from l2o.baselines.tuned import load_tuned
from l2o.tasks.registry import make_task


def time_per_step(task, spec, steps: int, seed: int = 0) -> float:
    """Median seconds per iteration over ``steps`` iterations (after 10 warm-up steps)."""
    params = {k: v.requires_grad_(True) for k, v in task.init_params(seed).items()}
    opt = spec.build([params[g.name] for g in task.groups])
    gen = torch.Generator().manual_seed(seed)
    times = []
    for i in range(steps + 10):
        idx = task.sample_batch(gen)

        def closure():
            opt.zero_grad()
            loss = task.loss(params, idx)
            loss.backward()
            return loss

        t0 = time.perf_counter()
        opt.step(closure)
        if i >= 10:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mnist:48-48:b64")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--data-dir")
    ap.add_argument("--optimizers", nargs="+", default=list(BASELINES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = make_task(args.task, data_dir=args.data_dir)
    tuned = load_tuned()
    specs = {n: (tuned.spec(n) if ":" not in n and n in tuned.settings else parse_optimizer(n)) for n in args.optimizers}
    ref = time_per_step(task, tuned.spec("adam"), args.steps)
    print(f"task {task.name} ({task.dim} coordinates), {args.steps} steps, 1 thread; Adam: {ref * 1e3:.3f} ms/iteration")
    print(f"{'optimizer':12s} {'ms/iter':>9s} {'× Adam':>8s}")
    for name, spec in specs.items():
        t = time_per_step(task, spec, args.steps)
        print(f"{name:12s} {t * 1e3:9.3f} {t / ref:8.2f}")


if __name__ == "__main__":
    main()
