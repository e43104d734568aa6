"""The GPS/BADMM training loop on LinearQuadraticEnv: convergence to the LQR optimum, exact resume,
config validation, divergent samples and clear failures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from l2o.checkpoint import CheckpointError
from l2o.outer.gps import (
    GPSConfig,
    GPSIterationError,
    GPSTrainer,
    LinearGaussianPolicy,
    LinearQuadraticEnv,
    ModuleController,
    QuadraticCost,
    Trajectories,
)
from l2o.outer.gps.trainer import CHECKPOINT_NAME, LOG_NAME, ConditionSetting

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _exact_pi_cost(env: LinearQuadraticEnv, pi: torch.nn.Linear) -> float:
    return env.expected_cost(pi.weight.detach().to(DT), pi.bias.detach().to(DT))


# ---------------------------------------------------------------------------- environment
def test_lq_env_rollout_matches_exact_expected_cost() -> None:
    env = LinearQuadraticEnv.random(3, 1, 10, seed=0, radius=1.1)
    lqr = env.lqr_policy()
    g = torch.Generator().manual_seed(0)
    pol = LinearGaussianPolicy(lqr.K, lqr.k, 0.2 * torch.eye(1, dtype=DT).expand(10, 1, 1))
    traj = env.rollout(pol, 4000, g)
    assert traj.states.shape == (4000, 10, 3) and traj.costs.shape == (4000, 10) and traj.n_diverged == 0
    exact = env.expected_cost(pol.K, pol.k, pol.cov)
    mc = traj.total_costs()
    assert abs(float(mc.mean()) - exact) < 4 * float(mc.std()) / math.sqrt(4000)


def test_lq_env_lqr_is_optimal() -> None:
    env = LinearQuadraticEnv.random(3, 2, 12, seed=1, radius=1.2)
    lqr = env.lqr_policy()
    best = env.optimal_cost()
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        dK = 0.05 * torch.randn(lqr.K.shape, dtype=DT, generator=g)
        dk = 0.05 * torch.randn(lqr.k.shape, dtype=DT, generator=g)
        assert env.expected_cost(lqr.K + dK, lqr.k + dk) > best


def test_trajectories_mark_non_finite_invalid() -> None:
    S = torch.zeros(3, 4, 2, dtype=DT)
    S[1, 2, 0] = math.inf
    U, C = torch.zeros(3, 4, 1, dtype=DT), torch.zeros(3, 4, dtype=DT)
    C[2, 3] = math.nan
    traj = Trajectories(S, S, U, C)
    assert traj.valid.tolist() == [True, False, False] and traj.n_diverged == 2
    assert traj.valid_only().n == 1


# ---------------------------------------------------------------------------- convergence
@pytest.mark.parametrize(
    "D, d, seed, radius, overrides",
    [
        (4, 2, 1, 1.1, {}),  # exact cost derivatives, Gaussian dynamics prior
        (2, 1, 1, 1.1, {"cost_model": "fit", "prior": "gmm"}),  # fitted cost, GMM prior
    ],
)
def test_badmm_converges_to_lqr_optimum(tmp_path, D: int, d: int, seed: int, radius: float, overrides: dict) -> None:
    """~10 GPS iterations: π (a linear torch module on the state) converges onto ψ, its true cost
    falls and ends within 1% of the finite-horizon LQR optimum (a stationary π cannot represent
    the time-varying optimal gains exactly; the best stationary gain is within 0.1% of it here)."""
    T = 15
    env = LinearQuadraticEnv.random(D, d, T, seed=seed, radius=radius)
    torch.manual_seed(0)
    pi = torch.nn.Linear(D, d).double()
    cost_init = _exact_pi_cost(env, pi)
    cfg = GPSConfig(iterations=10, samples=20, eval_samples=20, init_noise=0.1, pi_epochs=100, pi_lr=0.05,
                    progress=False, **overrides)
    logs = GPSTrainer(env, pi, cfg, tmp_path).train()
    assert len(logs) == 10
    optimum = env.optimal_cost()
    cost_final = _exact_pi_cost(env, pi)
    # π's mean action converges onto ψ's along ψ's states (after each π-step)
    assert logs[-1]["pi_mse"] < logs[0]["pi_mse"] / 30
    assert logs[-1]["pi_mse_before"] < logs[0]["pi_mse_before"] / 100
    # the logged (sampled, common-random-number) cost of π decreases, as does the exact one
    assert logs[-1]["pi_cost"] < logs[0]["pi_cost"]
    assert cost_final < cost_init
    assert cost_final < optimum * 1.01
    # ψ and π agree in distribution at the end, and the log file holds the records
    assert logs[-1]["kl_psi_pi"] < logs[0]["kl_psi_pi"] / 5
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert [json.loads(x) for x in lines] == logs
    assert all(r["n_diverged"] == 0 for r in logs)


# ---------------------------------------------------------------------------- resume
def _tiny(tmp_path, name: str, **kw):
    env = LinearQuadraticEnv.random(2, 1, 6, seed=3, radius=1.1)
    torch.manual_seed(5)
    pi = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))  # float32
    cfg = GPSConfig(iterations=4, samples=6, eval_samples=3, init_noise=0.1, pi_epochs=5, pi_batch_size=2,
                    prior="gmm", prior_components=2, prior_iterations=2, cost_model="fit", seed=11,
                    progress=False, **kw)
    return env, pi, cfg, tmp_path / name


def _same_module(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


TIMING = ("wall_s", "lqg_s")


def _strip(logs: list[dict]) -> list[dict]:
    """Records without their measured wall times (everything else must be identical)."""
    out = []
    for r in logs:
        r = {k: v for k, v in r.items() if k not in TIMING}
        r["per_condition"] = [{k: v for k, v in p.items() if k not in TIMING} for p in r["per_condition"]]
        out.append(r)
    return out


def _strip_text(text: str) -> list[dict]:
    return _strip([json.loads(line) for line in text.splitlines()])


def test_resume_is_bitwise_identical(tmp_path) -> None:
    env, pi_ref, cfg, out = _tiny(tmp_path, "ref")
    ref_logs = GPSTrainer(env, pi_ref, cfg, out).train()
    ref_text = (out / LOG_NAME).read_text()

    env, pi_a, cfg, out_a = _tiny(tmp_path, "a")
    first = GPSTrainer(env, pi_a, cfg, out_a).train(stop_after=2)
    assert len(first) == 2
    env, pi_b, _, _ = _tiny(tmp_path, "unused")  # a fresh module, weights overwritten by resume
    tr = GPSTrainer.resume(out_a, env, pi_b)
    assert tr.iteration == 2
    logs = tr.train()
    assert _strip(logs) == _strip(ref_logs)
    assert _strip_text((out_a / LOG_NAME).read_text()) == _strip_text(ref_text)
    assert _same_module(pi_b, pi_ref)
    assert torch.equal(tr.psi.K, GPSTrainer.resume(out, env, _tiny(tmp_path, "u")[1]).psi.K)


def test_resume_after_kill_mid_iteration(tmp_path, monkeypatch) -> None:
    """Killed inside iteration 3 (after its log-worthy work began): the last checkpoint is after
    iteration 2; resuming re-runs iteration 3 from there and matches the uninterrupted run."""
    env, pi_ref, cfg, out = _tiny(tmp_path, "ref")
    ref_logs = GPSTrainer(env, pi_ref, cfg, out).train()

    env, pi_a, cfg, out_a = _tiny(tmp_path, "a")
    tr = GPSTrainer(env, pi_a, cfg, out_a)
    real = ConditionSetting.fit_pi
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(ConditionSetting, "fit_pi", dying)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    monkeypatch.setattr(ConditionSetting, "fit_pi", real)
    assert len((out_a / LOG_NAME).read_text().splitlines()) == 2
    env, pi_b, _, _ = _tiny(tmp_path, "unused")
    logs = GPSTrainer.resume(out_a, env, pi_b).train()
    assert _strip(logs) == _strip(ref_logs)
    assert _same_module(pi_b, pi_ref)


def test_resume_can_extend_and_checks_compatibility(tmp_path) -> None:
    env, pi, cfg, out = _tiny(tmp_path, "run")
    GPSTrainer(env, pi, cfg, out).train(stop_after=1)
    with pytest.raises(FileExistsError, match="resume"):
        GPSTrainer(env, pi, cfg, out)
    tr = GPSTrainer.resume(out, env, pi, iterations=2)
    assert tr.config.iterations == 2 and len(tr.train()) == 2
    with pytest.raises(CheckpointError, match="T, D, d"):
        GPSTrainer.resume(out, LinearQuadraticEnv.random(3, 1, 6, seed=0), torch.nn.Linear(3, 1))
    with pytest.raises(CheckpointError, match="policy module"):
        GPSTrainer.resume(out, env, torch.nn.Linear(2, 1))
    (out / CHECKPOINT_NAME).write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        GPSTrainer.resume(out, env, pi)


# ---------------------------------------------------------------------------- config
def test_config_rejects_unknown_keys_and_bad_values() -> None:
    assert GPSConfig.from_dict({"iterations": 3, "samples": 5}).samples == 5
    with pytest.raises(ValueError, match="epsilonn"):
        GPSConfig.from_dict({"epsilonn": 0.1})
    bad = [
        {"samples": 1},
        {"iterations": 2.5},
        {"epsilon": 5.0},  # above epsilon_max
        {"nu": 0.0},
        {"nu_increase": 0.5},
        {"alpha": -1.0},
        {"prior": "wishart"},
        {"cost_model": "magic"},
        {"pi_lr": float("nan")},
        {"min_valid": 50},
        {"init_noise": 0},
        {"cost_action_floor": -1.0},
    ]
    for b in bad:
        with pytest.raises(ValueError):
            GPSConfig.from_dict(b)
    cfg = GPSConfig(seed=4)
    assert GPSConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------- failures
class _DivergingEnv(LinearQuadraticEnv):
    """Every rollout's first trajectory (or all of them) blows up to inf at t = 3."""

    def __init__(self, *a, all_bad: bool = False, **k) -> None:
        super().__init__(*a, **k)
        self.all_bad = all_bad

    def rollout(self, controller, n, generator):
        tr = super().rollout(controller, n, generator)
        S = tr.states.clone()
        if self.all_bad:
            S[:, 3:] = math.inf
        else:
            S[0, 3:] = math.inf
        return Trajectories(S, S.clone(), tr.actions, tr.costs)


