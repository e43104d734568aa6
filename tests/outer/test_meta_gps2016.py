"""Meta-training the 2016 optimizer with multi-condition GPS: the CLI entry, exact resume on the
real optimizer MDP, and the learned optimizer run through the benchmark harness by name."""

from __future__ import annotations

import json
import math

import pytest
import torch

from l2o.baselines.registry import get_optimizer, parse_optimizer
from l2o.cli import main
from l2o.outer.meta_gps2016 import LTO2016Config, build_conditions
from l2o.experiments.runner import run_optimizer
from l2o.learned.lto2016 import WEIGHTS_DIR, load_policy, packaged_policy
from l2o.tasks.registry import make_task

TINY = """
family = "logreg"
train_objectives = 3
conditions = 2
horizon = 6
history = 3
seed = 0
[gps]
iterations = {iterations}
samples = 4
eval_samples = 2
pi_epochs = 3
dynamics_model = "local"
prior = "none"
"""


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(tmp_path, iterations: int):
    p = tmp_path / f"c{iterations}.toml"
    p.write_text(TINY.format(iterations=iterations))
    return str(p)


def test_config_conditions() -> None:
    cfg = LTO2016Config.from_dict({"train_objectives": 5, "conditions": 2, "horizon": 4, "history": 2})
    envs = build_conditions(cfg)
    assert len(envs) == 2 and all(len(e.tasks) == 1 for e in envs)
    assert [e.tasks[0].name for e in envs] == ["logreg/train/0", "logreg/train/1"]
    with pytest.raises(ValueError, match="conditions"):
        LTO2016Config.from_dict({"train_objectives": 5, "conditions": 6})
    with pytest.raises(ValueError, match="unknown"):
        LTO2016Config.from_dict({"condition": 2})


def test_cli_meta_train_resume_and_benchmark_by_name(tmp_path, capsys) -> None:
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main(["meta-train", "gps2016", "--config", _config(tmp_path, 3), "--out", str(ref), "--quiet"]) == 0
    # the same run in two calls: 2 iterations, then resumed and extended to 3, with the conditions'
    # trajectories in a pool of 2 worker processes for the second
    assert main(["meta-train", "gps2016", "--config", _config(tmp_path, 2), "--out", str(out), "--quiet"]) == 0
    assert main(["meta-train", "gps2016", "--config", _config(tmp_path, 2), "--out", str(out), "--quiet",
                 "--resume", "--iterations", "3", "--backend", "local", "--jobs", "2"]) == 0
    pa, _, meta_a = load_policy(ref / "policy.safetensors")
    pb, H, meta_b = load_policy(out / "policy.safetensors")
    assert H == 3 and meta_a["gps_iterations"] == meta_b["gps_iterations"] == 3
    assert meta_b["config"]["conditions"] == 2 and "gps2016" in meta_b["command"]
    sa, sb = pa.state_dict(), pb.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # bit for bit across the resume

    def strip(path):
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        for r in recs:
            r.pop("wall_s")
            for p in r["per_condition"]:
                p.pop("lqg_s")
        return recs

    assert strip(ref / "log.jsonl") == strip(out / "log.jsonl")
    assert all(len(r["per_condition"]) == 2 for r in strip(out / "log.jsonl"))
    assert "policy:" in capsys.readouterr().out

    # the learned optimizer as a harness optimizer name, on a held-out objective
    assert get_optimizer("lto2016").learned
    spec = parse_optimizer(f"lto2016:checkpoint={out / 'policy.safetensors'}")
    res = run_optimizer(make_task("logreg/test/0"), spec, seed=0, iterations=5)
    assert res.diverged_at is None and res.evals == [1] * 5
    assert all(math.isfinite(x) for x in res.true_loss)
    # the margin report and the mean-curve figure from run records
    from l2o.experiments.margin import margins, per_task_rows, plot_mean_curves

    sgd = run_optimizer(make_task("logreg/test/0"), parse_optimizer("sgd:lr=0.1"), seed=0, iterations=5)
    ms = margins(per_task_rows([res, sgd]), "lto2016")
    assert {(m.baseline, m.metric) for m in ms} == {("sgd:lr=0.1", "final"), ("sgd:lr=0.1", "auc")}
    final = next(m for m in ms if m.metric == "final")
    assert final.n == 1 and final.mean == pytest.approx(sgd.final - res.final)
    rows3 = {r["optimizer"]: r for r in per_task_rows([res, sgd], horizon=3)}
    assert float(rows3[str(spec)]["final_mean"]) == res.true_loss[3]
    assert float(rows3["sgd:lr=0.1"]["auc_mean"]) == pytest.approx(sum(sgd.true_loss[1:4]) / 3)
    assert plot_mean_curves([res, sgd], tmp_path / "curves.png").stat().st_size > 0


def test_lto2016_needs_a_checkpoint() -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        parse_optimizer("lto2016").build([torch.zeros(4, requires_grad=True)])


def test_margins_against_hand_computed() -> None:
    from l2o.experiments.margin import margins

    rows = []
    for task, (a, b) in {"t0": (1.0, 1.5), "t1": (2.0, 1.0), "t2": (1.0, 2.0), "t3": (0.5, 9.0)}.items():
        rows.append({"task": task, "optimizer": "lto2016:checkpoint=x", "diverged": "0",
                     "final_mean": str(a), "auc_mean": str(a)})
        rows.append({"task": task, "optimizer": "sgd:lr=1", "diverged": "1" if task == "t3" else "0",
                     "final_mean": str(b), "auc_mean": str(b)})
    m = {x.metric: x for x in margins(rows, "lto2016")}["final"]
    diffs = [0.5, -1.0, 1.0]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert m.baseline == "sgd:lr=1" and m.n == 3 and m.excluded == 1 and (m.wins, m.losses) == (2, 1)
    assert m.mean == pytest.approx(mean) and m.ci95 == pytest.approx(4.302652729911275 * sd / math.sqrt(3))


SHIPPED = sorted(WEIGHTS_DIR.glob("lto2016-*.safetensors"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_2016_policy_descends_on_a_held_out_objective(path) -> None:
    """A shipped policy (written by scripts/lto2016.sh) is a verified checkpoint of its family's
    dimension, with provenance, and lowers the objective of a held-out test problem over its
    training horizon (T = 40)."""
    _, history, meta = load_policy(path)
    family = meta["family"]
    assert path.stem == f"lto2016-{family}" and history == 25 and meta["gps_iterations"] >= 1
    task = make_task(f"{family}/test/3")
    res = run_optimizer(task, parse_optimizer(f"lto2016:checkpoint={path}"), seed=0, iterations=40)
    assert not res.diverged
    assert res.true_loss[-1] < 0.9 * res.true_loss[0]


def test_packaged_policy_by_family_and_clear_errors() -> None:
    assert [p.stem for p in SHIPPED] == ["lto2016-logreg", "lto2016-robust-linreg", "lto2016-smallnet"]
    for path in SHIPPED:
        family = path.stem.removeprefix("lto2016-")
        assert packaged_policy(family) == path
        opt = parse_optimizer(f"lto2016:family={family}").build([torch.zeros(make_task(f"{family}/test/0").dim, requires_grad=True)])
        assert opt.meta["family"] == family
    with pytest.raises(ValueError, match="no packaged 2016 policy for family 'nope'"):
        parse_optimizer("lto2016:family=nope").build([torch.zeros(4, requires_grad=True)])
    with pytest.raises(ValueError, match="exactly one"):
        parse_optimizer("lto2016:family=logreg,checkpoint=x").build([torch.zeros(4, requires_grad=True)])
