"""TuningConfig.grids: per-optimizer overrides of the registry's tuning grid."""

from __future__ import annotations

import pytest

from l2o.experiments.tuning import TuningConfig, tune


def test_grid_override_replaces_listed_values_only(tmp_path) -> None:
    cfg = TuningConfig.from_dict({"task": "logreg/train/0-1", "optimizers": ["sgd", "momentum"], "seeds": 1,
                                  "iterations": 20, "grids": {"sgd": {"lr": [0.3, 3.0]},
                                                              "momentum": {"lr": [0.1]}}})
    assert cfg.grid_points("sgd") == [{"lr": 0.3}, {"lr": 3.0}]
    assert cfg.grid_points("momentum") == [{"lr": 0.1, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.99}]
    tuned = tune(cfg, tmp_path / "grid", progress=False, command="test")
    assert [r["hparams"]["lr"] for r in tuned.grid["sgd"]] == [0.3, 3.0]
    assert tuned.settings["sgd"]["lr"] in (0.3, 3.0)
    assert len(tuned.grid["momentum"]) == 2
    # without overrides: the registry's grid
    assert len(TuningConfig(optimizers=("sgd",)).grid_points("sgd")) == 8


def test_grid_override_is_validated() -> None:
    with pytest.raises(ValueError, match="not among"):
        TuningConfig(optimizers=("sgd",), grids={"adam": {"lr": (0.1,)}})
    with pytest.raises(ValueError, match="no hyperparameter"):
        TuningConfig(optimizers=("sgd",), grids={"sgd": {"momentum": (0.9,)}})
    with pytest.raises(ValueError, match="empty"):
        TuningConfig(optimizers=("sgd",), grids={"sgd": {"lr": ()}})