def _lq_args():
    base = LinearQuadraticEnv.random(2, 1, 6, seed=0, radius=1.1)
    return dict(A=base.A, B=base.B, Q=base.Q, R=base.R, horizon=6, noise_cov=base.F,
                init_mean=base.mu0, init_cov=base.sigma0)


def test_diverging_sample_is_dropped_and_counted(tmp_path) -> None:
    env = _DivergingEnv(**_lq_args())
    pi = torch.nn.Linear(2, 1).double()
    cfg = GPSConfig(iterations=2, samples=8, eval_samples=4, init_noise=0.1, pi_epochs=3, progress=False)
    logs = GPSTrainer(env, pi, cfg, tmp_path).train()
    for r in logs:
        assert r["n_diverged"] == 1 and r["n_valid"] == 7 and r["pi_eval_diverged"] == 1
        assert all(v is None or math.isfinite(v) for v in r.values() if isinstance(v, float))
        assert math.isfinite(r["psi_cost"]) and math.isfinite(r["pi_cost"])


def test_all_diverged_is_a_clear_error(tmp_path) -> None:
    env = _DivergingEnv(**_lq_args(), all_bad=True)
    cfg = GPSConfig(iterations=1, samples=4, progress=False)
    with pytest.raises(GPSIterationError, match=r"iteration 0, sampling.*0 of 4"):
        GPSTrainer(env, torch.nn.Linear(2, 1), cfg, tmp_path).train()


