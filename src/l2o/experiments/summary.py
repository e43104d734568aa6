"""Summary statistics over seeds: final objective and area under the curve, mean and 95% interval.

Intervals are Student-t 95% confidence intervals of the mean over seeds. Diverged runs are
counted in every cell (``diverged``/``n``) and excluded from the mean; a cell with any diverged
run ranks behind every cell without one when the winner of a task is chosen.

Time to target (:data:`TARGET_RULE`): on each task the target is the best hand-designed baseline's
median final objective over seeds; a cell reports the iterations and the wall-clock seconds (the
run records' cumulative time in ``optimizer.step``) its seeds took to first reach f(x_t) ≤ target,
as the lower median over seeds — by then at least half of the seeds had reached it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from l2o.experiments.runner import RunResult


@dataclass(frozen=True)
class CellStats:
    """Statistics of one (task, optimizer) cell over its seeds."""

    task: str
    optimizer: str
    n: int
    diverged: int
    final_mean: float
    final_ci: float
    auc_mean: float
    auc_ci: float
    evals_per_iter: float
    target: float = math.nan
    """The task's target objective (:data:`TARGET_RULE`); NaN when the task has no baseline."""
    target_from: str = ""
    """The baseline whose median final objective is the target."""
    iters_to_target: float = math.nan
    """Lower median over seeds of the first t with f(x_t) ≤ target; NaN if half the seeds never reach it."""
    secs_to_target: float = math.nan
    """The same for the wall-clock seconds to that t; NaN also when a run has no wall clock (format 1)."""


TARGET_RULE = ("the target on each task is the best hand-designed baseline's median final objective f(x_T) over "
               "seeds; iterations and wall-clock seconds to target are the lower median over seeds of the first "
               "iteration t with f(x_t) ≤ target and of the cumulative time in optimizer.step (closure included, "
               "measured in the worker process) up to it — by then at least half of the seeds had reached the "
               "target; — = fewer than half of the seeds reached it (or, for seconds, a run without a wall-clock "
               "record)")


def lower_median(values: Sequence[float]) -> float:
    """The ⌈n/2⌉-th smallest value (inf counts as a value); NaN for no values."""
    v = sorted(values)
    return v[(len(v) + 1) // 2 - 1] if v else math.nan


def first_reach(curve: Sequence[float | None], target: float) -> int | None:
    """The first index t with ``curve[t] <= target`` (None entries never reach), or None."""
    for t, v in enumerate(curve):
        if v is not None and v <= target:
            return t
    return None


def time_to_target(runs: Sequence[RunResult], target: float) -> tuple[float, float]:
    """(iterations, seconds) to reach ``target``: the lower median over ``runs`` of each run's first
    reach (inf for a run that never reaches it); NaN where that median is inf, and NaN seconds when a
    run has no wall clock."""
    if not runs or not math.isfinite(target):
        return math.nan, math.nan
    iters, secs = [], []
    for r in runs:
        t = first_reach(r.true_loss, target)
        iters.append(math.inf if t is None else float(t))
        if r.wall_clock_s is None:
            secs.append(math.nan)
        elif t is None:
            secs.append(math.inf)
        else:
            w = 0.0 if t == 0 else r.wall_clock_s[t - 1]
            secs.append(math.nan if w is None else float(w))
    it = lower_median(iters)
    sec = math.nan if any(math.isnan(x) for x in secs) else lower_median(secs)
    return (it if math.isfinite(it) else math.nan), (sec if math.isfinite(sec) else math.nan)


def is_baseline(optimizer: str) -> bool:
    """Whether an optimizer spec string names a hand-designed (not learned) optimizer of the registry."""
    from l2o.baselines.registry import get_optimizer, parse_optimizer

    try:
        return not get_optimizer(parse_optimizer(optimizer).name).learned
    except (ValueError, KeyError):
        return False


def task_targets(results: Iterable[RunResult], baseline: Callable[[str], bool] = is_baseline
                 ) -> dict[str, tuple[float, str]]:
    """Per task, (target, baseline): the lowest median final objective (diverged seeds count as inf)
    among the baseline optimizers' cells; tasks without a baseline are absent."""
    finals: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if baseline(r.optimizer):
            finals.setdefault((r.task, r.optimizer), []).append(r.final)
    best: dict[str, tuple[float, str]] = {}
    for (task, opt), v in finals.items():
        med = float(np.median(v))
        if math.isfinite(med) and (task not in best or med < best[task][0]):
            best[task] = (med, opt)
    return best


def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t interval); half-width NaN for fewer than 2 values."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), math.nan
    half = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def summarize(results: Iterable[RunResult], baseline: Callable[[str], bool] = is_baseline) -> list[CellStats]:
    """One :class:`CellStats` per (task, optimizer), in first-seen order; ``baseline`` says which
    optimizers set the time-to-target target (:data:`TARGET_RULE`)."""
    results = list(results)
    targets = task_targets(results, baseline)
    cells: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        cells.setdefault((r.task, r.optimizer), []).append(r)
    out = []
    for (task, opt), runs in cells.items():
        ok = [r for r in runs if not r.diverged]
        fm, fc = mean_ci(r.final for r in ok)
        am, ac = mean_ci(r.auc for r in ok)
        ev = [e for r in ok for e in r.evals if e]
        target, source = targets.get(task, (math.nan, ""))
        it, sec = time_to_target(runs, target)
        out.append(CellStats(task, opt, len(runs), len(runs) - len(ok), fm, fc, am, ac,
                             float(np.mean(ev)) if ev else math.nan, target, source, it, sec))
    return out


