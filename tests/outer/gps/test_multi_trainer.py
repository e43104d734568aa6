"""Multi-condition GPS/BADMM on LinearQuadraticEnv conditions: π's mean action approaches each
condition's ψ, the true cost falls, and a resumed run equals the uninterrupted one bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from l2o.checkpoint import CheckpointError
from l2o.outer.gps import GPSConfig, LinearQuadraticEnv
from l2o.outer.gps.trainer import CHECKPOINT_NAME, LOG_NAME, ConditionSetting, MultiConditionGPSTrainer

DT = torch.float64
TIMING = ("wall_s", "lqg_s")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _conditions(D: int, d: int, T: int, means: list[float], seed: int = 1, radius: float = 1.1) -> list[LinearQuadraticEnv]:
    """Same system, different initial-state distributions (one per condition): the LQR gain is
    common to all, so one linear π can match every condition's optimum."""
    base = LinearQuadraticEnv.random(D, d, T, seed=seed, radius=radius)
    g = torch.Generator().manual_seed(seed + 100)
    envs = []
    for m in means:
        direction = torch.randn(D, dtype=DT, generator=g)
        mu0 = m * math.sqrt(D) * direction / direction.norm()
        envs.append(LinearQuadraticEnv(base.A, base.B, base.Q, base.R, T, noise_cov=base.F, init_mean=mu0,
                                       init_cov=base.sigma0))
    return envs


def _exact_cost(env: LinearQuadraticEnv, pi: torch.nn.Linear) -> float:
    return env.expected_cost(pi.weight.detach().to(DT), pi.bias.detach().to(DT))


def _strip(logs: list[dict]) -> list[dict]:
    out = []
    for r in logs:
        r = {k: v for k, v in r.items() if k not in TIMING}
        r["per_condition"] = [{k: v for k, v in p.items() if k not in TIMING} for p in r["per_condition"]]
        out.append(r)
    return out


def test_multi_condition_pi_matches_each_psi_and_cost_falls(tmp_path) -> None:
    T = 15
    envs = _conditions(3, 1, T, [1.0, 2.0, 0.5])
    torch.manual_seed(0)
    pi = torch.nn.Linear(3, 1).double()
    init = [_exact_cost(e, pi) for e in envs]
    cfg = GPSConfig(iterations=8, samples=15, eval_samples=10, init_noise=0.1, pi_epochs=100, pi_lr=0.05,
                    progress=False)
    tr = MultiConditionGPSTrainer(envs, pi, cfg, tmp_path)
    logs = tr.train()
    assert len(logs) == 8 and all(r["conditions"] == 3 and len(r["per_condition"]) == 3 for r in logs)
    # every condition keeps its own ψ, ν, ε, λ
    assert len({id(cd.psi) for cd in tr.conditions}) == 3
    assert not torch.equal(tr.conditions[0].lam, tr.conditions[1].lam)
    for i, env in enumerate(envs):
        first, last = logs[0]["per_condition"][i], logs[-1]["per_condition"][i]
        # π's mean action approaches condition i's ψ on ψ's states
        assert last["pi_mse_before"] < first["pi_mse_before"] / 100
        assert last["pi_mse"] < first["pi_mse"] / 10
        assert last["kl_psi_pi"] < first["kl_psi_pi"] / 5
        # and π's true cost on condition i falls to near its optimum
        final = _exact_cost(env, pi)
        assert final < init[i]
        assert final < env.optimal_cost() * 1.02
        assert last["pi_cost"] < first["pi_cost"]
    assert logs[-1]["pi_cost"] < logs[0]["pi_cost"]
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert [json.loads(x) for x in lines] == logs


def test_conditions_with_different_dynamics_reach_a_consensus(tmp_path) -> None:
    """Different systems: one π cannot be optimal for all, but BADMM still pulls π and every ψ_c
    together and lowers π's true cost on every condition."""
    T = 12
    envs = [LinearQuadraticEnv.random(2, 1, T, seed=s, radius=1.05) for s in (3, 4)]
    torch.manual_seed(1)
    pi = torch.nn.Linear(2, 1).double()
    init = [_exact_cost(e, pi) for e in envs]
    cfg = GPSConfig(iterations=8, samples=15, eval_samples=10, init_noise=0.1, pi_epochs=100, pi_lr=0.05,
                    progress=False)
    logs = MultiConditionGPSTrainer(envs, pi, cfg, tmp_path).train()
    assert logs[-1]["kl_psi_pi"] < logs[0]["kl_psi_pi"] / 3
    for i, env in enumerate(envs):
        assert _exact_cost(env, pi) < init[i]