class _BadCostEnv(LinearQuadraticEnv):
    """A cost model whose action block is hugely negative at t = 4: no η makes Q_uu PD there."""

    def local_cost(self, trajectories=None) -> QuadraticCost:
        c = super().local_cost(trajectories)
        C = c.C.clone()
        C[4, -1, -1] = -1e30
        return QuadraticCost(C, c.d, c.h, c.dim_s)


def test_lqg_failure_names_iteration_and_t(tmp_path) -> None:
    env = _BadCostEnv(**_lq_args())
    cfg = GPSConfig(iterations=1, samples=6, progress=False)
    with pytest.raises(GPSIterationError, match=r"iteration 0, ψ-step \(LQG\), t=4") as info:
        GPSTrainer(env, torch.nn.Linear(2, 1), cfg, tmp_path).train()
    assert info.value.iteration == 0 and info.value.t == 4


def test_module_controller_noise_and_recurrent_hook() -> None:
    class Rec(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1, dtype=DT))

        def forward(self, o):  # pragma: no cover - the step hook is used instead
            raise AssertionError

        def step(self, o, h):
            h = torch.zeros(o.shape[0], 1, dtype=DT) if h is None else h + 1
            return h * self.w, h

    env = LinearQuadraticEnv.random(2, 1, 5, seed=0)
    traj = env.rollout(ModuleController(Rec()), 3, torch.Generator().manual_seed(0))
    assert traj.actions[:, :, 0].tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0]] * 3
    with pytest.raises(ValueError):
        ModuleController(Rec(), noise=True)
