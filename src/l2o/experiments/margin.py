"""Mean margin of a learned optimizer over baselines across many objectives (Li & Malik 2016).

From a benchmark's per-run records (``BENCH/runs/**/seed*.json``; per task × optimizer the metrics
are averaged over the seeds, which share x⁽⁰⁾ across optimizers): per task, margin = baseline's metric − learned's metric (positive:
the learned optimizer reached a lower objective), for ``final`` f(x_T) and ``auc`` (mean f over
iterations 1..T). Reported per baseline: the mean margin over tasks with a 95% Student-t interval
across tasks, and wins/losses (tasks where the margin is > 0 / < 0). A task where either optimizer
diverged on some seed is counted separately and left out of the mean.

Run: ``python -m l2o.experiments.margin BENCH_DIR --learned SPEC_PREFIX [--tasks …] [--seeds …]
[--horizon H] [--figure PATH]``; the figure shows the objective vs iteration averaged over all test objectives and seeds.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

METRICS = ("final", "auc")


@dataclass(frozen=True)
class Margin:
    baseline: str
    metric: str
    n: int  # tasks in the mean
    mean: float
    ci95: float  # half-width of the 95% t-interval of the mean
    wins: int
    losses: int
    excluded: int  # tasks with a diverged seed (either optimizer)


def _t975(df: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # pragma: no cover
        return 1.96


def margins(rows: Sequence[dict[str, str]], learned: str) -> list[Margin]:
    """Margins of the optimizer whose spec starts with ``learned`` over every other optimizer."""
    by: dict[str, dict[str, dict[str, str]]] = {}
    for r in rows:
        by.setdefault(r["optimizer"], {})[r["task"]] = r
    names = [o for o in by if o.startswith(learned)]
    if len(names) != 1:
        raise ValueError(f"expected exactly one optimizer starting with {learned!r}, found {names}")
    mine = by[names[0]]
    out = []
    for base, cells in by.items():
        if base == names[0]:
            continue
        for metric in METRICS:
            diffs, excluded = [], 0
            for task, r in cells.items():
                m = mine.get(task)
                if m is None:
                    continue
                if int(r["diverged"]) or int(m["diverged"]):
                    excluded += 1
                    continue
                diffs.append(float(r[f"{metric}_mean"]) - float(m[f"{metric}_mean"]))
            n = len(diffs)
            mean = sum(diffs) / n if n else math.nan
            sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1)) if n > 1 else math.nan
            ci = _t975(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
            out.append(Margin(base, metric, n, mean, ci, sum(x > 0 for x in diffs), sum(x < 0 for x in diffs), excluded))
    return out


def format_margins(ms: Sequence[Margin], learned: str) -> str:
    lines = [(f"Margin = baseline − `{learned}` per test objective (> 0: the learned optimizer is better); "
              "mean over objectives ± 95% t-interval."), "",
             "| baseline | metric | objectives | mean margin | wins / losses | excluded (diverged) |",
             "|---|---|---|---|---|---|"]
    for m in ms:
        lines.append(f"| {m.baseline} | {m.metric} | {m.n} | {m.mean:+.4f} ± {m.ci95:.4f} | "
                     f"{m.wins} / {m.losses} | {m.excluded} |")
    return "\n".join(lines)


def load_runs(bench: str | Path) -> list:
    """Every run record stored under ``bench/runs``."""
    from l2o.experiments.runner import RunResult

    files = sorted((Path(bench) / "runs").glob("*/*/seed*.json"))
    if not files:
        raise FileNotFoundError(f"no run records under {Path(bench) / 'runs'}")
    return [RunResult.from_dict(json.loads(f.read_text())) for f in files]


def _truncated(r, horizon: int | None) -> tuple[bool, float, float]:
    """(diverged, final, auc) of run ``r`` over its first ``horizon`` iterations (None: all)."""
    h = len(r.true_loss) - 1 if horizon is None else int(horizon)
    if not 1 <= h <= len(r.true_loss) - 1:
        raise ValueError(f"horizon must be in [1, {len(r.true_loss) - 1}], got {horizon}")
    vals = r.true_loss[1:h + 1]
    if r.true_loss[0] is None or any(v is None for v in vals):
        return True, math.inf, math.inf
    return False, float(vals[-1]), math.fsum(vals) / len(vals)


def per_task_rows(runs: Sequence, horizon: int | None = None) -> list[dict[str, str]]:
    """One row per (task, optimizer): seed-mean final f(x_h) and AUC (mean f over iterations 1..h,
    h = ``horizon`` or the whole run), and whether any seed diverged by then."""
    groups: dict[tuple[str, str], list] = {}
    for r in runs:
        groups.setdefault((r.task, r.optimizer), []).append(_truncated(r, horizon))
    rows = []
    for (task, opt), rs in sorted(groups.items()):
        div = any(x[0] for x in rs)
        rows.append({"task": task, "optimizer": opt, "diverged": str(int(div)), "seeds": str(len(rs)),
                     "final_mean": "nan" if div else repr(sum(x[1] for x in rs) / len(rs)),
                     "auc_mean": "nan" if div else repr(sum(x[2] for x in rs) / len(rs))})
    return rows


def plot_mean_curves(runs: Sequence, path: str | Path, title: str | None = None) -> Path:
    """Objective vs iteration, mean over all tasks and seeds per optimizer (runs without divergence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by: dict[str, list[list[float]]] = {}
    for r in runs:
        if not r.diverged:
            by.setdefault(r.optimizer, []).append(r.true_loss)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for opt, curves in sorted(by.items()):
        y = np.asarray(curves, dtype=float)
        m = y.mean(0)
        ci = 1.96 * y.std(0, ddof=1) / np.sqrt(len(y)) if len(y) > 1 else np.zeros_like(m)
        label = opt.split(":checkpoint=")[0] if opt.startswith("lto2016") else opt
        ax.plot(np.arange(len(m)), m, label=f"{label} (n={len(y)})")
        ax.fill_between(np.arange(len(m)), m - ci, m + ci, alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("objective (mean over test objectives × seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", help="benchmark output folder (the --out of `l2o benchmark`)")
    p.add_argument("--learned", default="lto2016", help="spec prefix of the learned optimizer")
    p.add_argument("--figure", help="also write the mean objective-vs-iteration figure here")
    p.add_argument("--title")
    p.add_argument("--horizon", type=int, action="append",
                   help="also report the margins over the first H iterations (repeatable)")
    p.add_argument("--tasks", nargs="+", help="only these tasks (ranges like logreg/test/0-29 expand)")
    p.add_argument("--seeds", type=int, nargs="+", help="only these seeds")
    a = p.parse_args(argv)
    runs = load_runs(a.bench)
    if a.tasks:
        from l2o.tasks.registry import expand_task_specs

        keep = set(expand_task_specs(a.tasks))
        runs = [r for r in runs if r.task in keep]
    if a.seeds:
        seeds = set(a.seeds)
        runs = [r for r in runs if r.seed in seeds]
    print(f"{len(runs)} runs, {len({r.task for r in runs})} tasks, {len({r.optimizer for r in runs})} optimizers")
    for h in [None, *(a.horizon or [])]:
        n_it = len(runs[0].true_loss) - 1 if h is None else h
        print(f"\n### Over iterations 1..{n_it}\n")
        print(format_margins(margins(per_task_rows(runs, h), a.learned), a.learned))
    if a.figure:
        print(f"figure: {plot_mean_curves(runs, a.figure, a.title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
