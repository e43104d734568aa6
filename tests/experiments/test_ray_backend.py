"""The Ray backend (issue 15) on a local Ray instance with 2 CPUs, started once for this module:
the same run records as the local backend, a killed worker retried to the same summary, and a
killed driver resumed without redoing finished runs. Skipped without Ray (``pip install
l2o[ray]``), unless $L2O_REQUIRE_RAY is set (CI sets it: there a missing Ray is a failure)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import l2o.experiments.benchmark as bench
from l2o.cli import main
from l2o.execution import Executor, RayExecutor, make_executor
from l2o.experiments.benchmark import BenchmarkConfig, run_benchmark

if os.environ.get("L2O_REQUIRE_RAY", "") not in ("", "0"):
    import ray  # a failure, not a skip, where Ray must be installed
else:
    ray = pytest.importorskip("ray", reason="the ray backend needs `pip install l2o[ray]`")

TASKS = ("robust-linreg/test/0", "logreg/test/1")
OPTIMIZERS = ("sgd:lr=0.5", "adam:lr=0.05")
SEEDS, ITERS = 3, 150
GRID = ["--tasks", *TASKS, "--optimizers", *OPTIMIZERS, "--seeds", str(SEEDS), "--iterations", str(ITERS), "--quiet"]
TIMED = {"wall_time_s", "wall_clock_s"}  # measured, so they differ between any two executions
TIMED_COLUMNS = {"secs_to_target"}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance (2 CPUs) for the whole module; its address lets subprocess drivers join."""
    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ctx.address_info["address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The grid under the local backend (in this process): the records every Ray run must match."""
    out = tmp_path_factory.mktemp("local")
    assert main(["benchmark", *GRID, "--backend", "local", "--jobs", "1", "--out", str(out)]) == 0
    return out


def _records(out: Path) -> dict[str, dict]:
    recs = {}
    for f in sorted(out.glob("runs/*/*/*.json")):
        d = json.loads(f.read_text())
        recs[str(f.relative_to(out))] = {k: v for k, v in d.items() if k not in TIMED}
    return recs


def _summary(out: Path) -> list[dict]:
    import csv

    with open(out / "summary.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMED_COLUMNS} for row in csv.DictReader(f)]


def test_ray_backend_gives_the_local_backends_run_records(ray_cluster, local_reference, tmp_path, capsys):
    out = tmp_path / "ray"
    assert main(["benchmark", *GRID, "--backend", "ray", "--jobs", "2", "--out", str(out)]) == 0
    ref = _records(local_reference)
    assert len(ref) == len(TASKS) * len(OPTIMIZERS) * SEEDS
    assert _records(out) == ref  # identical apart from the measured wall times
    assert _summary(out) == _summary(local_reference)
    assert "Ray tasks" in (out / "summary.md").read_text()
    assert ray.is_initialized()  # the executor used the running instance and left it running


def test_a_worker_killed_mid_run_is_retried_to_the_same_summary(ray_cluster, local_reference, tmp_path, monkeypatch):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    victim = (TASKS[1], OPTIMIZERS[1], 1)
    real = bench._execute

    def dies_on_first_attempt(key, out, data_dir):  # pickled by value: runs in the Ray worker
        if (key.task, str(key.optimizer), key.seed) == victim:
            n = len(os.listdir(attempts))
            (attempts / f"attempt{n}").touch()
            if n == 0:
                os._exit(1)  # the worker process dies mid-run, no exception, no result
        return real(key, out, data_dir)

    monkeypatch.setattr(bench, "_execute", dies_on_first_attempt)
    config = BenchmarkConfig(tasks=TASKS, optimizers=OPTIMIZERS, seeds=SEEDS, iterations=ITERS, backend="ray")
    run_benchmark(config, tmp_path / "out", progress=False)
    assert sorted(os.listdir(attempts)) == ["attempt0", "attempt1"]  # killed once, retried once
    assert _summary(tmp_path / "out") == _summary(local_reference)
    assert _records(tmp_path / "out") == _records(local_reference)


def test_a_worker_that_keeps_dying_is_an_error_naming_the_retries(ray_cluster):
    with make_executor("ray", max_retries=1) as ex:
        assert isinstance(ex, RayExecutor)
        assert ex.map(abs, [-1, 2, -3]) == [1, 2, 3]
        with pytest.raises(RuntimeError, match=r"died 2 time\(s\) \(max_retries=1\)"):
            ex.map(os._exit, [1])
        with pytest.raises(ZeroDivisionError):  # an exception of the function keeps its type, no retry
            ex.map(lambda x: 1 // x, [1, 0])


class _Recording(Executor):
    """Delegates to a Ray executor and records the items it is asked to run."""

    backend = "ray"

    def __init__(self) -> None:
        self.inner = make_executor("ray")
        self.items: list = []

    def map_unordered(self, fn, items):
        items = list(items)
        self.items += items
        return self.inner.map_unordered(fn, items)


def test_a_killed_driver_resumes_without_rerunning_finished_runs(ray_cluster, local_reference, tmp_path):
    out = tmp_path / "killed"
    keys = BenchmarkConfig(tasks=TASKS, optimizers=OPTIMIZERS, seeds=SEEDS, iterations=ITERS).keys()
    # A driver in its own process on the same Ray instance, killed (SIGKILL) once 2 records are stored.
    log = tmp_path / "driver.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "l2o.cli", "benchmark", *GRID, "--backend", "ray",
                              "--address", ray_cluster, "--out", str(out)], stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and len(list(out.glob("runs/*/*/*.json"))) < 2:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)  # the driver dies; its tasks in flight are lost with it
    p.wait()
    finished = {f: f.stat().st_mtime_ns for f in out.glob("runs/*/*/*.json")}
    assert 2 <= len(finished) < len(keys), f"the kill should land mid-grid; driver's output:\n{log.read_text()}"
    assert not list(out.glob("runs/*/*/.*.tmp")), "a record is either complete or absent"

    # The rerun (here in this process, on the warm workers) submits exactly the missing runs.
    ex = _Recording()
    run_benchmark(BenchmarkConfig(tasks=TASKS, optimizers=OPTIMIZERS, seeds=SEEDS, iterations=ITERS, backend="ray"),
                  out, progress=False, executor=ex)
    assert sorted(map(str, ex.items)) == sorted(str(k) for k in keys if k.path(out) not in finished)
    for f, mtime in finished.items():
        assert f.stat().st_mtime_ns == mtime, f"{f} was redone"
    assert _records(out) == _records(local_reference)


def test_gps_iterations_with_ray_rollouts_equal_the_in_process_ones(ray_cluster, tmp_path):
    """Meta-training rollouts as Ray tasks (issue 15): multi-condition GPS and Convolutional GPS give
    bit for bit the iterations of the in-process run (records apart from wall times, π, ψ)."""
    from tests.outer.gps.test_gps_executor import conv_run, multi_condition_run, same

    with RayExecutor(jobs=2) as ex:
        same(multi_condition_run(tmp_path / "m0", None), multi_condition_run(tmp_path / "m1", ex))
        same(conv_run(tmp_path / "c0", None), conv_run(tmp_path / "c1", ex))
