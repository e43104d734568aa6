"""scripts/scorecard.py: verdicts from synthetic summary.csv files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from l2o.experiments.summary import CellStats, write_csv

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "scorecard.py"


@pytest.fixture(scope="module")
def scorecard():
    spec = importlib.util.spec_from_file_location("scorecard", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scorecard"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["scorecard"]


def cell(task: str, optimizer: str, final: tuple[float, float], auc: tuple[float, float]) -> CellStats:
    return CellStats(task, optimizer, 5, 0, final[0], final[1], auc[0], auc[1], 1.0)


def test_win_loss_tie_against_best_baseline_and_versus(scorecard, tmp_path):
    lo, mid, hi = (1.0, 0.05), (1.2, 0.05), (1.4, 0.05)  # disjoint intervals, lowest first
    near = (1.23, 0.05)  # overlaps mid
    write_csv([
        # win by final (learned below both), loss by AUC (above both)
        cell("t-win", "learned", lo, hi), cell("t-win", "adagrad", mid, mid), cell("t-win", "adam", hi, lo),
        cell("t-win", "other", hi, lo),
        # loss by final against the better baseline (adam, not adagrad); tie by AUC
        cell("t-loss", "learned", mid, mid), cell("t-loss", "adagrad", hi, near), cell("t-loss", "adam", lo, hi),
        cell("t-loss", "other", mid, near),
    ], tmp_path / "fig1" / "summary.csv")
    out = scorecard.main([str(tmp_path / "fig1"), "--optimizer", "learned", "--versus", "other"])
    win, loss = scorecard.score_cells(scorecard.read_summary(tmp_path / "fig1" / "summary.csv"), "fig1",
                                      "learned", ["other"])
    assert (win.best, loss.best) == ({"final": "adagrad", "auc": "adam"}, {"final": "adam", "auc": "adagrad"})
    assert win.verdicts == {("final", "best"): "win", ("final", "other"): "win",
                            ("auc", "best"): "loss", ("auc", "other"): "loss"}
    assert loss.verdicts == {("final", "best"): "loss", ("final", "other"): "tie",
                             ("auc", "best"): "tie", ("auc", "other"): "tie"}
    assert "| fig1 | `t-win` | adagrad | win | win | adam | loss | loss |" in out
    assert "final (2 cells): vs best baseline: 1 win / 0 tie / 1 loss; vs other: 1 win / 1 tie / 0 loss" in out


def test_missing_optimizer_is_an_error(scorecard, tmp_path):
    write_csv([cell("t", "adagrad", (1.0, 0.1), (1.0, 0.1))], tmp_path / "summary.csv")
    with pytest.raises(SystemExit, match="no cell for"):
        scorecard.main([str(tmp_path), "--optimizer", "learned"])
