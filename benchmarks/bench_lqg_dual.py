"""The ψ-step's dual search on η: cached η-independent cost terms vs rebuilding them per η.

Times :func:`l2o.outer.gps.lqg.solve_trust_region` (which builds c̃ − λᵀa, −log ψ_old and ν·(−log π̂)
once per ψ-step, and does not re-validate sums of validated costs) against the same bisection
with :func:`l2o.outer.gps.lqg.solve_fixed_eta` per η and every cost validated (the reference: the code
before the cache), on random problems of a 2016-smallnet-like size, in
one process, one thread. Both give bitwise the same ψ (tests/outer/gps/test_gps_lqg.py).

    python benchmarks/bench_lqg_dual.py [--T 40] [--D 300] [--d 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from l2o.outer.gps import lqg
from l2o.outer.gps.cost import QuadraticCost

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the random problems of the tests
from tests.outer.gps.conftest import random_cost, random_dynamics, random_policy, spd


def _validated(cls, C, d, h, dim_s):
    """The pre-cache behaviour: every sum and scaling of costs is validated again."""
    return cls(C, d, h, dim_s)


class _Reference:
    """Stands in for the cached solver: solve_fixed_eta from scratch for every η."""

    def __init__(self, dynamics, cost, prev_policy, lambda_, nu, pi_fit, group) -> None:
        self.args = (dynamics, cost, prev_policy)
        self.kw = dict(lambda_=lambda_, nu=nu, pi_fit=pi_fit, group=group)

    def __call__(self, eta: float, value: bool = True):
        return lqg.solve_fixed_eta(*self.args, eta, **self.kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=40)
    ap.add_argument("--D", type=int, default=300)
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    T, D, d = args.T, args.D, args.d
    dyn, cost = random_dynamics(T, D, d, g, noise=0.1), random_cost(T, D, d, g)
    old, pi = random_policy(T, D, d, g, gain=0.01, var=0.5), random_policy(T, D, d, g, gain=0.01, var=0.5)
    mu0, sigma0 = torch.randn(D, dtype=torch.float64, generator=g), 0.1 * spd(D, g)
    lam = torch.zeros(T, d, dtype=torch.float64)

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        r = lqg.solve_trust_region(dyn, cost, old, mu0, sigma0, 5.0, nu=0.1, pi_fit=pi, lambda_=lam)
        return time.perf_counter() - t0, r.eta

    times = {"cached": [], "reference": []}
    etas = {}
    for _ in range(args.repeats):  # interleaved, so machine load affects both alike
        dt, etas["cached"] = run()
        times["cached"].append(dt)
        with mock.patch.object(lqg, "_FixedEtaSolver", _Reference), \
                mock.patch.object(QuadraticCost, "_unchecked", classmethod(_validated)):
            dt, etas["reference"] = run()
        times["reference"].append(dt)
    best = {k: min(v) for k, v in times.items()}
    print(f"trust-region ψ-step, T={T}, D={D}, d={d}, best of {args.repeats} (1 thread):")
    print(f"  reference (rebuild and validate per η): {best['reference']:.2f} s   cached: {best['cached']:.2f} s   "
          f"speed-up {best['reference'] / best['cached']:.2f}x   (same η: {etas['cached'] == etas['reference']})")


if __name__ == "__main__":
    main()
