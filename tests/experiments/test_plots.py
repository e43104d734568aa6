"""The benchmark figure's objective axis: logarithmic when the curves span more than a decade."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.axes import Axes

from l2o.experiments.plots import objective_scale, plot_benchmark
from l2o.experiments.runner import RunResult


def _run(opt: str, curve: list[float], seed: int = 0) -> RunResult:
    return RunResult(task="t", optimizer=opt, seed=seed, iterations=len(curve) - 1, true_loss=curve,
                     batch_loss=curve[:-1], evals=[1] * (len(curve) - 1), diverged_at=None, wall_time_s=0.0)


@pytest.mark.parametrize("curves, scale", [
    ([np.geomspace(2.5, 0.001, 50)], "log"),  # the demo's range
    ([np.linspace(2.5, 0.3, 50), np.linspace(2.4, 0.2, 50)], "log"),  # 12.5x across curves
    ([np.linspace(2.5, 0.5, 50)], "linear"),  # within a decade
    ([np.linspace(1.0, -1.0, 50)], "linear"),  # negative objective: no log axis
    ([np.linspace(1.0, 0.0, 50)], "linear"),  # exactly 0
    ([np.array([np.nan, np.inf])], "linear"),
    ([np.array([5.0, 0.1, np.nan])], "log"),  # a diverged tail is ignored
])
def test_objective_scale(curves, scale):
    assert objective_scale(curves) == scale


def test_figure_uses_the_log_axis_only_for_panels_that_need_it(tmp_path, monkeypatch):
    calls: list[str] = []
    original = Axes.set_yscale
    monkeypatch.setattr(Axes, "set_yscale", lambda self, v, **kw: (calls.append(v), original(self, v, **kw))[1])
    wide = [_run(o, list(np.geomspace(2.5 + s, 0.001, 41)), s) for o in ("a", "b") for s in range(2)]
    narrow = [RunResult(**{**_run("a", list(np.linspace(2.5, 1.0, 41))).__dict__, "task": "u"})]
    path = plot_benchmark(wide + narrow, tmp_path / "f.png", title="x")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert calls == ["log"]


def test_a_blowing_up_curve_does_not_flatten_the_others_and_is_flagged(tmp_path, monkeypatch):
    """The axis ends at TOP_FACTOR × the highest start, a curve that ends above it says so in the legend
    (an early spike that comes back does not), and
    15 optimizers get 15 distinct colours (tab10 would repeat 4)."""
    import matplotlib.pyplot as plt

    from l2o.experiments.plots import TOP_FACTOR

    saved = {}
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *a, **k: saved.setdefault("fig", self))
    good = [_run(f"opt{i}", list(np.linspace(2.5, 1.0 + 0.05 * i, 41))) for i in range(13)]
    bad = _run("boom", list(np.geomspace(2.5, 1e9, 41)))
    good.append(_run("spike", [2.5, 100.0] + list(np.linspace(2.4, 1.2, 39))))  # back on the axis: not flagged
    plot_benchmark(good + [bad], tmp_path / "f.png")
    ax = saved["fig"].axes[0]
    assert ax.get_ylim()[1] <= TOP_FACTOR * 2.5 + 1e-9
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[-1] == "boom ↑ ends off the axis" and not any("off the axis" in s for s in labels[:-1])
    colours = {tuple(line.get_color()) for line in ax.lines}
    assert len(colours) == 15
