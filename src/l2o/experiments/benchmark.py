"""The benchmark harness: optimizers × tasks × seeds, in parallel processes, resumable.

:func:`run_grid` executes a list of :class:`RunKey` (skipping those already on disk, saving each
as soon as it finishes); :func:`run_benchmark` adds the outputs people read — per-run curves
(the JSON records), ``summary.csv``/``summary.md`` and ``figure.png`` — and a manifest.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import l2o
from l2o.config import check_keys
from l2o.execution import Executor, check_backend, describe_execution, make_executor
from l2o.baselines.registry import OptimizerSpec, parse_optimizer
from l2o.experiments.plots import plot_benchmark
from l2o.experiments.runner import RunResult, run_optimizer
from l2o.experiments.store import RunKey, load_result, save_result, write_json_atomic
from l2o.experiments.summary import TARGET_RULE, CellStats, markdown_table, summarize, write_csv


def _execute(key: RunKey, out: str | None, data_dir: str | None) -> RunResult:
    """Worker entry point: build the task, run, return the record (and save it atomically under
    ``out`` when given; :func:`run_grid` passes None and saves in the driver)."""
    from l2o.tasks.registry import make_task

    torch.set_num_threads(1)
    task = make_task(key.task, data_dir=data_dir)
    result = run_optimizer(task, key.optimizer, key.seed, key.iterations)
    if out is not None:
        save_result(key, result, Path(out))
    return result


def _run_key(execute: Callable[[RunKey, str | None, str | None], RunResult], data_dir: str | None,
             key: RunKey) -> RunResult:
    """What an executor calls for one key (picklable as a ``functools.partial``; ``execute`` is
    bound in the driver, so the function shipped to workers is the one the driver sees)."""
    return execute(key, None, data_dir)


def run_grid(keys: Sequence[RunKey], out: Path, jobs: int | None = 1, data_dir: str | None = None,
             progress: bool = True, desc: str = "runs", *, backend: str = "local", address: str | None = None,
             executor: Executor | None = None) -> list[RunResult]:
    """Run every key not already stored under ``out``; return all records in ``keys`` order.

    Runs go to ``executor`` if given (left open), else to one made by
    :func:`l2o.execution.make_executor` from ``backend``, ``jobs`` and ``address`` (closed at the
    end): with the local backend and ``jobs > 1`` a pool of spawned processes, with ``ray`` one
    Ray task per run. Every run is a pure function of its key (one torch thread), so the backend
    does not change the records. The driver (this process) saves each record atomically the moment
    it comes back, so a crash or Ctrl-C — of the driver or of a worker — loses only the runs in
    flight; rerunning the same call resumes and redoes nothing finished.
    """
    out = Path(out)
    done: dict[RunKey, RunResult] = {}
    todo: list[RunKey] = []
    for k in keys:
        r = load_result(k, out)
        if r is None:
            todo.append(k)
        else:
            done[k] = r
    from tqdm.auto import tqdm

    owned = executor is None and bool(todo)
    if owned:
        executor = make_executor(backend, jobs, address)
    bar = tqdm(total=len(keys), initial=len(done), desc=desc, disable=not progress, unit="run")
    try:
        if todo:
            assert executor is not None
            job = functools.partial(_run_key, _execute, data_dir)
            for i, result in executor.map_unordered(job, todo):
                save_result(todo[i], result, out)
                done[todo[i]] = result
                bar.update()
    finally:
        bar.close()
        if owned and executor is not None:
            executor.close()
    return [done[k] for k in keys]


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to benchmark. Optimizers are specs (``adam`` or ``adam:lr=0.001``); bare names of
    hand-designed baselines take their tuned hyperparameters from the tuned-settings file."""

    tasks: tuple[str, ...]
    optimizers: tuple[str, ...]
    seeds: int = 5
    iterations: int = 400
    jobs: int | None = 1  # worker processes (local) / CPUs of the local Ray instance; None = all CPUs
    data_dir: str | None = None
    tuned: str | None = None  # path of a tuned-settings file; None = the one shipped with l2o
    title: str | None = None
    seed_offset: int = 0
    backend: str = "local"  # where runs execute: "local" or "ray" (see l2o.execution)
    address: str | None = None  # Ray cluster address (backend "ray" only); None = a local Ray instance

    def __post_init__(self) -> None:
        # A repeated task or optimizer would run (and count) the same runs twice: keep the first.
        object.__setattr__(self, "tasks", tuple(dict.fromkeys(self.tasks)))
        object.__setattr__(self, "optimizers", tuple(dict.fromkeys(self.optimizers)))
        if not self.tasks:
            raise ValueError("benchmark needs at least one task")
        if not self.optimizers:
            raise ValueError("benchmark needs at least one optimizer")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        check_backend(self.backend, self.jobs, self.address)
        from l2o.tasks.registry import parse_task

        for t in self.tasks:
            parse_task(t)  # a clear error now, not in a worker process

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchmarkConfig:
        """Build from a config mapping, rejecting unknown keys by name."""
        check_keys(cls, d, "benchmark")
        d = dict(d)
        from l2o.tasks.registry import expand_task_specs

        for k in ("tasks", "optimizers"):
            if k in d:
                d[k] = tuple([d[k]] if isinstance(d[k], str) else d[k])
        if "tasks" in d:
            d["tasks"] = tuple(expand_task_specs(d["tasks"]))
        return cls(**d)

    def specs(self) -> list[OptimizerSpec]:
        """Resolve optimizer strings, filling tuned hyperparameters for bare baseline names; a spec
        that resolves to one already listed (``adam`` and its tuned ``adam:lr=...``) is dropped."""
        from l2o.baselines.tuned import load_tuned

        tuned = None
        out = []
        for text in self.optimizers:
            spec = parse_optimizer(text)
            if not spec.hparams and ":" not in text:
                from l2o.baselines.registry import get_optimizer

                if not get_optimizer(spec.name).learned:
                    tuned = tuned or load_tuned(self.tuned)
                    spec = tuned.spec(spec.name)
            if spec not in out:
                out.append(spec)
        return out

    def run_definition(self) -> dict[str, Any]:
        """What determines the set of runs (recorded per output folder; a rerun must match it)."""
        return {"tasks": list(self.tasks), "optimizers": [str(s) for s in self.specs()], "seeds": self.seeds,
                "iterations": self.iterations, "seed_offset": self.seed_offset}

    def keys(self) -> list[RunKey]:
        specs = self.specs()
        return [RunKey(t, s, self.seed_offset + i, self.iterations)
                for t in self.tasks for s in specs for i in range(self.seeds)]


