"""Throughput of the execution backends: ``--backend ray`` against ``--backend local`` on this machine.

Runs the run grid of ``l2o reproduce --quick`` (5 figures × 3 digits projections × the paper's nine
optimizers × 2 seeds = 270 runs, T = 10 or 20) through :func:`l2o.experiments.benchmark.run_grid`
exactly as ``l2o reproduce`` does (one executor shared by the five figures, the driver saving each
record), once per backend with the same number of worker CPUs, into fresh folders. Reports, per
backend, the start-up (executor up: process pool spawned, or Ray instance started, and its workers
up with torch and l2o imported), the run phase,
and runs per minute over both (what a user waits for) and over the run phase alone (steady state),
then the ratio ray ÷ local. The figures, tables and document that ``reproduce`` writes afterwards
cost the same on both backends and are left out. It also checks that both backends wrote the same
run records (apart from measured wall times).

``--repeats N`` alternates local and ray N times (the medians are reported), so background load
affects both alike. ``--figures`` limits the grid to some figures (a subset, said so in the output).
Usage:

    python benchmarks/bench_backend.py [--jobs 2] [--repeats 1] [--figures 1 2 3 4 5] [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from l2o.execution import make_executor
from l2o.experiments.benchmark import run_grid
from l2o.experiments.reproduce import ReproduceConfig, check_optimizers
from l2o.experiments.store import RunKey

TIMED = ("wall_time_s", "wall_clock_s")


def quick_grid(seeds: int, figures: list[int] | None) -> dict[int, list[RunKey]]:
    """The keys of ``l2o reproduce --quick`` per figure (as :func:`l2o.experiments.reproduce.reproduce` builds them)."""
    config = ReproduceConfig(quick=True, seeds=seeds)
    statuses = check_optimizers(config.optimizers, config.tuned)
    missing = [s.text for s in statuses if not s.available]
    if missing:
        raise SystemExit(f"optimizers that cannot run here: {missing}")
    out = {}
    for st in config.grid_settings():
        if figures and st.figure not in figures:
            continue
        out[st.figure] = [RunKey(st.task(slot), s.spec, seed, st.iterations)  # type: ignore[arg-type]
                          for slot in config.slots() for s in statuses for seed in range(config.n_seeds)]
    return out


def _warm(i: int) -> int:
    """Bring a worker up to where a run starts: torch and l2o imported (both backends alike)."""
    import l2o.experiments.benchmark  # noqa: F401

    time.sleep(0.5)  # so each worker gets one
    return os.getpid()


def one_pass(backend: str, jobs: int, grid: dict[int, list[RunKey]], out: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    ex = make_executor(backend, jobs)
    try:
        ex.map(_warm, list(range(jobs)))  # workers up, torch and l2o imported (pool spawned / Ray started)
        t1 = time.perf_counter()
        for fig, keys in grid.items():
            run_grid(keys, out / f"fig{fig}", jobs, progress=False, executor=ex)
        t2 = time.perf_counter()
    finally:
        ex.close()
    return {"startup_s": t1 - t0, "runs_s": t2 - t1, "total_s": t2 - t0}


def records(out: Path) -> dict[str, dict]:
    recs = {}
    for f in sorted(out.glob("fig*/runs/*/*/*.json")):
        d = json.loads(f.read_text())
        recs[str(f.relative_to(out))] = {k: v for k, v in d.items() if k not in TIMED}
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker CPUs for both backends")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--figures", type=int, nargs="+", help="a subset of the figures (default: all five)")
    args = ap.parse_args()
    grid = quick_grid(args.seeds, args.figures)
    n = sum(len(k) for k in grid.values())
    subset = "" if not args.figures or sorted(args.figures) == [1, 2, 3, 4, 5] else \
        f" (SUBSET: figures {sorted(grid)})"
    print(f"grid: l2o reproduce --quick{subset}: {n} runs; {args.jobs} worker CPUs per backend; "
          f"{args.repeats} repeat(s), alternating; machine: {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    results: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for backend in ("local", "ray"):
                out = Path(tmp) / f"{backend}{r}"
                res = one_pass(backend, args.jobs, grid, out)
                results[backend].append(res)
                print(f"  {backend:5s} pass {r + 1}: start-up {res['startup_s']:.1f} s, runs {res['runs_s']:.1f} s",
                      flush=True)
        same = records(Path(tmp) / "local0") == records(Path(tmp) / "ray0")
        assert len(records(Path(tmp) / "local0")) == n
    print(f"\nrun records identical across backends (apart from wall times): {same}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| backend | start-up (s) | run phase (s) | runs/min incl. start-up | runs/min, run phase |")
    print("|---|---|---|---|---|")
    med = {}
    for backend, rs in results.items():
        m = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        med[backend] = m
        print(f"| {backend} (--jobs {args.jobs}) | {m['startup_s']:.1f} | {m['runs_s']:.1f} | "
              f"{60 * n / m['total_s']:.0f} | {60 * n / m['runs_s']:.0f} |")
    print(f"\nray ÷ local throughput: {med['local']['total_s'] / med['ray']['total_s']:.2f} including start-up, "
          f"{med['local']['runs_s'] / med['ray']['runs_s']:.2f} in the run phase")
    if not same:
        raise SystemExit("the backends wrote different run records")


if __name__ == "__main__":
    main()
