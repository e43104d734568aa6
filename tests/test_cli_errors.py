"""Bad command lines give a one-line error and exit code 2 (never a traceback), and the output
folder of a benchmark is locked and bound to one configuration."""

from __future__ import annotations

import json

import pytest

from l2o.cli import main

FAST = ["--tasks", "logreg/test/0", "--seeds", "2", "--iterations", "3", "--jobs", "1", "--quiet"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("L2O_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a usage error: exit code 2 and a one-line message (no traceback)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("l2o ") and "error:" in last
    return last


@pytest.mark.parametrize("argv, message", [
    (["benchmark", "--optimizers", "adam:lr=abc"], "hyperparameter lr must be a finite number, got 'abc'"),
    (["benchmark", "--optimizers", "adam:lr=nan"], "hyperparameter lr must be a finite number"),
    (["benchmark", "--optimizers", "adam:lr=1,lr=2"], "lr is given twice"),
    (["benchmark", "--config", "."], "is a directory"),
    (["benchmark", "--config", "missing.toml"], "not found"),
    (["benchmark", "--out", "/dev/null/x"], "cannot use /dev/null/x as the output folder"),
    (["benchmark", "--tasks", "logreg/test/0-99999999"], "has 100000000 instances; at most 10000"),
    (["benchmark", "--iterations", "0"], "--iterations: must be >= 1"),
    (["benchmark", "--seeds", "-1"], "--seeds: must be >= 1"),
    (["benchmark", "--jobs", "x"], "--jobs: expected a positive integer"),
    (["benchmark", "--tasks", "mnist"], "cannot parse task 'mnist'"),
])
def test_benchmark_input_errors(capsys, tmp_path, argv, message):
    given = {argv[i] for i in range(1, len(argv)) if argv[i].startswith("--")}
    defaults = {"--tasks": ["logreg/test/0"], "--seeds": ["2"], "--iterations": ["3"], "--jobs": ["1"],
                "--out": [str(tmp_path / "out")]}
    argv = argv + [w for flag, v in defaults.items() if flag not in given for w in [flag, *v]] + ["--quiet"]
    assert message in _error(capsys, argv)
    assert not (tmp_path / "out" / "runs").exists()  # nothing ran


def test_bad_config_file_contents(capsys, tmp_path):
    (tmp_path / "bad.toml").write_text("tasks = [")
    assert "not valid TOML" in _error(capsys, ["benchmark", "--config", "bad.toml", "--out", "o"])
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "must hold a table" in _error(capsys, ["benchmark", "--config", "list.json", "--out", "o"])


@pytest.mark.parametrize("argv, message", [
    (["meta-train", "psd", "--episodes", "3"], "--episodes does not apply to meta-train psd"),
    (["meta-train", "l2l", "--iterations", "3"], "--iterations does not apply to meta-train l2l"),
    (["meta-train", "gps2016", "--data-dir", "d"], "--data-dir does not apply to meta-train gps2016"),
    (["meta-train", "gps2016", "--iterations", "0"], "--iterations: must be >= 1"),
    (["meta-train", "l2l", "--out", "/dev/null/x"], "cannot create the folder"),
    (["meta-train", "psd", "--out", "/dev/null"], "exists and is not a folder"),
    (["tune", "--iterations", "0"], "--iterations: must be >= 1"),
    (["tune", "--config", "."], "is a directory"),
])
def test_meta_train_and_tune_input_errors(capsys, argv, message):
    assert message in _error(capsys, argv)


@pytest.mark.parametrize("method", ["psd", "l2l", "gps2016"])
def test_meta_train_into_an_existing_run_needs_resume(capsys, tmp_path, method):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"x")
    msg = _error(capsys, ["meta-train", method, "--out", str(out), "--quiet"])
    assert "already holds a meta-training run: pass --resume" in msg
    assert (out / "checkpoint.safetensors").read_bytes() == b"x"


def test_repeated_tasks_and_optimizers_run_and_count_once(capsys, tmp_path):
    argv = ["benchmark", "--tasks", "logreg/test/0", "logreg/test/0", "logreg/test/0-0", "--optimizers", "sgd:lr=0.1",
            "sgd:lr=0.1", "adam:lr=0.01", "--seeds", "3", "--iterations", "3", "--jobs", "1", "--quiet", "--out", "o"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "repeated tasks ignored" in err and "repeated optimizers ignored" in err
    rows = (tmp_path / "o" / "summary.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(r.split(",")[2] == "3" for r in rows)  # n = 3 seeds, not 6 or 9
    assert len(list((tmp_path / "o").glob("runs/*/*/*.json"))) == 6


def test_tuned_baseline_given_bare_and_resolved_counts_once(tmp_path):
    from l2o.baselines.tuned import load_tuned
    from l2o.experiments.benchmark import BenchmarkConfig

    resolved = str(load_tuned().spec("adam"))
    cfg = BenchmarkConfig(tasks=("logreg/test/0",), optimizers=("adam", resolved), seeds=3, iterations=3)
    assert [str(s) for s in cfg.specs()] == [resolved] and len(cfg.keys()) == 3


def test_rerun_with_another_configuration_is_refused(capsys, tmp_path):
    base = ["benchmark", "--optimizers", "sgd:lr=0.1", "--out", "o"] + FAST
    assert main(base) == 0
    summary = (tmp_path / "o" / "summary.md").read_text()
    capsys.readouterr()
    changed = [a if a != "3" else "5" for a in base]  # --iterations 5
    msg = _error(capsys, changed)
    assert "holds a benchmark with a different configuration (iterations: 3 there, 5 now)" in msg
    assert (tmp_path / "o" / "summary.md").read_text() == summary
    assert not list((tmp_path / "o").glob("runs/*/*/*.json.tmp"))
    assert main(base) == 0  # the same command resumes
    recorded = json.loads((tmp_path / "o" / "benchmark-config.json").read_text())
    assert recorded["iterations"] == 3 and recorded["optimizers"] == ["sgd:lr=0.1"]


def test_a_second_benchmark_on_a_locked_folder_fails_at_once(capsys, tmp_path):
    from l2o.experiments.benchmark import locked_output

    with locked_output(tmp_path / "o"):
        msg = _error(capsys, ["benchmark", "--optimizers", "sgd:lr=0.1", "--out", "o"] + FAST)
    assert "is in use by another benchmark" in msg
    assert not (tmp_path / "o" / "runs").exists()
    assert main(["benchmark", "--optimizers", "sgd:lr=0.1", "--out", "o"] + FAST) == 0  # lock released


def test_tune_writes_beside_its_runs_and_leaves_the_packaged_settings_alone(capsys, tmp_path):
    from l2o.baselines.tuned import default_tuned_path

    packaged = default_tuned_path().read_bytes()
    assert main(["tune", "--task", "logreg/train/0", "--optimizers", "sgd", "--seeds", "1", "--iterations", "3",
                 "--jobs", "1", "--quiet", "--out", "t"]) == 0
    assert (tmp_path / "t" / "tuned.json").is_file()
    assert default_tuned_path().read_bytes() == packaged
    assert "--tuned" in capsys.readouterr().out


def test_data_exits_nonzero_when_a_found_dataset_is_corrupt(capsys, tmp_path):
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (root / "mnist" / name).write_bytes(b"\x1f\x8b garbage")
    assert main(["data", "--data-dir", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "mnist" in out and "BAD" in out
    # Nothing found but nothing corrupt either: a report, exit 0.
    assert main(["data", "--data-dir", str(tmp_path / "empty"), "--quiet"]) == 0


def test_tuning_config_counts_a_repeated_task_or_optimizer_once():
    from l2o.experiments.tuning import TuningConfig

    cfg = TuningConfig.from_dict({"task": ["logreg/train/0", "logreg/train/0-1"], "optimizers": ["sgd", "sgd"]})
    assert cfg.tasks == ("logreg/train/0", "logreg/train/1") and cfg.optimizers == ("sgd",)
