"""One run: the recorded curve is the true objective along the optimizer's own trajectory."""

from __future__ import annotations

import math

import pytest
import torch

from l2o.baselines.registry import OptimizerSpec
from l2o.experiments.runner import BATCH_SEED_OFFSET, RunResult, run_optimizer
from l2o.experiments.summary import mean_ci, markdown_table, summarize, winners
from tests.conftest import tiny_mlp_task


def test_sgd_run_matches_a_hand_written_loop(tiny_task):
    spec = OptimizerSpec.make("sgd", {"lr": 0.1})
    r = run_optimizer(tiny_task, spec, seed=4, iterations=30)
    params = tiny_task.init_params(4)
    gen = torch.Generator().manual_seed(BATCH_SEED_OFFSET + 4)
    expected = [tiny_task.true_loss(params)]
    for _ in range(30):
        idx = tiny_task.sample_batch(gen)
        grads = torch.func.grad(tiny_task.loss)(params, idx)
        params = {k: params[k] - 0.1 * grads[k] for k in params}
        expected.append(tiny_task.true_loss(params))
    assert r.true_loss == pytest.approx(expected, rel=1e-5)
    assert r.evals == [1] * 30
    assert not r.diverged and len(r.batch_loss) == 30
    assert r.auc == pytest.approx(sum(expected[1:]) / 30)
    assert r.final == pytest.approx(expected[-1])


def test_same_seed_gives_every_optimizer_the_same_start_and_batches(tiny_task):
    a = run_optimizer(tiny_task, OptimizerSpec.make("sgd", {"lr": 0.1}), seed=2, iterations=3)
    b = run_optimizer(tiny_task, OptimizerSpec.make("adam", {"lr": 0.01}), seed=2, iterations=3)
    c = run_optimizer(tiny_task, OptimizerSpec.make("adam", {"lr": 0.01}), seed=3, iterations=3)
    assert a.true_loss[0] == b.true_loss[0] != c.true_loss[0]
    assert a.batch_loss[0] == pytest.approx(b.batch_loss[0])  # same x0 and same first batch


def test_divergence_is_recorded_not_dropped(tiny_task):
    r = run_optimizer(tiny_task, OptimizerSpec.make("sgd", {"lr": 1e38}), seed=0, iterations=20)
    assert r.diverged
    assert 1 <= r.diverged_at <= 20
    assert r.true_loss[r.diverged_at] is None and all(v is None for v in r.true_loss[r.diverged_at:])
    assert len(r.true_loss) == 21
    assert math.isinf(r.final) and math.isinf(r.auc)
    cells = summarize([r])
    assert cells[0].diverged == 1 and cells[0].n == 1


def test_line_search_optimizers_report_their_evaluations(tiny_task):
    r = run_optimizer(tiny_task, OptimizerSpec.make("lbfgs", {"line_search": "strong_wolfe", "max_step": 1.0}),
                      seed=0, iterations=10)
    assert all(e >= 1 for e in r.evals)
    assert sum(r.evals) > 10  # the line search evaluated more than once somewhere


def test_record_round_trip_and_validation(tiny_task):
    r = run_optimizer(tiny_task, OptimizerSpec.make("sgd", {"lr": 0.1}), seed=0, iterations=5)
    assert RunResult.from_dict(r.to_dict()) == r
    d = r.to_dict()
    d["true_loss"] = d["true_loss"][:-1]
    with pytest.raises(ValueError, match="objective values"):
        RunResult.from_dict(d)
    del d["evals"]
    with pytest.raises(ValueError, match="lacks"):
        RunResult.from_dict(d)


def test_run_rejects_nonpositive_iterations(tiny_task):
    with pytest.raises(ValueError, match="iterations"):
        run_optimizer(tiny_task, OptimizerSpec.make("sgd", {"lr": 0.1}), seed=0, iterations=0)


def test_mean_ci_matches_scipy_t_interval():
    from scipy import stats

    vals = [1.0, 2.0, 4.0, 7.0, 11.0]
    m, h = mean_ci(vals)
    lo, hi = stats.t.interval(0.95, 4, loc=5.0, scale=stats.sem(vals))
    assert m == pytest.approx(5.0) and h == pytest.approx((hi - lo) / 2)
    assert math.isnan(mean_ci([3.0])[1])


def test_winner_prefers_runs_without_divergence():
    task = tiny_mlp_task()
    ok = run_optimizer(task, OptimizerSpec.make("sgd", {"lr": 0.01}), seed=0, iterations=5)
    bad = run_optimizer(task, OptimizerSpec.make("sgd", {"lr": 1e38}), seed=0, iterations=5)
    good = run_optimizer(task, OptimizerSpec.make("sgd", {"lr": 0.3}), seed=0, iterations=5)
    cells = summarize([ok, bad, good])
    assert winners(cells) == {"tiny": good.optimizer if good.final < ok.final else ok.optimizer}
    table = markdown_table(cells)
    assert "1/1" in table and "**" in table