# ---------------------------------------------------------------------------- resume
def _tiny(tmp_path, name: str):
    envs = _conditions(2, 1, 6, [1.0, 1.5], seed=3)
    torch.manual_seed(5)
    pi = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))  # float32
    cfg = GPSConfig(iterations=4, samples=6, eval_samples=3, init_noise=0.1, pi_epochs=5, pi_batch_size=4,
                    prior="gmm", prior_components=2, prior_iterations=2, cost_model="fit", seed=11, progress=False)
    return envs, pi, cfg, tmp_path / name


def _same_module(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_after_kill_is_bitwise_identical(tmp_path, monkeypatch) -> None:
    envs, pi_ref, cfg, out = _tiny(tmp_path, "ref")
    ref = MultiConditionGPSTrainer(envs, pi_ref, cfg, out)
    ref_logs = ref.train()

    envs, pi_a, cfg, out_a = _tiny(tmp_path, "a")
    tr = MultiConditionGPSTrainer(envs, pi_a, cfg, out_a)
    real = ConditionSetting.fit_pi
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # killed inside iteration 2, after its ψ-steps
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(ConditionSetting, "fit_pi", dying)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    monkeypatch.setattr(ConditionSetting, "fit_pi", real)
    assert len((out_a / LOG_NAME).read_text().splitlines()) == 2
    envs_b, pi_b, _, _ = _tiny(tmp_path, "unused")
    resumed = MultiConditionGPSTrainer.resume(out_a, envs_b, pi_b)
    assert resumed.iteration == 2
    logs = resumed.train()
    assert _strip(logs) == _strip(ref_logs)
    assert _same_module(pi_b, pi_ref)
    for a, b in zip(resumed.conditions, ref.conditions, strict=True):
        for x, y in ((a.psi.K, b.psi.K), (a.psi.k, b.psi.k), (a.psi.cov, b.psi.cov), (a.lam, b.lam), (a.nu, b.nu)):
            assert torch.equal(x, y)
        assert (a.epsilon, a.eta) == (b.epsilon, b.eta)
    assert torch.equal(resumed.pi_cov, ref.pi_cov)


def test_resume_checks_compatibility(tmp_path) -> None:
    envs, pi, cfg, out = _tiny(tmp_path, "run")
    MultiConditionGPSTrainer(envs, pi, cfg, out).train(stop_after=1)
    with pytest.raises(FileExistsError, match="resume"):
        MultiConditionGPSTrainer(envs, pi, cfg, out)
    with pytest.raises(CheckpointError, match="conditions"):
        MultiConditionGPSTrainer.resume(out, envs[:1], pi)
    with pytest.raises(CheckpointError, match="policy module"):
        MultiConditionGPSTrainer.resume(out, envs, torch.nn.Linear(2, 1))
    tr = MultiConditionGPSTrainer.resume(out, envs, pi, iterations=2)
    assert len(tr.train()) == 2
    (out / CHECKPOINT_NAME).write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        MultiConditionGPSTrainer.resume(out, envs, pi)


def test_rejects_mismatched_conditions(tmp_path) -> None:
    a = LinearQuadraticEnv.random(2, 1, 6, seed=0)
    b = LinearQuadraticEnv.random(3, 1, 6, seed=0)
    with pytest.raises(ValueError, match="same"):
        MultiConditionGPSTrainer([a, b], torch.nn.Linear(2, 1), GPSConfig(progress=False), tmp_path)
    with pytest.raises(ValueError, match="one initial"):
        MultiConditionGPSTrainer([a, a], torch.nn.Linear(2, 1), GPSConfig(progress=False), tmp_path,
                                 initial_psi=[a.lqr_policy()])
