"""Wall clock in run records, the time-to-target column and the wall-clock panels (issue 14)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from l2o.experiments.benchmark import BenchmarkConfig, run_benchmark
from l2o.experiments.plots import plot_benchmark
from l2o.experiments.runner import RunResult
from l2o.experiments.store import RunKey, load_result, save_result
from l2o.experiments.summary import first_reach, lower_median, markdown_table, summarize, task_targets, time_to_target


def _run(opt: str, curve: list[float | None], seed: int = 0, clock: list[float | None] | None = None,
         task: str = "t") -> RunResult:
    T = len(curve) - 1
    div = next((t for t, v in enumerate(curve) if v is None), None)
    return RunResult(task=task, optimizer=opt, seed=seed, iterations=T, true_loss=curve,
                     batch_loss=[1.0] * T, evals=[1] * T, diverged_at=div, wall_time_s=0.0, wall_clock_s=clock)


def test_first_reach_and_lower_median():
    assert first_reach([3.0, 2.0, 1.0, 0.5], 1.0) == 2
    assert first_reach([3.0, None, None], 1.0) is None
    assert first_reach([0.5, 2.0], 1.0) == 0
    assert lower_median([4.0, 1.0, 3.0]) == 3.0
    assert lower_median([4.0, 1.0, math.inf, 2.0]) == 2.0  # the 2nd of 4: by then half had reached it
    assert lower_median([1.0, math.inf, math.inf]) == math.inf


def test_time_to_target_on_synthetic_curves_with_a_known_answer():
    # Baseline "sgd:lr=0.1" (a registered hand-designed optimizer): finals 0.5, 0.4, 0.6 -> median 0.5.
    base = [_run("sgd:lr=0.1", [2.0, 1.0, 0.7, 0.5], s, [1.0, 2.0, 3.0]) for s in range(1)] + \
           [_run("sgd:lr=0.1", [2.0, 0.9, 0.6, 0.4], 1, [1.0, 2.0, 3.0]),
            _run("sgd:lr=0.1", [2.0, 1.1, 0.8, 0.6], 2, [1.0, 2.0, 3.0])]
    # A worse baseline (median final 0.9) does not set the target.
    worse = [_run("adam:lr=0.1", [2.0, 1.5, 1.2, 0.9], s, [0.1, 0.2, 0.3]) for s in range(3)]
    # "psd" is learned: reaches 0.5 at t = 1, 2, never; clocks differ per seed.
    fast = [_run("psd", [2.0, 0.5, 0.4, 0.3], 0, [10.0, 20.0, 30.0]),
            _run("psd", [2.0, 0.8, 0.45, 0.3], 1, [11.0, 22.0, 33.0]),
            _run("psd", [2.0, 0.8, None, None], 2, [12.0, None, None])]
    assert task_targets(base + worse + fast) == {"t": (0.5, "sgd:lr=0.1")}
    cells = {c.optimizer: c for c in summarize(base + worse + fast)}
    assert cells["sgd:lr=0.1"].target == 0.5 and cells["psd"].target_from == "sgd:lr=0.1"
    # sgd seeds reach 0.5 at t = 3, 2, never -> lower median 3 iterations, 3.0 s.
    assert (cells["sgd:lr=0.1"].iters_to_target, cells["sgd:lr=0.1"].secs_to_target) == (3.0, 3.0)
    assert (cells["psd"].iters_to_target, cells["psd"].secs_to_target) == (2.0, 22.0)
    assert math.isnan(cells["adam:lr=0.1"].iters_to_target) and math.isnan(cells["adam:lr=0.1"].secs_to_target)
    table = markdown_table(list(cells.values()))
    assert "f(x_t) ≤ 0.5, the median final objective of `sgd:lr=0.1`" in table
    assert "| 2 it / 22 s |" in table and "| 3 it / 3 s |" in table
    assert [ln for ln in table.splitlines() if ln.startswith("| adam")][0].count("| — |") == 1


def test_old_records_without_wall_clock_show_a_dash_for_seconds():
    runs = [_run("sgd:lr=0.1", [2.0, 1.0, 0.5], s) for s in range(3)]
    it, sec = time_to_target(runs, 0.5)
    assert it == 2.0 and math.isnan(sec)
    assert "| 2 it / — s |" in markdown_table(summarize(runs))
    only_learned = summarize([_run("psd", [2.0, 1.0, 0.5])])
    assert math.isnan(only_learned[0].target) and "no hand-designed baseline" in markdown_table(only_learned)


def test_format1_records_load_and_resume(tmp_path, tiny_task):
    from l2o.baselines.registry import OptimizerSpec
    from l2o.experiments.runner import run_optimizer

    spec = OptimizerSpec.make("sgd", {"lr": 0.1})
    r = run_optimizer(tiny_task, spec, seed=0, iterations=4)
    assert len(r.wall_clock_s) == 4 and all(b >= a >= 0 for a, b in zip(r.wall_clock_s, r.wall_clock_s[1:]))
    d = r.to_dict()
    assert d["format"] == 2 and RunResult.from_dict(d) == r
    old = {k: v for k, v in d.items() if k not in ("format", "wall_clock_s")}  # as written before issue 14
    back = RunResult.from_dict(old)
    assert back.wall_clock_s is None and back.true_loss == r.true_loss
    assert "format" not in back.to_dict()  # written back in its own format
    key = RunKey(tiny_task.name, spec, 0, 4)
    save_result(key, back, tmp_path)
    assert load_result(key, tmp_path) == back
    for bad in ({**d, "format": 3}, {**d, "wall_clock_s": [0.1, 0.2]}, {**d, "wall_clock_s": [0.3, 0.2, 0.4, 0.5]},
                {k: v for k, v in d.items() if k != "wall_clock_s"}):
        with pytest.raises(ValueError):
            RunResult.from_dict(bad)


def _axes_of(monkeypatch):
    import matplotlib.figure

    made = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (made.append(self), real(self, *a, **k))[1])
    return made


def test_figure_has_a_wall_clock_row_only_when_runs_have_clocks(tmp_path, monkeypatch):
    made = _axes_of(monkeypatch)
    curve = list(np.linspace(2.0, 1.0, 11))
    plot_benchmark([_run("a", curve, s, list(np.arange(1, 11) * (s + 1.0))) for s in range(2)] +
                   [_run("a", curve, 0, None, task="u")], tmp_path / "f.png")
    plot_benchmark([_run("a", curve, 0, None)], tmp_path / "g.png")
    timed, untimed = made
    labels = [ax.get_xlabel() for ax in timed.axes]
    assert labels.count("iteration") == 2 and sum("wall-clock" in lab for lab in labels) == 1
    clock_ax = next(ax for ax in timed.axes if "wall-clock" in ax.get_xlabel())
    x = clock_ax.lines[0].get_xdata()
    assert x[0] == 0.0 and x[-1] == pytest.approx(15.0)  # mean of 10 s and 20 s cumulative
    assert [ax.get_xlabel() for ax in untimed.axes] == ["iteration"]


def test_tiny_benchmark_writes_the_column_and_the_two_row_figure(tmp_path, monkeypatch):
    made = _axes_of(monkeypatch)
    cfg = BenchmarkConfig(tasks=("logreg/test/0",), optimizers=("sgd:lr=0.5", "adam:lr=0.05"), seeds=2, iterations=8)
    rep = run_benchmark(cfg, tmp_path, progress=False)
    md = rep.files["markdown"].read_text()
    assert "to target (iterations / seconds)" in md and "best hand-designed baseline's median final" in md
    assert " it / " in md
    header = rep.files["csv"].read_text().splitlines()[0]
    assert header.endswith("target,target_from,iters_to_target,secs_to_target")
    (fig,) = made
    assert [ax.get_xlabel() for ax in fig.axes][:1] == ["iteration"]
    assert any("wall-clock" in ax.get_xlabel() for ax in fig.axes)
    assert all(r.wall_clock_s is not None for r in rep.results)
