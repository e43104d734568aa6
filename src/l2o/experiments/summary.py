"""Summary statistics over seeds: final objective and area under the curve, mean and 95% interval.

Intervals are Student-t 95% confidence intervals of the mean over seeds. Diverged runs are
counted in every cell (``diverged``/``n``) and excluded from the mean; a cell with any diverged
run ranks behind every cell without one when the winner of a task is chosen.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
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


def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t interval); half-width NaN for fewer than 2 values."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), math.nan
    half = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def summarize(results: Iterable[RunResult]) -> list[CellStats]:
    """One :class:`CellStats` per (task, optimizer), in first-seen order."""
    cells: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        cells.setdefault((r.task, r.optimizer), []).append(r)
    out = []
    for (task, opt), runs in cells.items():
        ok = [r for r in runs if not r.diverged]
        fm, fc = mean_ci(r.final for r in ok)
        am, ac = mean_ci(r.auc for r in ok)
        ev = [e for r in ok for e in r.evals if e]
        out.append(CellStats(task, opt, len(runs), len(runs) - len(ok), fm, fc, am, ac,
                             float(np.mean(ev)) if ev else math.nan))
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


def markdown_table(cells: list[CellStats]) -> str:
    """A Markdown table per task: final objective and AUC (mean ± 95% CI), winners in bold."""
    lines: list[str] = []
    win_final, win_auc = winners(cells, "final"), winners(cells, "auc")
    for task in dict.fromkeys(c.task for c in cells):
        lines += [f"### {task}", "",
                  "| optimizer | final f(x_T) | AUC (mean f over iterations) | diverged | evals/iter |",
                  "|---|---|---|---|---|"]
        for c in sorted((c for c in cells if c.task == task), key=rank_key):
            final = _pm(c.final_mean, c.final_ci)
            auc = _pm(c.auc_mean, c.auc_ci)
            if win_final[task] == c.optimizer:
                final = f"**{final}**"
            if win_auc[task] == c.optimizer:
                auc = f"**{auc}**"
            ev = "—" if not math.isfinite(c.evals_per_iter) else f"{c.evals_per_iter:.2f}"
            lines.append(f"| {c.optimizer} | {final} | {auc} | {c.diverged}/{c.n} | {ev} |")
        lines.append("")
    return "\n".join(lines)
