"""Win/tie/loss scorecard of one optimizer from the ``summary.csv`` files of benchmark folders.

    python scripts/scorecard.py --optimizer mlp-lopt --versus adagrad:eps=1e-10,lr=0.1 \\
        runs/mlp-lopt-cells/fig1 runs/mlp-lopt-cells/fig3 ...

For every task of every folder given (``FOLDER/summary.csv``, as ``l2o benchmark`` writes it) and
for both metrics, final objective f(x_T) and AUC (mean f over iterations), it prints the verdict of
``--optimizer`` (an optimizer string exactly as in the csv's ``optimizer`` column) against

* the best baseline of that cell: the lowest mean among the hand-designed optimizers run in it
  (``l2o.experiments.summary.is_baseline``; a cell with diverged runs ranks behind every cell
  without, as in the harness's summaries), and
* each ``--versus`` optimizer (repeatable; e.g. the shipped ``mlp-lopt`` or ``adagrad:...``).

Rule (the scorecards of docs/RESULTS.md): **win** = the optimizer's 95% interval (mean ± ci over
seeds) lies entirely below the other's, **loss** = entirely above, else **tie** (also when an
interval is unknown, i.e. fewer than 2 seeds, and when either cell has a diverged run: judge those
by hand). Output: one Markdown table row per (folder, task),
the row label being the folder's name, then win/tie/loss counts per column over all rows. A cell
where ``--optimizer`` or a ``--versus`` optimizer was not run is an error.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from l2o.experiments.summary import CellStats, is_baseline, rank_key

METRICS = ("final", "auc")


def read_summary(path: Path) -> list[CellStats]:
    """The cells of one ``summary.csv``, typed as the harness wrote them."""
    types = {f.name: f.type for f in fields(CellStats)}
    cast = {"str": str, "int": int, "float": float}
    with open(path, newline="") as f:
        return [CellStats(**{k: cast[types[k]](v) for k, v in row.items() if k in types}) for row in csv.DictReader(f)]


def interval(cell: CellStats, metric: str) -> tuple[float, float]:
    """(low, high) of the 95% interval of ``metric``; NaN ends when the interval is unknown."""
    mean, ci = (cell.final_mean, cell.final_ci) if metric == "final" else (cell.auc_mean, cell.auc_ci)
    return mean - ci, mean + ci


def verdict(a: CellStats, b: CellStats, metric: str) -> str:
    """``a`` against ``b`` on ``metric`` (lower is better): win, loss or tie."""
    a_lo, a_hi = interval(a, metric)
    b_lo, b_hi = interval(b, metric)
    if a.diverged or b.diverged or any(math.isnan(x) for x in (a_lo, a_hi, b_lo, b_hi)):
        return "tie"
    if a_hi < b_lo:
        return "win"
    if a_lo > b_hi:
        return "loss"
    return "tie"


@dataclass(frozen=True)
class Row:
    label: str
    task: str
    best: dict[str, str]
    """Per metric, the best baseline's optimizer string."""
    verdicts: dict[tuple[str, str], str]
    """(metric, opponent) → verdict; opponent "best" = the best baseline."""


def score_cells(cells: Sequence[CellStats], label: str, optimizer: str, versus: Sequence[str]) -> list[Row]:
    """One :class:`Row` per task of one summary."""
    rows = []
    for task in dict.fromkeys(c.task for c in cells):
        by_opt = {c.optimizer: c for c in cells if c.task == task}
        missing = [o for o in (optimizer, *versus) if o not in by_opt]
        if missing:
            raise SystemExit(f"{label}, {task}: no cell for {missing}; optimizers there: {sorted(by_opt)}")
        baselines = [c for c in by_opt.values() if is_baseline(c.optimizer)]
        if not baselines:
            raise SystemExit(f"{label}, {task}: no hand-designed baseline was run")
        me = by_opt[optimizer]
        best, verdicts = {}, {}
        for m in METRICS:
            b = min(baselines, key=lambda c: rank_key(c, m))
            best[m] = b.optimizer
            verdicts[(m, "best")] = verdict(me, b, m)
            for v in versus:
                verdicts[(m, v)] = verdict(me, by_opt[v], m)
        rows.append(Row(label, task, best, verdicts))
    return rows


def short(optimizer: str) -> str:
    """An optimizer's name without its hyperparameters (``adam:lr=0.01`` → ``adam``)."""
    return optimizer.split(":", 1)[0]


def render(rows: Sequence[Row], optimizer: str, versus: Sequence[str]) -> str:
    """The Markdown table and the win/tie/loss counts."""
    opponents = ["best", *versus]
    head = ["folder", "task"]
    for m in METRICS:
        head += [f"best baseline ({m})", f"vs it ({m})", *(f"vs {v} ({m})" for v in versus)]
    lines = [f"Verdicts of `{optimizer}` (win/loss = 95% intervals disjoint, else tie).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cols = [r.label, f"`{r.task}`"]
        for m in METRICS:
            cols += [short(r.best[m]), *(r.verdicts[(m, o)] for o in opponents)]
        lines.append("| " + " | ".join(cols) + " |")
    lines.append("")
    for m in METRICS:
        counts = []
        for o in opponents:
            v = [r.verdicts[(m, o)] for r in rows]
            name = "best baseline" if o == "best" else o
            counts.append(f"vs {name}: {v.count('win')} win / {v.count('tie')} tie / {v.count('loss')} loss")
        lines.append(f"{m} ({len(rows)} cells): " + "; ".join(counts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="benchmark output folders (each holds summary.csv)")
    p.add_argument("--optimizer", required=True, help="the optimizer judged, as in summary.csv")
    p.add_argument("--versus", action="append", default=[], help="another optimizer to judge it against")
    args = p.parse_args(argv)
    rows = [r for d in args.folders for r in score_cells(read_summary(d / "summary.csv"), d.name, args.optimizer,
                                                         args.versus)]
    return render(rows, args.optimizer, args.versus)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
