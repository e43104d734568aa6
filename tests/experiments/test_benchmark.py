"""The harness: resumable grids, parallel workers, outputs, tuning, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import l2o.experiments.benchmark as bench
from l2o.baselines.registry import OptimizerSpec
from l2o.baselines.tuned import TunedSettingsError, load_tuned
from l2o.experiments.benchmark import BenchmarkConfig, run_benchmark, run_grid
from l2o.experiments.store import RunKey, load_result
from l2o.experiments.tuning import TuningConfig, tune

TASKS = ("logreg/test/0", "robust-linreg/test/0")


def _keys(seeds=2, iters=20):
    specs = [OptimizerSpec.make("sgd", {"lr": 0.5}), OptimizerSpec.make("adam", {"lr": 0.05, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8})]
    return [RunKey(t, s, i, iters) for t in TASKS for s in specs for i in range(seeds)]


def test_run_grid_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    keys = _keys()
    first = run_grid(keys[:3], tmp_path, progress=False)
    calls = []
    real = bench._execute
    monkeypatch.setattr(bench, "_execute", lambda k, o, d: calls.append(k) or real(k, o, d))
    second = run_grid(keys, tmp_path, progress=False)
    assert calls == keys[3:]  # only the missing runs were executed
    assert second[:3] == first
    assert all(load_result(k, tmp_path) == r for k, r in zip(keys, second, strict=True))


def test_tampered_or_mismatched_records_are_run_again(tmp_path):
    keys = _keys(seeds=1)
    run_grid(keys, tmp_path, progress=False)
    keys[0].path(tmp_path).write_text("{ not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert load_result(keys[0], tmp_path) is None
    longer = RunKey(keys[1].task, keys[1].optimizer, keys[1].seed, 21)
    assert load_result(longer, tmp_path) is None  # same path, different iteration count
    again = run_grid(keys, tmp_path, progress=False)
    assert len(again[0].true_loss) == 21


def test_parallel_workers_give_the_same_results_as_serial(tmp_path):
    keys = _keys(seeds=2, iters=15)
    serial = run_grid(keys, tmp_path / "a", jobs=1, progress=False)
    parallel = run_grid(keys, tmp_path / "b", jobs=2, progress=False)
    for s, p in zip(serial, parallel, strict=True):
        assert s.true_loss == p.true_loss


def test_run_benchmark_writes_table_figure_and_manifest(tmp_path):
    cfg = BenchmarkConfig(tasks=TASKS, optimizers=("sgd:lr=0.5", "momentum:lr=0.1,momentum=0.9"), seeds=3, iterations=25)
    rep = run_benchmark(cfg, tmp_path, progress=False)
    assert len(rep.results) == 2 * 2 * 3
    assert {c.task for c in rep.cells} == set(TASKS) and all(c.n == 3 for c in rep.cells)
    md = rep.files["markdown"].read_text()
    assert "logreg/test/0" in md and "±" in md
    png = rep.files["figure"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    manifest = json.loads(rep.files["manifest"].read_text())
    assert manifest["resolved_optimizers"] == ["sgd:lr=0.5", "momentum:lr=0.1,momentum=0.9"]
    assert manifest["environment"]["torch"]
    lines = rep.files["csv"].read_text().splitlines()
    assert lines[0].startswith("task,optimizer,n,diverged,final_mean") and len(lines) == 5


def test_benchmark_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown benchmark config key"):
        BenchmarkConfig.from_dict({"tasks": ["logreg/test/0"], "optimizers": ["sgd"], "seed": 3})
    with pytest.raises(ValueError, match="seeds"):
        BenchmarkConfig(tasks=TASKS, optimizers=("sgd",), seeds=0)
    with pytest.raises(ValueError, match="cannot parse task"):
        run_benchmark(BenchmarkConfig(tasks=("mnist",), optimizers=("sgd:lr=0.1",), seeds=1, iterations=2), Path("/tmp/unused"), progress=False)


def test_tuning_picks_the_grid_point_with_the_best_score(tmp_path, monkeypatch):
    from l2o.baselines import registry

    entry = registry.get_optimizer("sgd")
    monkeypatch.setitem(registry._REGISTRY, "sgd", type(entry)(**{**entry.__dict__, "grid": {"lr": (1e-4, 0.5, 1e6)}}))
    cfg = TuningConfig(task="logreg/train/0", optimizers=("sgd",), seeds=2, iterations=30)
    tuned = tune(cfg, tmp_path / "grid", progress=False, command="test")
    rows = {r["hparams"]["lr"]: r for r in tuned.grid["sgd"]}
    assert rows[1e6]["score"] is None or rows[1e6]["score"] > rows[0.5]["score"]
    assert rows[0.5]["score"] < rows[1e-4]["score"]
    assert tuned.settings["sgd"] == {"lr": 0.5}
    assert tuned.seeds == (1000, 1001)
    path = tuned.save(tmp_path / "tuned.json")
    again = load_tuned(path)
    assert again.spec("sgd") == OptimizerSpec.make("sgd", {"lr": 0.5})
    with pytest.raises(TunedSettingsError, match="adam"):
        again.spec("adam")


def test_load_tuned_rejects_malformed_files(tmp_path):
    p = tmp_path / "t.json"
    p.write_text("[1, 2")
    with pytest.raises(TunedSettingsError, match="not valid JSON"):
        load_tuned(p)
    p.write_text(json.dumps({"format_version": 1}))
    with pytest.raises(TunedSettingsError, match="lacks fields"):
        load_tuned(p)
    with pytest.raises(TunedSettingsError, match="not found"):
        load_tuned(tmp_path / "missing.json")


def test_tuning_rejects_learned_optimizers_and_bad_criterion():
    with pytest.raises(ValueError, match="criterion"):
        TuningConfig(criterion="best")
    with pytest.raises(ValueError, match="unknown tuning config key"):
        TuningConfig.from_dict({"tsk": "x"})


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "l2o.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_cli_benchmark_killed_midway_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["benchmark", "--tasks", *TASKS, "--optimizers", "sgd:lr=0.5", "adagrad:lr=0.3",
            "--seeds", "4", "--iterations", "300", "--jobs", "1", "--quiet"]
    ref = _cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    out = tmp_path / "killed"
    p = _cli(*args, "--out", str(out))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("runs/*/*/*.json"))) < 3:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    finished = {f: f.stat().st_mtime_ns for f in out.glob("runs/*/*/*.json")}
    assert 3 <= len(finished) < 16, "the kill should land mid-grid"
    p = _cli(*args, "--out", str(out))
    assert p.wait(timeout=300) == 0, p.stderr.read()
    for f, mtime in finished.items():
        assert f.stat().st_mtime_ns == mtime, f"{f} was redone"
    for f in (tmp_path / "ref").glob("runs/*/*/*.json"):
        a = json.loads(f.read_text())
        b = json.loads((out / f.relative_to(tmp_path / "ref")).read_text())
        assert a["true_loss"] == b["true_loss"]


def test_cli_reports_bad_input_clearly(tmp_path):
    p = _cli("benchmark", "--tasks", "mnist:48:b64", "--optimizers", "sgd:lr=0.1", "--out", str(tmp_path), "--quiet")
    assert p.wait(timeout=120) == 2
    assert "cannot parse task" in p.stderr.read()
    cfg = tmp_path / "c.toml"
    cfg.write_text('tasks = ["logreg/test/0"]\nitertions = 3\n')
    p = _cli("benchmark", "--config", str(cfg), "--optimizers", "sgd:lr=0.1", "--out", str(tmp_path), "--quiet")
    assert p.wait(timeout=120) == 2
    assert "itertions" in p.stderr.read()


def test_cli_list_names_every_baseline():
    p = _cli("list")
    out, _ = p.communicate(timeout=60)
    for name in ("sgd", "momentum", "cg", "lbfgs", "adagrad", "adam", "rmsprop"):
        assert name in out


@pytest.fixture(autouse=True)
def _no_user_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    os.environ.pop("L2O_DATA_DIR", None)


def test_task_ranges_expand_and_many_instances_are_pooled(tmp_path):
    from l2o.tasks.registry import expand_task_specs

    assert expand_task_specs(["logreg/test/2-4", "mnist:48-48:b64"]) == [
        "logreg/test/2", "logreg/test/3", "logreg/test/4", "mnist:48-48:b64"]
    with pytest.raises(ValueError, match="empty"):
        expand_task_specs(["logreg/test/5-1"])
    cfg = BenchmarkConfig.from_dict({"tasks": ["logreg/test/0-12"], "optimizers": ["sgd:lr=0.5"], "seeds": 1, "iterations": 5})
    assert len(cfg.tasks) == 13
    rep = run_benchmark(cfg, tmp_path, progress=False)
    assert [(c.task, c.n) for c in rep.cells] == [("logreg/test/*", 13)]
    assert len(list(tmp_path.glob("runs/*/*/*.json"))) == 13
    tc = TuningConfig.from_dict({"task": ["logreg/train/0-2"], "optimizers": ["sgd"], "seeds": 1, "iterations": 5})
    assert tc.tasks == ("logreg/train/0", "logreg/train/1", "logreg/train/2")
