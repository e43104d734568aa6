"""The README's main job, `l2o benchmark --preset demo`, shows the shipped learned optimizers."""

from __future__ import annotations

from l2o.cli import PRESETS, main


def test_demo_preset_runs_the_learned_optimizers_beside_the_seven_baselines(tmp_path, monkeypatch, capsys):
    from l2o.baselines.registry import BASELINES

    assert {"mlp-lopt", "psd", "l2lbgdbgd"} <= set(PRESETS["demo"]["optimizers"])
    assert set(BASELINES) <= set(PRESETS["demo"]["optimizers"])
    monkeypatch.chdir(tmp_path)
    assert main(["benchmark", "--preset", "demo", "--seeds", "1", "--iterations", "3", "--jobs", "1", "--quiet",
                 "--out", "demo"]) == 0
    table = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "optimizer" not in line]
    assert "mlp-lopt" in rows and "psd" in rows and "l2lbgdbgd" in rows and len(rows) == 10
    assert (tmp_path / "demo" / "figure.png").is_file()
