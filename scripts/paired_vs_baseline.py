"""Paired per-seed differences against a baseline in a benchmark folder (seeds share x0 and the
batch sequence, so the paired difference is sharper than comparing the two intervals).

    python scripts/paired_vs_baseline.py runs/eval-psd-pes adagrad:eps=1e-10,lr=0.1

For every other optimizer and task: per-seed (optimizer − baseline) of the final objective f(x_T)
and of the AUC (mean true objective over iterations 1..T, as the benchmark's summary), with the
mean ± 95% t-interval over seeds.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats


def main(out: str, baseline: str) -> None:
    runs: dict[tuple[str, str], dict[int, tuple[float, float]]] = defaultdict(dict)
    for f in sorted(Path(out, "runs").glob("*/*/seed*.json")):
        d = json.loads(f.read_text())
        tl = d["true_loss"]
        if d.get("diverged_at") is None:
            runs[(d["task"], d["optimizer"])][d["seed"]] = (tl[-1], float(np.mean(tl[1:])))
    for (task, opt), per_seed in sorted(runs.items()):
        if opt == baseline or (task, baseline) not in runs:
            continue
        base = runs[(task, baseline)]
        seeds = sorted(set(per_seed) & set(base))
        for i, label in ((0, "final"), (1, "AUC")):
            diff = np.array([per_seed[s][i] - base[s][i] for s in seeds])
            half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
            print(f"{task}  {opt} − {baseline}  {label}: per seed {np.round(diff, 4).tolist()}  "
                  f"mean {diff.mean():+.4f} ± {half:.4f}  ({int((diff < 0).sum())}/{len(diff)} seeds lower)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
