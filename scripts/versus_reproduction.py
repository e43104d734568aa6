"""Score a candidate optimizer's runs on the reproduction's cells by the rule of ``l2o reproduce``.

    python scripts/versus_reproduction.py runs/reproduce runs/mlp-lopt-snr-only \\
        --candidate mlp-lopt:checkpoint=runs/mlp-lopt-snr.safetensors --versus mlp-lopt

``REPRO`` is an ``l2o reproduce`` output folder (``figN/runs/<task>/<optimizer>/seed*.json``);
``CANDIDATE_DIR`` holds the candidate's own runs in the same layout (``l2o benchmark --out
CANDIDATE_DIR/figN`` on the same tasks, seeds and iteration counts). Per cell, the candidate is
judged exactly as the document judges a learned row (``l2o.experiments.reproduce.verdict``: ranked
among the paper's comparison set, the seven tuned baselines and L2LBGDBGD, and itself), and against
each ``--versus`` row of the reproduction head to head (95% intervals disjoint = win/loss, else
tie). Nothing is rerun; a cell without the candidate's runs is reported as absent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from l2o.experiments.reproduce import verdict
from l2o.experiments.runner import RunResult
from l2o.experiments.store import slug
from l2o.experiments.summary import summarize
from scorecard import verdict as head_to_head  # scripts/scorecard.py: disjoint 95% intervals = win/loss, else tie


def _runs(folder: Path, pattern: str = "*/seed*.json") -> list[RunResult]:
    return [RunResult.from_dict(json.loads(f.read_text())) for f in sorted(folder.glob(pattern))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repro", type=Path)
    ap.add_argument("candidate_dir", type=Path)
    ap.add_argument("--candidate", required=True, help="the candidate's optimizer string, as in its run records")
    ap.add_argument("--versus", action="append", default=[], help="a row of the reproduction (its registry name)")
    a = ap.parse_args(argv)
    name = "candidate"
    counts: dict[str, dict[str, int]] = {}
    head = ["figure", "task", "candidate final", "candidate AUC", "verdict (final / AUC)"] + \
        [f"vs {v} (final / AUC)" for v in a.versus]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for fig in sorted(a.repro.glob("fig*")):
        for task_dir in sorted((fig / "runs").iterdir()):
            cand_dir = a.candidate_dir / fig.name / "runs" / task_dir.name / slug(a.candidate)
            mine = _runs(cand_dir, "seed*.json")
            if not mine:
                print(f"| {fig.name} | {task_dir.name} | absent | absent | absent |" + " absent |" * len(a.versus))
                continue
            for r in mine:
                r.optimizer = name
            stats = summarize(_runs(task_dir) + mine)
            c = next(s for s in stats if s.optimizer == name)
            cells = [f"{verdict(stats, name, m)}" for m in ("final", "auc")]
            row = [fig.name, mine[0].task, f"{c.final_mean:.4f} ± {c.final_ci:.4f}", f"{c.auc_mean:.4f} ± {c.auc_ci:.4f}",
                   " / ".join(cells)]
            for m, v in zip(("final", "auc"), cells):
                counts.setdefault(f"rule {m}", {"win": 0, "tie": 0, "loss": 0})[v] += 1
            for v in a.versus:
                other = next((s for s in stats if s.optimizer.split(":", 1)[0] == v), None)
                if other is None:
                    row.append("absent")
                    continue
                hh = [head_to_head(c, other, m) for m in ("final", "auc")]
                for m, x in zip(("final", "auc"), hh):
                    counts.setdefault(f"vs {v} {m}", {"win": 0, "tie": 0, "loss": 0})[x] += 1
                row.append(" / ".join(hh))
            print("| " + " | ".join(row) + " |")
    print()
    for k, v in counts.items():
        print(f"{k}: {v['win']} win / {v['tie']} tie / {v['loss']} loss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
