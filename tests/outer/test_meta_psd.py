"""The PSD meta-training driver: a tiny end-to-end run whose policy loads into the optimizer."""

from __future__ import annotations

import json

import pytest
import torch

from l2o.outer.meta_psd import meta_train
from l2o.outer.gps.conv_trainer import ConvGPSConfig
from l2o.learned.psd import PredictedStepDescent
from l2o.tasks.registry import make_task


def _config(iterations: int) -> ConvGPSConfig:
    return ConvGPSConfig(task="digits:8-6:b16", horizon=8, iterations=iterations, samples=2, coords_per_group=4,
                         pi_steps=2, pi_first_steps=3, pi_batch=8, eval_every=4, curvature_every=4)


def test_meta_train_writes_a_policy_the_optimizer_runs_and_resumes_only_when_asked(tmp_path):
    res = meta_train(_config(1), tmp_path, progress=False, command="l2o meta-train psd (test)")
    assert len(res.log) == 1 and res.policy.exists() and res.log_file.exists()
    info = json.loads(res.policy.with_suffix(".json").read_text())
    assert info["training"]["command"] == "l2o meta-train psd (test)"
    assert info["training"]["config"]["task"] == "digits:8-6:b16"

    task = make_task("digits:8-6:b16")
    params = [p.requires_grad_(True) for p in task.init_params(0).values()]
    names = [g.name for g in task.groups]
    opt = PredictedStepDescent(params, checkpoint=res.policy)
    idx = torch.arange(16)

    def closure():
        opt.zero_grad()
        loss = task.loss(dict(zip(names, params)), idx)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    for _ in range(3):
        opt.step(closure)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))

    with pytest.raises(FileExistsError, match="--resume"):
        meta_train(_config(2), tmp_path, progress=False)
    res2 = meta_train(_config(2), tmp_path, resume=True, progress=False)
    assert [r["iteration"] for r in res2.log] == [0, 1]


def test_log_table_and_plot(tmp_path):
    from l2o.outer.meta_psd import log_table, main

    log = [{"iteration": i, "psi_auc": 0.6 - 0.01 * i, "psi_final": 0.5, "pi_auc": None if i == 0 else 0.55,
            "pi_final": None if i == 0 else 0.45, "pi_regression_rel_rmse": 0.2, "epsilon": 0.1,
            "groups": [{"group": "W1", "gain_K_grad": -1.0}, {"group": "b1", "gain_K_grad": -0.9}]} for i in range(3)]
    table = log_table(log)
    assert table.count("\n") == 4 and "gain Φ2_0 b1" in table and "diverged" in table
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in log))
    assert main([str(path), "--iterations", "2", "--plot", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 1000
