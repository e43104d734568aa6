"""GPS's trajectories on an executor (l2o.execution): a worker pool gives exactly the iterations of
the in-process run, for conditions (multi-condition GPS) and for coordinate groups (Conv-GPS).
The Ray version of the same check is in tests/experiments/test_ray_backend.py."""

from __future__ import annotations

import torch

from l2o.execution import Executor, LocalExecutor
from l2o.outer.gps import GPSConfig
from l2o.outer.gps.conv_trainer import ConvGPSConfig, ConvGPSTrainer
from l2o.outer.gps.trainer import MultiConditionGPSTrainer
from tests.conftest import tiny_mlp_task
from tests.outer.gps.test_multi_trainer import _conditions

TIMING = ("wall_s", "lqg_s")


def strip(logs: list[dict]) -> list[dict]:
    """Records without measured times, per condition or group too."""
    out = []
    for r in logs:
        r = {k: v for k, v in r.items() if k not in TIMING}
        for key in ("per_condition", "groups"):
            if key in r:
                r[key] = [{k: v for k, v in p.items() if k not in TIMING} for p in r[key]]
        out.append(r)
    return out


def multi_condition_run(out, executor: Executor | None) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    pi = torch.nn.Linear(3, 2).double()
    cfg = GPSConfig(iterations=2, samples=8, eval_samples=4, pi_epochs=20, progress=False)
    logs = MultiConditionGPSTrainer(_conditions(3, 2, 8, [0.5, 2.0]), pi, cfg, out, executor=executor).train()
    return strip(logs), {k: v.clone() for k, v in pi.state_dict().items()}


def conv_run(out, executor: Executor | None) -> tuple[list[dict], dict]:
    cfg = ConvGPSConfig(task="tiny", horizon=10, iterations=2, samples=3, coords_per_group=4, pi_steps=2,
                        pi_first_steps=3, pi_batch=8, eval_every=5, curvature_every=3)
    tr = ConvGPSTrainer(cfg, out, task=tiny_mlp_task(), progress=False, executor=executor)
    return strip(tr.train()), {**tr.net, **{f"K{i}": u.psi.K for i, u in enumerate(tr.groups)}}


def same(a: tuple[list[dict], dict], b: tuple[list[dict], dict]) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_a_worker_pool_reproduces_the_in_process_iterations(tmp_path):
    with LocalExecutor(jobs=2) as pool:
        same(multi_condition_run(tmp_path / "m0", None), multi_condition_run(tmp_path / "m1", pool))
        same(conv_run(tmp_path / "c0", None), conv_run(tmp_path / "c1", pool))
