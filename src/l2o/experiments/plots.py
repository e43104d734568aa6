"""Figures in the style of the paper's Figures 1–5: true objective vs iteration, one panel per task,
one line per optimizer (mean over seeds) with a shaded 95% interval. Diverged runs end their line
where they diverged and are marked ✕ in the legend count. A panel whose curves span more than a
decade (all positive) gets a logarithmic objective axis (:func:`objective_scale`). The axis stops at
:data:`TOP_FACTOR` × the highest starting value, so one blowing-up curve cannot flatten the others;
a curve that ends above the axis says so in the legend ("↑ ends off the axis"). Up to 20 optimizers get
distinct colours (tab10, then tab20).

When any run carries a wall clock (run-record format 2), each row of iteration panels gets a row of
wall-clock panels beneath it: the same mean curves against the mean over seeds of the cumulative
seconds in ``optimizer.step`` (:func:`_time_axis`); runs without a wall clock are left out there."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from l2o.experiments.runner import RunResult  # noqa: E402


def _curves(runs: list[RunResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-iteration mean and 95% half-width over the runs still finite at each iteration."""
    y = np.array([[math.nan if v is None else v for v in r.true_loss] for r in runs], dtype=float)
    n = np.sum(np.isfinite(y), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(np.where(np.isfinite(y), y, np.nan), axis=0) if y.size else y
        sd = np.nanstd(y, axis=0, ddof=1) if len(runs) > 1 else np.zeros(y.shape[1])
        half = np.where(n > 1, stats.t.ppf(0.975, np.maximum(n - 1, 1)) * sd / np.sqrt(np.maximum(n, 1)), 0.0)
    mean[n == 0] = np.nan
    return np.arange(y.shape[1]), mean, np.nan_to_num(half)


def _time_axis(runs: list[RunResult]) -> np.ndarray:
    """Mean over runs of the cumulative wall-clock seconds at t = 0..T (0 at t = 0; NaN where no
    run still has a time)."""
    w = np.array([[0.0] + [math.nan if v is None else v for v in r.wall_clock_s] for r in runs], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns after divergence
        return np.nanmean(w, axis=0)


TOP_FACTOR = 3.0
"""The objective axis ends at this multiple of the highest mean starting value f(x_0) of the panel."""
LOG_SPAN = 10.0
"""A panel's objective axis is logarithmic when its curves span more than this factor."""


def objective_scale(curves: Iterable[np.ndarray]) -> str:
    """``"log"`` when the finite values of the mean curves are all positive and span more than a
    decade (max/min > ``LOG_SPAN``), else ``"linear"`` (a log axis cannot show 0 or negatives)."""
    finite = [c[np.isfinite(c)] for c in curves]
    values = np.concatenate(finite) if finite else np.array([])
    if values.size == 0 or values.min() <= 0:
        return "linear"
    return "log" if values.max() / values.min() > LOG_SPAN else "linear"


def plot_benchmark(results: Iterable[RunResult], path: Path, title: str | None = None,
                   labels: dict[str, str] | None = None) -> Path:
    """Write the figure to ``path`` (format from the suffix) and return it."""
    results = list(results)
    tasks = list(dict.fromkeys(r.task for r in results))
    if not tasks:
        raise ValueError("no results to plot")
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    timed = any(r.wall_clock_s is not None for r in results)
    per = 2 if timed else 1  # axes rows per row of tasks: iteration, then wall clock
    fig, grid = plt.subplots(rows * per, cols, figsize=(5.2 * cols, 3.8 * rows * per), squeeze=False)
    axes = grid[0::per]
    time_axes = grid[1::per] if timed else None
    optimizers = list(dict.fromkeys(r.optimizer for r in results))
    n_col = 10 if len(optimizers) <= 10 else 20
    cmap = plt.get_cmap(f"tab{n_col}")
    colour = {o: cmap(i % n_col) for i, o in enumerate(optimizers)}
    for k, task in enumerate(tasks):
        ax = axes.flat[k]
        tax = time_axes.flat[k] if timed else None
        ys_lo, ys_hi, means = [], [], []
        ends: dict[str, float] = {}  # legend label → the mean curve's last value (runs without divergence)
        panel = {opt: [r for r in results if r.task == task and r.optimizer == opt] for opt in optimizers}
        curves = {opt: _curves(runs) for opt, runs in panel.items() if runs}
        starts = [m[np.isfinite(m)][0] for _, m, _ in curves.values() if np.isfinite(m).any()]
        top = TOP_FACTOR * max(starts) if starts and max(starts) > 0 else math.inf
        for opt, (x, mean, half) in curves.items():
            runs = panel[opt]
            div = sum(r.diverged for r in runs)
            name = (labels or {}).get(opt, opt) + (f" (✕ {div}/{len(runs)} diverged)" if div else "")
            last = mean[np.isfinite(mean)]
            if not div and last.size:
                ends[name] = last[-1]
            ax.plot(x, mean, color=colour[opt], lw=1.4, label=name)
            ax.fill_between(x, mean - half, mean + half, color=colour[opt], alpha=0.2, lw=0)
            with_clock = [r for r in runs if r.wall_clock_s is not None]
            if tax is not None and with_clock:
                _, tmean, thalf = _curves(with_clock)
                secs = _time_axis(with_clock)
                ok = np.isfinite(secs) & np.isfinite(tmean)
                tax.plot(secs[ok], tmean[ok], color=colour[opt], lw=1.4, label=name)
                tax.fill_between(secs[ok], (tmean - thalf)[ok], (tmean + thalf)[ok], color=colour[opt], alpha=0.2, lw=0)
            means.append(np.minimum(mean, top))
            finite = mean[np.isfinite(mean)]
            if finite.size:
                ys_lo.append(finite.min())
                ys_hi.append(finite[0])
        scale = objective_scale(means)
        if scale == "log":  # e.g. 2.5 down to 0.001: on a linear axis every curve lies flat near 0
            ax.set_yscale("log")
            shown = np.concatenate([m[np.isfinite(m)] for m in means])
            ax.set_ylim(shown.min() / 1.5, shown.max() * 1.5)
        elif ys_lo:
            lo, hi = min(ys_lo), max(ys_hi)
            pad = 0.05 * (hi - lo if hi > lo else 1.0)
            ax.set_ylim(max(0.0, lo - pad), hi + 4 * pad)
        for line in list(ax.lines) + (list(tax.lines) if tax is not None else []):
            if ends.get(line.get_label(), -math.inf) > ax.get_ylim()[1]:
                line.set_label(line.get_label() + " ↑ ends off the axis")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("true objective f(x)" + (" (log scale)" if scale == "log" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if tax is not None:
            if tax.lines:
                tax.set_yscale(ax.get_yscale())
                tax.set_ylim(ax.get_ylim())
                tax.set_xlim(left=0.0)
                tax.set_title(task, fontsize=10)
                tax.set_xlabel("wall-clock seconds in optimizer.step (mean over seeds)")
                tax.set_ylabel(ax.get_ylabel())
                tax.grid(alpha=0.3)
                tax.legend(fontsize=7)
            else:
                tax.axis("off")
                tax.text(0.5, 0.5, "no wall-clock record\n(runs of format 1)", ha="center", va="center",
                         transform=tax.transAxes, fontsize=9)
    for ax in list(axes.flat)[len(tasks):] + (list(time_axes.flat)[len(tasks):] if timed else []):
        ax.axis("off")
    if title:
        import textwrap

        fig.suptitle(textwrap.fill(title, width=int(45 * cols)), fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