@dataclass
class BenchmarkReport:
    results: list[RunResult]
    cells: list[CellStats]
    out: Path
    files: dict[str, Path] = field(default_factory=dict)


def environment() -> dict[str, str]:
    """Versions and machine, for the provenance of every written result."""
    return {"l2o": l2o.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": str(os.cpu_count())}


RECORD_NAME = "benchmark-config.json"
"""The run definition recorded in an output folder by its first benchmark."""
LOCK_NAME = ".lock"


class OutputFolderError(ValueError):
    """An output folder is in use by another benchmark, or holds a different benchmark."""


@contextmanager
def locked_output(out: Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``out`` (``OUT/.lock``, released when the process ends, even by
    kill -9); a second benchmark on the same folder fails at once with :class:`OutputFolderError`."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK_NAME, "a+")  # noqa: SIM115
    except OSError as e:
        raise OutputFolderError(f"cannot use {out} as the output folder: {e.strerror or e}") from e
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputFolderError(f"{out} is in use by another benchmark (it holds {out / LOCK_NAME}); "
                                        "wait for it to finish or choose another --out") from None
        yield out
    finally:
        f.close()


def check_recorded_config(config: BenchmarkConfig, out: Path) -> None:
    """Record ``config``'s run definition in ``out`` the first time; on a rerun it must match, so
    that ``summary.*`` always describe exactly the run files of one benchmark."""
    mine = config.run_definition()
    path = Path(out) / RECORD_NAME
    theirs: dict[str, Any] | None = None
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise OutputFolderError(f"{path} is unreadable ({e}); delete it or choose another --out") from e
    elif (Path(out) / "benchmark.json").exists():  # written before the record existed
        try:
            old = json.loads((Path(out) / "benchmark.json").read_text())
            theirs = {**{k: old["config"][k] for k in ("tasks", "seeds", "iterations", "seed_offset")},
                      "optimizers": old["resolved_optimizers"]}
        except (OSError, ValueError, KeyError, TypeError):
            theirs = None
    if theirs is None:
        write_json_atomic(path, mine)
        return
    def same(k: str) -> bool:  # the order of tasks and optimizers does not change the runs
        a, b = theirs.get(k), mine[k]
        return sorted(a) == sorted(b) if k in ("tasks", "optimizers") and isinstance(a, list) else a == b

    diff = [k for k in mine if not same(k)]
    if diff:
        def show(v: Any) -> str:
            text = json.dumps(v)
            return text if len(text) <= 60 else text[:57] + "..."

        detail = "; ".join(f"{k}: {show(theirs.get(k))} there, {show(mine[k])} now" for k in diff)
        raise OutputFolderError(f"{out} holds a benchmark with a different configuration ({detail}); rerun with "
                                "the same settings to resume it, or choose another --out")


def run_benchmark(config: BenchmarkConfig, out: Path, progress: bool = True,
                  executor: Executor | None = None) -> BenchmarkReport:
    """Run (or resume) the benchmark and write summary tables, the figure and a manifest.

    The output folder is locked for the duration and records the run definition: a concurrent
    benchmark, or a rerun with different tasks/optimizers/seeds/iterations, raises
    :class:`OutputFolderError` before anything is run or written. Runs execute on ``executor``
    if given, else on config's backend (the backend is not part of the run definition: a
    benchmark started on one backend can be resumed on the other)."""
    keys = config.keys()  # parses every spec before anything touches the disk
    with locked_output(Path(out)) as out:
        check_recorded_config(config, out)
        return _run_benchmark(config, keys, out, progress, executor)


def _run_benchmark(config: BenchmarkConfig, keys: list[RunKey], out: Path, progress: bool,
                   executor: Executor | None = None) -> BenchmarkReport:
    t0 = time.perf_counter()
    results = run_grid(keys, out, config.jobs, config.data_dir, progress, desc="benchmark", backend=config.backend,
                       address=config.address, executor=executor)
    where = executor.describe() if executor is not None else \
        describe_execution(config.backend, config.jobs, config.address)
    shown = group_families(results)
    cells = summarize(shown)
    files = {"csv": out / "summary.csv", "markdown": out / "summary.md", "figure": out / "figure.png",
             "manifest": out / "benchmark.json"}
    write_csv(cells, files["csv"])
    labels = {str(s): s.display for s in config.specs()}
    header = f"# Benchmark{': ' + config.title if config.title else ''}\n\n" \
             f"{config.seeds} seeds × {config.iterations} iterations. Final objective and AUC: mean ± 95% " \
             f"t-interval over seeds (AUC = mean true objective over iterations 1..T). Bold: best per task.\n\n" \
             f"Time to target: {TARGET_RULE}. Runs execute in {where}, one torch thread " \
             f"each, so seconds also reflect the machine's load.\n\n"
    files["markdown"].write_text(header + markdown_table(cells))
    plot_benchmark(shown, files["figure"], title=config.title, labels=labels)
    write_json_atomic(files["manifest"], {
        "config": asdict(config),
        "resolved_optimizers": [str(s) for s in config.specs()],
        "environment": environment(),
        "wall_time_s_this_invocation": time.perf_counter() - t0,
        "run_wall_time_s_total": sum(r.wall_time_s for r in results),
    })
    return BenchmarkReport(results, cells, out, files)


GROUP_THRESHOLD = 12


def group_families(results: list[RunResult], threshold: int = GROUP_THRESHOLD) -> list[RunResult]:
    """With more than ``threshold`` tasks, pool the instances of each 2016 family and split
    (``logreg/test/3`` → ``logreg/test/*``), so tables and panels show the mean over problems
    and seeds; per-run records on disk keep their own task names."""
    import dataclasses

    if len({r.task for r in results}) <= threshold:
        return results
    return [dataclasses.replace(r, task=r.task.rsplit("/", 1)[0] + "/*") if r.task.count("/") == 2 else r
            for r in results]


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a benchmark/tuning config from TOML or JSON (by suffix); a missing, unreadable or
    malformed file is a ``ValueError`` naming it."""
    from l2o.config import read_config_file

    return read_config_file(path)
