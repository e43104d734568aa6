"""The execution backends (l2o.execution) without Ray: the local executor, validation, the
one-line errors for bad backend options, and the install hint when Ray is missing. (The Ray
backend itself is tested in tests/experiments/test_ray_backend.py.)"""

from __future__ import annotations

import builtins
import importlib.util
import operator
import sys

import pytest

from l2o import execution
from l2o.cli import main
from l2o.execution import (
    BackendUnavailableError,
    LocalExecutor,
    check_backend,
    describe_execution,
    make_executor,
    require_backend,
)


def _fails_on_three(x: int) -> int:
    if x == 3:
        raise ArithmeticError("three")
    return x * x


def test_local_executor_in_process_keeps_order_and_propagates_errors():
    calls = []
    with make_executor("local", jobs=1) as ex:
        assert isinstance(ex, LocalExecutor) and ex.describe() == "this process"
        assert ex.map(lambda x: calls.append(x) or -x, [3, 1, 2]) == [-3, -1, -2]  # no pickling in-process
        assert calls == [3, 1, 2]
        assert list(ex.map_unordered(abs, [])) == []
        with pytest.raises(ArithmeticError, match="three"):
            ex.map(_fails_on_three, [1, 2, 3, 4])


def test_local_pool_gives_every_result_once_and_in_order_from_map():
    items = list(range(-6, 6))
    with LocalExecutor(jobs=2) as ex:
        unordered = list(ex.map_unordered(operator.neg, items))
        assert sorted(i for i, _ in unordered) == list(range(len(items)))
        assert all(r == -items[i] for i, r in unordered)
        assert ex.map(operator.neg, items) == [-x for x in items]  # the same pool, reused
        with pytest.raises(ArithmeticError, match="three"):
            ex.map(_fails_on_three, [1, 2, 3, 4])
    ex.close()  # idempotent


@pytest.mark.parametrize("backend, jobs, address, message", [
    ("dask", None, None, "unknown execution backend 'dask'"),
    ("local", 0, None, "jobs must be a positive integer"),
    ("local", None, "auto", "needs backend 'ray'"),
    ("ray", None, "  ", "address must not be empty"),
])
def test_check_backend_rejects_bad_combinations(backend, jobs, address, message):
    with pytest.raises(ValueError, match=message):
        check_backend(backend, jobs, address)


def test_describe_execution():
    assert describe_execution("local", 3) == "3 worker processes"
    assert describe_execution("ray", 2) == "Ray tasks (1 CPU each) on a local Ray instance with 2 CPUs"
    assert describe_execution("ray", None, "ray://head:10001") == "Ray tasks (1 CPU each) on the Ray cluster at ray://head:10001"


@pytest.fixture
def no_ray(monkeypatch):
    """Make `import ray` fail as on a machine without the extra."""
    monkeypatch.setitem(sys.modules, "ray", None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "ray" else real(name, *a, **k))
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_ray_names_the_extra(no_ray):
    with pytest.raises(BackendUnavailableError, match=r"the ray backend needs `pip install l2o\[ray\]`"):
        make_executor("ray")
    with pytest.raises(ValueError, match=r"pip install l2o\[ray\]"):  # also a ValueError, for the CLI
        require_backend("ray")
    require_backend("local")
    assert make_executor("local", 1).backend == "local"


def _error(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("l2o ") and "error:" in last
    return last


FAST = ["--tasks", "logreg/test/0", "--optimizers", "sgd:lr=0.1", "--seeds", "2", "--iterations", "3", "--quiet"]


@pytest.mark.parametrize("argv, message", [
    (["benchmark", *FAST, "--address", "auto"], "--address names a Ray cluster: it needs --backend ray"),
    (["benchmark", *FAST, "--backend", "local", "--address", "auto"], "it needs --backend ray"),
    (["tune", "--address", "auto"], "it needs --backend ray"),
    (["reproduce", "--quick", "--address", "auto"], "it needs --backend ray"),
    (["benchmark", *FAST, "--backend", "ray", "--address", ""], "--address must not be empty"),
    (["benchmark", *FAST, "--backend", "dask"], "--backend: invalid choice: 'dask'"),
])
def test_cli_bad_backend_options_are_one_line_errors(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in _error(capsys, argv + ["--out", str(tmp_path / "o")] if argv[0] != "tune" else argv)
    assert not (tmp_path / "o" / "runs").exists()


@pytest.mark.parametrize("command", [["benchmark", *FAST], ["tune", "--optimizers", "sgd"], ["reproduce", "--quick"]])
def test_cli_ray_backend_without_ray_is_a_one_line_error(capsys, tmp_path, monkeypatch, no_ray, command):
    monkeypatch.chdir(tmp_path)
    msg = _error(capsys, command + ["--backend", "ray", "--out", str(tmp_path / "o")])
    assert "the ray backend needs `pip install l2o[ray]`" in msg
    assert not (tmp_path / "o" / "runs").exists()


def test_execution_imports_nothing_from_the_rest_of_l2o():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(execution.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in imported if m.startswith("l2o")], imported
