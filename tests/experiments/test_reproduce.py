"""`l2o reproduce`: the quick grid end to end, resume, the scorecard rule, missing optimizers."""

from __future__ import annotations

import csv
import json
import math

import pytest

import l2o.experiments.benchmark as bench
from l2o.baselines import registry
from l2o.baselines.registry import OptimizerEntry
from l2o.cli import main
from l2o.experiments.reproduce import (
    OPTIMIZERS,
    SETTINGS,
    TWO_BY_TWO,
    MissingOptimizerError,
    ReproduceConfig,
    judge,
    reproduce,
    verdict,
)
from l2o.experiments.summary import CellStats

# Cheap optimizers keep the quick grid (15 cells x 3 optimizers x 2 seeds, T = 10/20) to seconds.
FAST = ("sgd", "adam", "momentum")


def _quick(tmp_path, **kw):
    config = ReproduceConfig(quick=True, jobs=1, optimizers=kw.pop("optimizers", FAST), **kw)
    return reproduce(config, tmp_path / "out", progress=False, log=lambda s: None)


def test_grid_is_the_papers():
    assert [(s.input_dim, s.hidden, s.batch, s.iterations) for s in SETTINGS] == [
        (48, 48, 64, 400), (100, 200, 64, 400), (48, 48, 10, 400), (100, 200, 10, 400), (100, 200, 64, 800)]
    assert len(OPTIMIZERS) == 14 and OPTIMIZERS[7:10] == ("l2lbgdbgd", "psd-paper", "psd")
    assert OPTIMIZERS[10:] == tuple(TWO_BY_TWO.values())
    assert ReproduceConfig().n_seeds == 5
    assert [s.iterations for s in ReproduceConfig(quick=True).grid_settings()] == [10, 10, 10, 10, 20]


def test_quick_mode_writes_figures_table_and_document_with_all_cells(tmp_path):
    report = _quick(tmp_path)
    out = tmp_path / "out"
    assert len(report.cells) == 15
    assert all(len(c.stats) == len(FAST) and all(s.n == 2 for s in c.stats) for c in report.cells)
    for n in range(1, 6):
        png = out / "figures" / "reproduction" / f"figure{n}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15 * len(FAST)
    assert {(r["figure"], r["dataset"]) for r in rows} == {(str(f), d) for f in range(1, 6)
                                                            for d in ("TFD", "CIFAR-10", "CIFAR-100")}
    text = report.doc.read_text()
    assert report.doc == out / "REPRODUCTION.md"
    for n in range(1, 6):
        assert f"![Figure {n} reproduced](figures/reproduction/figure{n}.png)" in text
        assert f"## Figure {n}:" in text
    assert "All 15 cells at a glance" in text
    glance = text.split("All 15 cells at a glance")[1].split("## Closing note")[0]
    assert sum(line.startswith("| ") and line[2].isdigit() for line in glance.splitlines()) == 15
    assert "Predicted Step Descent was not run" in text  # psd not in this optimizer list: said, not hidden
    assert "torch" in text and "wall time" in text and "l2o reproduce" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["invocations"][0]["runs_executed"] == 15 * len(FAST) * 2
    assert json.loads((out / "scorecard.json").read_text())["scorecard"] == {}  # no learned optimizer here


def test_resume_does_not_redo_finished_runs(tmp_path, monkeypatch):
    kw = {"optimizers": ("sgd",), "settings": (SETTINGS[1], SETTINGS[4])}  # Figures 2 and 5 share a task
    _quick(tmp_path, **kw)
    out = tmp_path / "out"
    calls = []
    real = bench._execute
    monkeypatch.setattr(bench, "_execute", lambda k, o, d: calls.append(k) or real(k, o, d))
    _quick(tmp_path, **kw)
    assert calls == []
    victim = next((out / "fig5").rglob("seed1.json"))
    victim.unlink()
    _quick(tmp_path, **kw)
    assert len(calls) == 1 and calls[0].iterations == 20 and calls[0].seed == 1
    inv = json.loads((out / "manifest.json").read_text())["invocations"]
    assert [i["runs_executed"] for i in inv] == [12, 0, 1]


def _cell(opt, final, final_ci, auc=None, auc_ci=None, diverged=0, n=5):
    auc = final if auc is None else auc
    auc_ci = final_ci if auc_ci is None else auc_ci
    return CellStats("t", opt, n, diverged, final, final_ci, auc, auc_ci, 1.0)


