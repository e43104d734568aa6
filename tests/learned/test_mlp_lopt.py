"""mlp-lopt: θ₀ is AdaGrad, the torch.optim front end's contract, checkpoints, registry and
make_optimizer, and agreement of the vmapped policy with the front end."""

from __future__ import annotations

import io
import math

import pytest
import torch

import l2o
from l2o.baselines.registry import optimizer_names, parse_optimizer
from l2o.checkpoint import CheckpointError
from l2o.experiments.runner import run_optimizer
from l2o.learned.mlp_lopt import (
    DEFAULT_CHECKPOINT,
    STATE_KEYS,
    THETA_KEYS,
    MLPLOpt,
    MLPLOptArch,
    flat_to_theta,
    init_state,
    init_theta,
    load_policy,
    policy_step,
    save_policy,
    theta_to_flat,
)
from tests.conftest import tiny_mlp_task


def random_theta(arch: MLPLOptArch = MLPLOptArch(), seed: int = 1, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A θ whose every part is active (non-zero MLP output, mixed directions, a schedule)."""
    g = torch.Generator().manual_seed(seed)
    th = init_theta(arch, seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in th.items()}


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g, dtype=dtype).requires_grad_(), torch.randn(7, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(3, 7, generator=g, dtype=dtype).requires_grad_()]


def _loss(ps: list[torch.Tensor], step: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 5, generator=g, dtype=ps[0].dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    h = torch.tanh(x @ ps[0].T + ps[1])
    return scale * torch.nn.functional.cross_entropy(h @ ps[2].T, y)


def _run(opt: torch.optim.Optimizer, ps: list[torch.Tensor], steps: int, start: int = 0, scale: float = 1.0) -> None:
    for t in range(start, start + steps):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = _loss(ps, t, scale)
            loss.backward()
            return loss
        opt.step(closure)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_initial_theta_reproduces_tuned_adagrad(dtype: torch.dtype, tol: float) -> None:
    a, b = _model(dtype=dtype), _model(dtype=dtype)
    _run(MLPLOpt(a, theta=init_theta()), a, 60)
    _run(torch.optim.Adagrad(b, lr=0.1, eps=1e-10), b, 60)
    moved = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a, _model(dtype=dtype)))
    assert moved > 0.1  # the runs went somewhere
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def test_a_different_theta_is_not_adagrad() -> None:
    a, b = _model(), _model()
    _run(MLPLOpt(a, theta=random_theta()), a, 20)
    _run(torch.optim.Adagrad(b, lr=0.1, eps=1e-10), b, 20)
    assert max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a, b)) > 1e-2


def test_harness_run_of_theta0_matches_adagrad(tmp_path) -> None:
    task = tiny_mlp_task()
    path = save_policy(tmp_path / "t0.safetensors", init_theta(), MLPLOptArch())
    r1 = run_optimizer(task, parse_optimizer(f"mlp-lopt:checkpoint={path}"), seed=3, iterations=30)
    r2 = run_optimizer(task, parse_optimizer("adagrad:lr=0.1,eps=1e-10"), seed=3, iterations=30)
    for u, v in zip(r1.true_loss, r2.true_loss):
        assert math.isclose(u, v, rel_tol=1e-5, abs_tol=1e-6)


def test_state_dict_round_trip_is_exact() -> None:
    th = random_theta()
    a, b = _model(), _model()
    oa = MLPLOpt(a, theta=th)
    _run(oa, a, 7)
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)  # through bytes, as a checkpoint would
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    with torch.no_grad():
        for p, q in zip(b, a):
            p.copy_(q)
    ob = MLPLOpt(b, theta=th)
    ob.load_state_dict(sd)
    _run(oa, a, 9, start=7)
    _run(ob, b, 9, start=7)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert ob.state[b[0]]["step"] == 16 and set(STATE_KEYS) <= set(ob.state[b[0]])


def test_nan_gradient_raises_before_any_parameter_moves() -> None:
    ps = _model()
    opt = MLPLOpt(ps, theta=random_theta())
    _run(opt, ps, 3)
    before = [p.detach().clone() for p in ps]
    state_before = {k: opt.state[ps[0]][k].clone() for k in STATE_KEYS}
    for bad in (float("nan"), float("inf")):
        for p in ps:
            p.grad = torch.ones_like(p)
        ps[2].grad[0, 0] = bad
        with pytest.raises(FloatingPointError):
            opt.step()
        for p, q in zip(ps, before):
            assert torch.equal(p, q)
        for k in STATE_KEYS:
            assert torch.equal(opt.state[ps[0]][k], state_before[k])


def test_parameters_without_grad_are_skipped_and_losses_may_be_zero_or_negative() -> None:
    ps = _model()
    opt = MLPLOpt(ps, theta=random_theta())
    frozen = ps[1].detach().clone()
    for value in (0.0, -5.0, 3.0):
        opt.zero_grad(set_to_none=True)
        loss = value + (ps[0] - ps[0].detach()).sum() + (ps[2] - ps[2].detach()).sum()  # value exactly, grads 1
        loss.backward()
        assert float(opt.step(lambda loss=loss: loss).detach()) == value
    assert torch.equal(ps[1], frozen) and ps[1] not in opt.state
    assert opt.state[ps[0]]["step"] == 3


def test_nearly_invariant_to_scaling_the_loss() -> None:
    # Scaling f by c > 0 scales g by c; every feature is a ratio of g-statistics, so only the ε's
    # (1e-10, 1e-8) break invariance: over four decades of scale the iterates agree to 1e-3 after
    # 25 steps (SGD's would differ by the factor c itself).
    th = random_theta()
    runs = []
    for scale in (0.1, 1.0, 1e3):  # p: c = 0.1, q: c = 1, r: c = 1000
        ps = _model(dtype=torch.float64)
        _run(MLPLOpt(ps, theta=th), ps, 25, scale=scale)
        runs.append(ps)
    for p, q, r in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(r, q, rtol=1e-3, atol=1e-3)


def test_policy_step_under_vmap_equals_one_member_at_a_time() -> None:
    arch = MLPLOptArch(hidden=8)
    thetas = torch.stack([theta_to_flat(random_theta(arch, seed=s)) for s in range(3)])
    g = torch.randn(3, 11)
    st = {k: torch.rand(3, 11) for k in STATE_KEYS}
    t = torch.tensor([1.0, 5.0, 300.0])
    fn = torch.func.vmap(lambda th, s, gg, tt: policy_step(flat_to_theta(th, arch), s, gg, tt, arch))
    d, new = fn(thetas, st, g, t)
    for m in range(3):
        dm, nm = policy_step(flat_to_theta(thetas[m], arch), {k: v[m] for k, v in st.items()}, g[m], t[m], arch)
        torch.testing.assert_close(d[m], dm)
        for k in STATE_KEYS:
            torch.testing.assert_close(new[k][m], nm[k])


def test_zero_gradient_coordinates_stay_finite() -> None:
    arch = MLPLOptArch()
    g = torch.zeros(5)
    d, new = policy_step(random_theta(arch), init_state(g), g, torch.tensor(1.0), arch)
    assert torch.isfinite(d).all()


def test_policy_checkpoint_round_trip_and_corruption(tmp_path) -> None:
    arch = MLPLOptArch(hidden=12, base_lr=0.05, mlp_scale=0.02)
    th = random_theta(arch)
    path = save_policy(tmp_path / "p.safetensors", th, arch, {"note": "test"})
    th2, arch2, meta = load_policy(path)
    assert arch2 == arch and meta["info"]["note"] == "test"
    for k in THETA_KEYS:
        assert torch.equal(th[k], th2[k])
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        load_policy(bad)
    with pytest.raises(ValueError):
        save_policy(tmp_path / "x.safetensors", random_theta(MLPLOptArch(hidden=4)), arch)
    with pytest.raises(ValueError):
        MLPLOptArch(hidden=64)


def test_registry_packaged_weights_and_make_optimizer(tmp_path) -> None:
    assert "mlp-lopt" in optimizer_names(learned=True)
    assert DEFAULT_CHECKPOINT.is_file()
    m = torch.nn.Linear(4, 3)
    opt = l2o.make_optimizer("mlp-lopt", m.parameters())
    assert isinstance(opt, MLPLOpt) and opt.checkpoint == str(DEFAULT_CHECKPOINT)
    path = save_policy(tmp_path / "p.safetensors", random_theta(), MLPLOptArch())
    assert l2o.make_optimizer(f"mlp-lopt:checkpoint={path}", m.parameters()).checkpoint == str(path)
    adam = l2o.make_optimizer("adam:lr=0.01", m.parameters())
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 0.01
    ada = l2o.make_optimizer("adagrad", m.parameters())  # bare name: the tuned settings
    assert isinstance(ada, torch.optim.Adagrad) and ada.defaults["lr"] == 0.1
    with pytest.raises(ValueError):
        l2o.make_optimizer("no-such-optimizer", m.parameters())


def test_chunked_front_end_path_equals_the_pure_policy() -> None:
    arch = MLPLOptArch(hidden=8)
    th = random_theta(arch)
    g = torch.randn(1000, dtype=torch.float64)
    st = {k: torch.rand(1000, dtype=torch.float64) for k in STATE_KEYS}
    t = torch.tensor(7.0, dtype=torch.float64)
    th64 = {k: v.double() for k, v in th.items()}
    d_pure, new_pure = policy_step(th64, st, g, t, arch)
    d_chunk, new_chunk = policy_step(th64, st, g, t, arch, chunk=96)
    torch.testing.assert_close(d_chunk, d_pure, rtol=1e-12, atol=1e-14)
    for k in STATE_KEYS:
        assert torch.equal(new_chunk[k], new_pure[k])
    from l2o.learned.mlp_lopt import policy_step_, step_constants

    st_in = {k: v.clone() for k, v in st.items()}
    scratch = {"phi": torch.empty(8, 1000, dtype=torch.float64), "a": torch.empty(1000, dtype=torch.float64),
               "b": torch.empty(1000, dtype=torch.float64), "mlp": torch.empty(1000, dtype=torch.float64)}
    d_in = policy_step_(th64, st_in, g, step_constants(t), arch, scratch, chunk=96)
    torch.testing.assert_close(d_in, d_pure, rtol=1e-12, atol=1e-14)
    for k in STATE_KEYS:
        assert torch.equal(st_in[k], new_pure[k])


def test_packaged_weights_are_the_documented_pes_run() -> None:
    import hashlib
    import json

    desc = json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())
    assert desc["sha256"] == hashlib.sha256(DEFAULT_CHECKPOINT.read_bytes()).hexdigest()
    theta, arch, meta = load_policy(DEFAULT_CHECKPOINT)
    assert arch.hidden <= 32 and meta["info"]["outer_steps"] == desc["info"]["outer_steps"]
    # meta-trained: not the AdaGrad-equivalent θ₀ any more
    assert not torch.equal(theta_to_flat(theta), theta_to_flat(init_theta(arch)))


def test_a_non_finite_step_raises_before_any_parameter_moves() -> None:
    ps = _model()
    th = random_theta()
    th["b2"] = torch.tensor([float("inf"), 0.0])  # δ = inf for every coordinate
    opt = MLPLOpt(ps, theta=th)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(FloatingPointError):
        _run(opt, ps, 1)
    for p, q in zip(ps, before):
        assert torch.equal(p, q)


def test_unrolled_policy_equals_the_matmul_policy() -> None:
    """The scalar-arithmetic form that torch.compile fuses computes the same Δx and state."""
    arch = MLPLOptArch(hidden=8)
    th64 = {k: v.double() for k, v in random_theta(arch).items()}
    g = torch.randn(500, dtype=torch.float64)
    st = {k: torch.rand(500, dtype=torch.float64) for k in STATE_KEYS}
    t = torch.tensor(3.0, dtype=torch.float64)
    d, new = policy_step(th64, st, g, t, arch)
    d_u, new_u = policy_step(th64, st, g, t, arch, unrolled=True)
    torch.testing.assert_close(d_u, d, rtol=1e-12, atol=1e-15)
    for k in STATE_KEYS:
        assert torch.equal(new_u[k], new[k])


def _assert_same_run(opt_a: MLPLOpt, ps_a: list[torch.Tensor], opt_b: MLPLOpt, ps_b: list[torch.Tensor],
                     rtol: float, atol: float) -> None:
    """Parameters equal to (rtol, atol) and every accumulator to (rtol, 1e-12)."""
    for a, b in zip(ps_a, ps_b):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        for k in STATE_KEYS:
            torch.testing.assert_close(opt_a.state[a][k], opt_b.state[b][k], rtol=rtol, atol=1e-12)


def test_compiled_steps_equal_eager_steps() -> None:
    """compile=True: five steps of a three-tensor model through torch.compile's fused step give the
    eager optimizer's parameters and state up to float32 rounding (and it really ran compiled)."""
    import warnings

    ps_e, ps_c = _model(3), _model(3)
    th = random_theta(MLPLOptArch())
    eager, comp = MLPLOpt(ps_e, theta=th, compile=False), MLPLOpt(ps_c, theta=th, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would fail here
        _run(comp, ps_c, 5)
    _run(eager, ps_e, 5)
    assert comp.compile is True
    _assert_same_run(comp, ps_c, eager, ps_e, rtol=1e-5, atol=1e-6)
    assert [l2o.make_optimizer(f"mlp-lopt{o}", _model()).compile for o in ("", ":compile=on", ":compile=off")] == [
        "auto", True, False]
    with pytest.raises(ValueError, match="compile must be one of"):
        l2o.make_optimizer("mlp-lopt:compile=1", _model())
    with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
        MLPLOpt(_model(), compile="yes")


def test_compile_failure_falls_back_to_eager_steps_with_a_warning(monkeypatch) -> None:
    """Where torch.compile cannot compile (no C++ compiler, ...), the step is the eager one and
    the user is told once; the state is not touched by the failed attempt."""
    import torch._dynamo

    import l2o.learned.mlp_lopt as M

    def broken(*args: object) -> None:
        raise torch._dynamo.exc.TorchDynamoException("InvalidCxxCompiler: no working C++ compiler")

    for failing in (0, 1):  # the first pass fails (nothing touched), or the second (run eagerly)
        passes = [M._update_and_mean_squares_, M._step_from_state]
        passes[failing] = broken
        monkeypatch.setattr(M, "compiled_passes", lambda passes=tuple(passes): passes)
        ps_e, ps_c = _model(4), _model(4)
        eager, comp = MLPLOpt(ps_e, compile=False), MLPLOpt(ps_c, compile=True)
        with pytest.warns(RuntimeWarning, match="torch.compile failed .*InvalidCxxCompiler"):
            _run(comp, ps_c, 3)
        _run(eager, ps_e, 3)
        assert comp.compile is False
        _assert_same_run(comp, ps_c, eager, ps_e, rtol=1e-6, atol=1e-7)


def test_auto_compiles_only_large_tensors(monkeypatch) -> None:
    """compile="auto" (the default) sends a tensor through the compiled passes only from
    COMPILE_MIN coordinates on: here the threshold is lowered to 30, so the 7×5 weight compiles and
    the 7 and 3×7 tensors do not."""
    import l2o.learned.mlp_lopt as M

    seen = []

    def spy(theta, flat, g, consts):
        seen.append(g.numel())
        return None  # then the eager step runs

    monkeypatch.setattr(M, "COMPILE_MIN", 30)
    ps = _model(5)
    opt = MLPLOpt(ps)
    monkeypatch.setattr(opt, "_compiled_step", spy)
    _run(opt, ps, 2)
    assert seen == [35, 35]


# ---------------------------------------------------------------- the signal-to-noise term (snr)


def test_snr_with_zero_coefficient_is_the_same_optimizer_bit_for_bit() -> None:
    """with_snr appends c₄ = 0: every step of the snr architecture equals the original's exactly."""
    from l2o.learned.mlp_lopt import with_snr

    th = random_theta(MLPLOptArch())
    th_s, arch_s = with_snr(th, MLPLOptArch())
    assert arch_s.snr and th_s["c"].shape == (5,) and th_s["c"][-1] == 0 and th["c"].shape == (4,)
    ps_a, ps_b = _model(4), _model(4)
    _run(MLPLOpt(ps_a, theta=th, compile=False), ps_a, 12)
    _run(MLPLOpt(ps_b, theta=th_s, arch=arch_s, compile=False), ps_b, 12)
    for a, b in zip(ps_a, ps_b):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="already has the snr term"):
        with_snr(th_s, arch_s)


def test_snr_step_size_is_the_closed_form_signal_to_noise_ratio() -> None:
    """The step size the policy uses equals α₀·exp(c₀ + c₁:₄·τ + c₄·log ρ) with ρ computed directly
    from bias-corrected moments, mean_j (m̂^0.99_j / (√v̂^0.999_j + ε₂))²; checked through Δx with u = e₁
    and the MLP off (Δx = −step·AdaGrad direction). A wrong ρ row or a sign flip of c₄ fails."""
    from l2o.learned.mlp_lopt import N_TIME, time_features

    arch = MLPLOptArch(hidden=4, snr=True)
    th = init_theta(arch)
    th["c"] = torch.tensor([0.2, -0.3, 0.1, 0.05, 0.7])
    th = {k: v.double() for k, v in th.items()}
    g_seq = torch.randn(9, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.3
    st = init_state(g_seq[0])
    for t, g in enumerate(g_seq, start=1):
        d, st = policy_step(th, st, g, torch.tensor(float(t), dtype=torch.float64), arch)
    t = len(g_seq)
    m = sum(0.01 * 0.99 ** (t - i) * g_seq[i - 1] for i in range(1, t + 1)) / (1 - 0.99 ** t)
    v = sum(0.001 * 0.999 ** (t - i) * g_seq[i - 1] ** 2 for i in range(1, t + 1)) / (1 - 0.999 ** t)
    rho = ((m / (v.sqrt() + 1e-8)) ** 2).mean()
    tau = time_features(torch.tensor(float(t), dtype=torch.float64))
    step = 0.1 * torch.exp(th["c"][0] + (th["c"][1:1 + N_TIME] * tau).sum() + th["c"][-1] * torch.log(rho))
    adagrad_dir = g_seq[-1] / ((g_seq ** 2).sum(0).sqrt() + 1e-10)
    torch.testing.assert_close(d, -step * adagrad_dir, rtol=1e-9, atol=1e-12)
    assert 0 < rho < 1


def test_snr_shrinks_the_step_under_gradient_noise_and_is_scale_free() -> None:
    """ρ ≈ 1 for a clean constant gradient and ≈ 1/199 for pure noise, so with c₄ > 0 the step is
    much smaller under noise; multiplying the gradients by 1000 leaves it unchanged."""
    arch = MLPLOptArch(hidden=4, snr=True)
    th = init_theta(arch)
    th["c"][-1] = 0.5
    gen = torch.Generator().manual_seed(0)
    clean = torch.full((300, 400), 0.01, dtype=torch.float64)
    noisy = torch.randn(300, 400, dtype=torch.float64, generator=gen)
    th = {k: v.double() for k, v in th.items()}

    def last_step_size(gs):
        st = init_state(gs[0])
        for t, g in enumerate(gs, start=1):
            d, st = policy_step(th, st, g, torch.tensor(float(t), dtype=torch.float64), arch)
        return (d.abs() / (gs[-1].abs() / (gs ** 2).sum(0).sqrt())).median()  # Δx / AdaGrad direction

    s_clean, s_noisy = last_step_size(clean), last_step_size(noisy)
    assert s_clean == pytest.approx(0.1, rel=1e-3)          # ρ = 1: log ρ = 0
    assert s_noisy < 0.35 * s_clean                           # ρ ≈ 1/199·(1 + decay effects): ≈ exp(-0.5·4.8)
    assert last_step_size(noisy * 1000) == pytest.approx(s_noisy.item(), rel=1e-6)


def test_snr_checkpoints_round_trip_and_old_files_load_without_it(tmp_path) -> None:
    arch = MLPLOptArch(hidden=6, snr=True)
    th = random_theta(arch)
    th2, arch2, _ = load_policy(save_policy(tmp_path / "s.safetensors", th, arch))
    assert arch2 == arch and torch.equal(th2["c"], th["c"])
    _, old_arch, _ = load_policy(DEFAULT_CHECKPOINT)  # written before the field existed
    assert old_arch.snr is False
    with pytest.raises(ValueError, match="snr must be"):
        MLPLOptArch(snr=1)
    from l2o.learned.mlp_lopt import inputs, policy_from_inputs

    x = inputs({k: torch.rand(5) for k in STATE_KEYS}, torch.randn(5), torch.tensor(3.0))
    with pytest.raises(ValueError, match="Convolutional GPS"):
        policy_from_inputs(th, x, arch)