def rank_key(cell: CellStats, metric: str = "final") -> tuple[int, float]:
    """Sort key: cells without divergence first, then by the mean of ``metric``."""
    value = cell.final_mean if metric == "final" else cell.auc_mean
    return (1 if cell.diverged else 0, value if math.isfinite(value) else math.inf)


def winners(cells: list[CellStats], metric: str = "final") -> dict[str, str]:
    """The best optimizer per task by ``metric`` ("final" or "auc")."""
    best: dict[str, CellStats] = {}
    for c in cells:
        if c.task not in best or rank_key(c, metric) < rank_key(best[c.task], metric):
            best[c.task] = c
    return {t: c.optimizer for t, c in best.items()}


def _pm(mean: float, ci: float) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.4f}" if not math.isfinite(ci) else f"{mean:.4f} ± {ci:.4f}"


def write_csv(cells: list[CellStats], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(cells[0]).keys()) if cells else ["task"])
        w.writeheader()
        for c in cells:
            w.writerow(asdict(c))


def to_target_text(c: CellStats) -> str:
    """``"120 it / 3.4 s"``, with — for what is not known or not reached."""
    if not math.isfinite(c.iters_to_target):
        return "—"
    secs = f"{c.secs_to_target:.3g} s" if math.isfinite(c.secs_to_target) else "— s"
    return f"{c.iters_to_target:.0f} it / {secs}"


def target_line(task_cells: Sequence[CellStats]) -> str:
    """One sentence naming a task's time-to-target target."""
    c = task_cells[0]
    if not math.isfinite(c.target):
        return "Time to target: — (no hand-designed baseline with a finite median final objective on this task)."
    return f"Time to target: f(x_t) ≤ {c.target:.6g}, the median final objective of `{c.target_from}`."


def markdown_table(cells: list[CellStats]) -> str:
    """A Markdown table per task: final objective and AUC (mean ± 95% CI), winners in bold, and the
    iterations / seconds to the task's target (:data:`TARGET_RULE`)."""
    lines: list[str] = []
    win_final, win_auc = winners(cells, "final"), winners(cells, "auc")
    for task in dict.fromkeys(c.task for c in cells):
        lines += [f"### {task}", "", target_line([c for c in cells if c.task == task]), "",
                  "| optimizer | final f(x_T) | AUC (mean f over iterations) | to target (iterations / seconds) "
                  "| diverged | evals/iter |",
                  "|---|---|---|---|---|---|"]
        for c in sorted((c for c in cells if c.task == task), key=rank_key):
            final = _pm(c.final_mean, c.final_ci)
            auc = _pm(c.auc_mean, c.auc_ci)
            if win_final[task] == c.optimizer:
                final = f"**{final}**"
            if win_auc[task] == c.optimizer:
                auc = f"**{auc}**"
            ev = "—" if not math.isfinite(c.evals_per_iter) else f"{c.evals_per_iter:.2f}"
            lines.append(f"| {c.optimizer} | {final} | {auc} | {to_target_text(c)} | {c.diverged}/{c.n} | {ev} |")
        lines.append("")
    return "\n".join(lines)