@pytest.mark.parametrize(("cells", "verdict"), [
    # best, interval clear of the runner-up's -> win
    ([_cell("psd", 1.0, 0.1), _cell("adam", 1.5, 0.1), _cell("sgd", 2.0, 0.1)], "win"),
    # best, but intervals overlap the runner-up's -> tie
    ([_cell("psd", 1.0, 0.3), _cell("adam", 1.5, 0.3)], "tie"),
    # not best, interval overlaps the best's -> tie
    ([_cell("psd", 1.2, 0.2), _cell("adam", 1.0, 0.1)], "tie"),
    # not best, clear of the best's -> loss
    ([_cell("psd", 2.0, 0.1), _cell("adam", 1.0, 0.1)], "loss"),
    # lowest mean among its runs but diverged on a seed -> ranks behind, loss
    ([_cell("psd", 0.5, 0.1, diverged=1), _cell("adam", 1.0, 0.1)], "loss"),
    # the runner-up diverged on a seed, psd did not -> win even with overlapping intervals
    ([_cell("psd", 1.0, 0.5), _cell("adam", 0.9, 0.5, diverged=2)], "win"),
    # every seed diverged -> no mean -> loss
    ([_cell("psd", math.nan, math.nan, diverged=5), _cell("adam", 1.0, 0.1)], "loss"),
    # alone in the cell -> win; absent -> absent
    ([_cell("psd:checkpoint=x", 1.0, 0.1)], "win"),
    ([_cell("adam", 1.0, 0.1)], "absent"),
])
def test_scorecard_rule(cells, verdict):
    assert judge(cells, "psd", "final") == verdict


def test_scorecard_rule_uses_the_requested_metric():
    cells = [_cell("psd", 1.0, 0.1, auc=3.0, auc_ci=0.1), _cell("adam", 2.0, 0.1, auc=1.0, auc_ci=0.1)]
    assert judge(cells, "psd", "final") == "win"
    assert judge(cells, "psd", "auc") == "loss"


def test_scorecard_judges_each_learned_row_against_the_papers_comparison_set():
    """A sibling l2o row (mlp-lopt) that beats psd does not change psd's verdict; a hand-designed baseline
    or L2LBGDBGD that beats it does (the rule's comparison set)."""
    psd, adam = _cell("psd", 1.0, 0.05), _cell("adam:lr=0.01", 1.5, 0.05)
    sibling = _cell("mlp-lopt", 0.5, 0.05)
    assert judge([psd, adam, sibling], "psd", "final") == "loss"  # the raw rule ranks every row
    assert verdict([psd, adam, sibling], "psd", "final") == "win"
    assert verdict([psd, adam, sibling], "mlp-lopt", "final") == "win"
    assert verdict([psd, adam, sibling, _cell("l2lbgdbgd", 0.5, 0.05)], "psd", "final") == "loss"
    assert verdict([psd, adam, sibling, _cell("adagrad:lr=0.1", 0.98, 0.05)], "psd", "final") == "tie"
    assert verdict([adam, sibling], "psd", "final") == "absent"


@pytest.fixture
def broken_optimizer(monkeypatch):
    def factory(params, hp):
        raise FileNotFoundError("weights /nowhere/fake.safetensors are not there")

    registry._load_plugins()
    monkeypatch.setitem(registry._REGISTRY, "fakeopt", OptimizerEntry("fakeopt", "Fake", factory, learned=True))
    return "fakeopt"


def test_missing_optimizer_is_a_clear_error_before_any_run(tmp_path, broken_optimizer):
    with pytest.raises(MissingOptimizerError, match=r"(?s)fakeopt.*weights /nowhere.*--skip-missing"):
        _quick(tmp_path, optimizers=("sgd", broken_optimizer))
    assert not (tmp_path / "out" / "fig1").exists()


def test_skip_missing_runs_the_rest_and_marks_it_absent(tmp_path, broken_optimizer):
    report = _quick(tmp_path, optimizers=("sgd", broken_optimizer), skip_missing=True, settings=SETTINGS[:1])
    assert all(len(c.stats) == 1 for c in report.cells)
    text = report.doc.read_text()
    assert "**Fake** (`fakeopt`): **ABSENT — not run here.**" in text and "/nowhere/fake.safetensors" in text
    assert "| Fake | absent | absent | absent |" in text


def test_cli_reports_missing_optimizer_and_exits_2(tmp_path, broken_optimizer, capsys):
    rc = main(["reproduce", "--quick", "--jobs", "1", "--quiet", "--out", str(tmp_path / "o"),
               "--optimizers", "sgd", broken_optimizer])
    assert rc == 2
    err = capsys.readouterr().err
    assert "fakeopt" in err and "--skip-missing" in err


def test_cli_quick_writes_its_document_into_the_output_folder(tmp_path, capsys):
    rc = main(["reproduce", "--quick", "--jobs", "1", "--quiet", "--out", str(tmp_path / "o"), "--optimizers", "sgd"])
    assert rc == 0
    doc = tmp_path / "o" / "REPRODUCTION.md"
    assert doc.exists() and "l2o reproduce --quick --jobs 1 --out" in doc.read_text()
    assert f"doc: {doc}" in capsys.readouterr().out


def test_learned_optimizer_with_weights_is_scored_and_weight_changes_are_refused(tmp_path):
    psd_lstm = pytest.importorskip("l2o.learned.psd")
    policy = psd_lstm.save_policy(tmp_path / "psd.safetensors", psd_lstm.init_net(0), {"note": "untrained test weights"})
    kw = {"optimizers": ("sgd", f"psd:checkpoint={policy}"), "settings": SETTINGS[:1]}
    report = _quick(tmp_path, **kw)
    assert sum(report.scorecard["psd"]["final"][v] for v in ("win", "tie", "loss")) == 3
    text = report.doc.read_text()
    assert "**Predicted Step Descent** — by final objective it wins" in text and "sha256" in text
    psd_lstm.save_policy(policy, psd_lstm.init_net(1), {"note": "other weights"})
    with pytest.raises(ValueError, match="changed since the runs"):
        _quick(tmp_path, **kw)


def test_weights_changed_mid_grid_or_after_an_interruption_are_refused(tmp_path, monkeypatch):
    """The digest is recorded before the first run: weights swapped while the grid runs, or between an
    interrupted first invocation and its resume, are refused instead of mixed into one row."""
    import l2o.experiments.reproduce as rep

    psd_lstm = pytest.importorskip("l2o.learned.psd")
    policy = psd_lstm.save_policy(tmp_path / "psd.safetensors", psd_lstm.init_net(0), {"note": "untrained test weights"})
    kw = {"optimizers": ("sgd", f"psd:checkpoint={policy}"), "settings": SETTINGS[:1]}
    real = rep.run_grid

    def swap_then_run(*a, **k):
        psd_lstm.save_policy(policy, psd_lstm.init_net(1), {"note": "swapped mid-grid"})
        return real(*a, **k)

    monkeypatch.setattr(rep, "run_grid", swap_then_run)
    with pytest.raises(ValueError, match="changed while the grid ran"):
        _quick(tmp_path, **kw)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    def fresh():
        return rep.reproduce(ReproduceConfig(quick=True, jobs=1, **kw), tmp_path / "fresh", progress=False,
                             log=lambda s: None)

    monkeypatch.setattr(rep, "run_grid", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fresh()
    psd_lstm.save_policy(policy, psd_lstm.init_net(2), {"note": "changed after the interruption"})
    monkeypatch.setattr(rep, "run_grid", real)
    with pytest.raises(ValueError, match="changed since the runs"):
        fresh()


def test_a_bug_in_an_optimizer_is_raised_not_reported_as_absent(monkeypatch):
    """ValueError/OSError (unknown name, missing or bad weights, no tuned setting) mean "cannot run";
    any other exception is a bug and must propagate instead of marking the optimizer absent."""
    from l2o.experiments.reproduce import check_optimizers

    def missing_weights(params, hp):
        raise FileNotFoundError("no such weights")

    def buggy(params, hp):
        return params.no_such_attribute  # AttributeError: a bug

    monkeypatch.setitem(registry._REGISTRY, "noweights", OptimizerEntry("noweights", "NoWeights", missing_weights, learned=True))
    monkeypatch.setitem(registry._REGISTRY, "buggy", OptimizerEntry("buggy", "Buggy", buggy, learned=True))
    (status,) = check_optimizers(["noweights"])
    assert not status.available and "FileNotFoundError: no such weights" in status.reason
    with pytest.raises(AttributeError):
        check_optimizers(["buggy"])


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"invocations": 3}', "\xff\xfe"])
def test_a_corrupt_manifest_is_an_error_not_a_fresh_start(tmp_path, content):
    from l2o.experiments.reproduce import CorruptManifestError

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(CorruptManifestError, match="manifest.json"):
        _quick(tmp_path)
    assert (out / "manifest.json").read_bytes() == content.encode("latin-1")  # left as it was
    rc = main(["reproduce", "--quick", "--jobs", "1", "--quiet", "--out", str(out), "--optimizers", "sgd"])
    assert rc == 2


def test_learned_optimizers_beyond_the_paper_are_scored_with_the_policy_by_trainer_table(tmp_path):
    """The two cheap rows of the 2 × 2 (both MLPs) in a one-figure quick grid: each gets a scorecard
    line, and the 2 × 2 table shows their counts in the right cells and "not run" in the others."""
    kw = {"optimizers": ("adagrad", "mlp-lopt", "mlp-lopt-gps"), "settings": SETTINGS[:1]}
    report = _quick(tmp_path, **kw)
    assert list(report.scorecard) == ["mlp-lopt", "mlp-lopt-gps"]
    text = report.doc.read_text()
    for name in ("mlp-lopt", "mlp-lopt-gps"):
        f = report.scorecard[name]["final"]
        assert sum(f[v] for v in ("win", "tie", "loss")) == 3
        assert f"(`{name}`) wins {f['win']} / ties {f['tie']} / loses {f['loss']} by final objective" in text
    table = text.split("Policy × meta-trainer")[1]
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    mlp = rows["per-coordinate MLP"].split(" | ")
    assert mlp[1].startswith("`mlp-lopt-gps`: final") and mlp[2].startswith("`mlp-lopt`: final")
    assert rows["PSD's LSTM"].count("not run") == 2
    assert "beyond the paper: per-coordinate MLP meta-trained by Persistent ES" in text
