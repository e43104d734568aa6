"""Meta-training L2LBGDBGD: exact meta-gradients, learning, bitwise resume, config and CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from l2o.checkpoint import CheckpointError, load_checkpoint
from l2o.outer.meta_l2l import (
    CHECKPOINT_NAME,
    LOG_NAME,
    POLICY_NAME,
    MetaL2LConfig,
    meta_train,
    unroll_meta_loss,
)
from l2o.learned.l2l import NET_KEYS, init_hidden, init_net, load_policy
from l2o.tasks.base import Group, Params, Task


class Quadratic(Task):
    """f(x) = |W x − y|² (the synthetic problem of Andrychowicz et al. 2016, §3.1)."""

    def __init__(self, W: Tensor, y: Tensor, name: str = "quadratic") -> None:
        self.W, self.y, self.name = W, y, name
        self.groups = (Group("x", (W.shape[1],)),)
        self.num_examples, self.batch_size = 1, None

    def init_params(self, seed: int, dtype: torch.dtype = torch.float32) -> Params:
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(self.W.shape[1], generator=g, dtype=torch.float64).to(dtype)}

    def loss(self, params: Mapping[str, Tensor], indices: Tensor | None = None) -> Tensor:
        x = params["x"]
        r = self.W.to(x.dtype) @ x - self.y.to(x.dtype)
        return (r * r).sum()


def quadratic(index: int, n: int = 10, scale: float = 1.0) -> Quadratic:
    g = torch.Generator().manual_seed(7_000 + index)
    W = torch.randn(n, n, generator=g, dtype=torch.float64) * scale / math.sqrt(n)
    return Quadratic(W, torch.randn(n, generator=g, dtype=torch.float64), name=f"quadratic/{index}")


# --- meta-gradients against finite differences ------------------------------------------------


def _setup(second_order: bool):
    task = quadratic(0, n=5, scale=1.5)
    net = {k: v.requires_grad_(True) for k, v in init_net(3, dtype=torch.float64).items()}
    x0 = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(output_scale=0.5, p=10.0, second_order=second_order)
    return task, net, x0, kw


def _meta_loss(net, task, x0, kw, frozen=None) -> float:
    with torch.no_grad():
        net = {k: v.detach() for k, v in net.items()}
    r = unroll_meta_loss(net, task, x0, init_hidden(5, 20, torch.float64), [None] * 4, frozen_grads=frozen, **kw)
    return float(r.meta_loss.detach())


def _directions(net, count: int) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(11)
    dirs = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in net.items()} for _ in range(count)]
    # plus single coordinates of the output layer and of each LSTM layer
    for name, idx in (("W_out", (0, 3)), ("b_out", (0,)), ("W_ih1", (5, 1)), ("W_hh2", (30, 7)), ("b1", (25,))):
        d = {k: torch.zeros_like(v) for k, v in net.items()}
        d[name][idx] = 1.0
        dirs.append(d)
    return dirs


def _fd(net, task, x0, kw, d, eps=1e-6, frozen=None) -> float:
    plus = {k: net[k].detach() + eps * d[k] for k in net}
    minus = {k: net[k].detach() - eps * d[k] for k in net}
    return (_meta_loss(plus, task, x0, kw, frozen) - _meta_loss(minus, task, x0, kw, frozen)) / (2 * eps)


def _autograd(net, task, x0, kw) -> tuple[dict[str, Tensor], list[Tensor]]:
    r = unroll_meta_loss(net, task, x0, init_hidden(5, 20, torch.float64), [None] * 4, **kw)
    grads = torch.autograd.grad(r.meta_loss, [net[k] for k in NET_KEYS])
    return dict(zip(NET_KEYS, grads)), r.grads


def _dot(a, b) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def _close(a: float, b: float, coordinate: bool) -> bool:
    # random directions: FD agrees to ~1e-10 relative; single coordinates have tiny derivatives
    return a == pytest.approx(b, rel=1e-6, abs=1e-9) if coordinate else a == pytest.approx(b, rel=1e-8)


def test_second_order_meta_gradient_matches_finite_differences():
    task, net, x0, kw = _setup(second_order=True)
    grad, _ = _autograd(net, task, x0, kw)
    for i, d in enumerate(_directions(net, 4)):
        assert _close(_dot(grad, d), _fd(net, task, x0, kw, d), coordinate=i >= 4)


def test_first_order_meta_gradient_is_the_exact_gradient_of_the_frozen_gradient_surrogate():
    """Dropping ∂∇f/∂θ = ∇²f: the first-order meta-gradient equals finite differences of L with the
    gradient inputs frozen at their observed values, but not finite differences of L itself.

    The omitted terms are small here (~1e-4 relative) because ρ feeds the LSTM log|g|/p, whose
    derivative 1/(p g) is small for |g| ~ 1, yet they are 10⁴ times the finite-difference error."""
    task, net, x0, kw = _setup(second_order=False)
    grad1, observed = _autograd(net, task, x0, kw)
    for i, d in enumerate(_directions(net, 4)):
        g1 = _dot(grad1, d)
        assert _close(g1, _fd(net, task, x0, kw, d, frozen=observed), coordinate=i >= 4)
        if i < 4:
            full = _fd(net, task, x0, {**kw, "second_order": True}, d)
            assert abs(g1 - full) > 1e-5 * abs(full)


# --- meta-training ----------------------------------------------------------------------------


def test_meta_training_lowers_the_meta_loss_on_random_quadratics(tmp_path):
    """20 episodes cycling through 5 random 10-D quadratics: the last 5 episodes (the same 5
    problems, new x⁽⁰⁾) have well under the meta-loss of the first 5."""
    cfg = MetaL2LConfig(task="quadratic-family", horizon=40, unroll=10, episodes=20, meta_lr=0.03, seed=0)
    res = meta_train(cfg, tmp_path, progress=False, task_sampler=lambda e: quadratic(e % 5))
    losses = [r["meta_loss"] for r in res.log]
    assert len(losses) == 20 and all(v is not None for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def _tiny_config(**kw) -> MetaL2LConfig:
    return MetaL2LConfig(**{"task": "quadratic-family", "horizon": 20, "unroll": 5, "episodes": 6,
                            "meta_lr": 0.01, "seed": 3, **kw})


def _sampler(e: int) -> Quadratic:
    return quadratic(e, n=6)


def test_resume_after_interruption_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    cfg = _tiny_config()
    full = meta_train(cfg, tmp_path / "full", progress=False, task_sampler=_sampler)
    part = meta_train(cfg, tmp_path / "part", progress=False, task_sampler=_sampler, stop_after=2)
    assert len(part.log) == 2
    with pytest.raises(ValueError, match="resume"):  # an existing run is never silently overwritten
        meta_train(cfg, tmp_path / "part", progress=False, task_sampler=_sampler)
    resumed = meta_train(cfg, tmp_path / "part", progress=False, task_sampler=_sampler, resume=True)
    assert len(resumed.log) == 6
    for k in NET_KEYS:
        assert torch.equal(full.net[k], resumed.net[k]), k
    ta, ma = load_checkpoint(full.checkpoint)
    tb, mb = load_checkpoint(resumed.checkpoint)
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)  # Adam state and RNGs too
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in ma["log"]]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in mb["log"]]
    lines = [json.loads(s) for s in (tmp_path / "part" / LOG_NAME).read_text().splitlines()]
    assert [r["episode"] for r in lines] == list(range(6))
    # the exported weights are the trained ones
    net, meta = load_policy(tmp_path / "part" / POLICY_NAME)
    assert all(torch.equal(net[k], resumed.net[k]) for k in NET_KEYS)
    assert meta["training"]["episodes"] == 6 and meta["output_scale"] == cfg.output_scale
    assert (tmp_path / "part" / "l2lbgdbgd.json").is_file()


def test_resume_refuses_tampered_checkpoints_and_changed_configs(tmp_path):
    cfg = _tiny_config(episodes=2)
    meta_train(cfg, tmp_path, progress=False, task_sampler=_sampler, stop_after=1)
    with pytest.raises(ValueError, match="meta_lr"):
        meta_train(_tiny_config(episodes=2, meta_lr=0.02), tmp_path, progress=False, task_sampler=_sampler, resume=True)
    path = tmp_path / CHECKPOINT_NAME
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        meta_train(cfg, tmp_path, progress=False, task_sampler=_sampler, resume=True)
    with pytest.raises(CheckpointError, match="not found"):
        meta_train(cfg, tmp_path / "nothing", progress=False, task_sampler=_sampler, resume=True)


def test_second_order_training_runs(tmp_path):
    res = meta_train(_tiny_config(episodes=2, second_order=True), tmp_path, progress=False, task_sampler=_sampler)
    assert all(r["meta_loss"] is not None and math.isfinite(r["meta_loss"]) for r in res.log)


# --- config and command line ------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError, match="unroll_length"):
        MetaL2LConfig.from_dict({"unroll_length": 20})
    with pytest.raises(ValueError, match="multiple of unroll"):
        MetaL2LConfig(horizon=50, unroll=20)
    with pytest.raises(ValueError, match="episodes"):
        MetaL2LConfig(episodes=0)
    with pytest.raises(ValueError, match="meta_lr"):
        MetaL2LConfig(meta_lr="fast")
    with pytest.raises(ValueError, match="second_order"):
        MetaL2LConfig(second_order=1)
    with pytest.raises(ValueError, match="dtype"):
        MetaL2LConfig(dtype="float16")


def test_shipped_config_file_parses():
    from pathlib import Path

    cfg = MetaL2LConfig.from_file(Path(__file__).resolve().parents[2] / "configs" / "l2l.toml")
    assert (cfg.task, cfg.horizon, cfg.unroll, cfg.hidden_size, cfg.preprocess_p) == ("mnist:48-48:b64", 400, 20, 20, 10.0)
    assert not cfg.second_order


def test_cli_meta_train_and_resume(tmp_path, capsys):
    from l2o.cli import main
    from l2o.learned.l2l import L2LBGDBGD

    conf = tmp_path / "l2l.toml"
    conf.write_text('task = "logreg/train/0"\nhorizon = 10\nunroll = 5\nepisodes = 2\nmeta_lr = 0.01\n')
    out = tmp_path / "run"
    assert main(["meta-train", "l2l", "--config", str(conf), "--out", str(out), "--quiet"]) == 0
    assert "episodes: 2" in capsys.readouterr().out
    assert main(["meta-train", "l2l", "--config", str(conf), "--out", str(out), "--quiet"]) == 2  # exists, no --resume
    assert main(["meta-train", "l2l", "--config", str(conf), "--out", str(out), "--quiet", "--resume", "--episodes", "3"]) == 0
    assert "episodes: 3" in capsys.readouterr().out
    x = torch.zeros(4, requires_grad=True)
    opt = L2LBGDBGD([x], checkpoint=out / POLICY_NAME)
    x.grad = torch.ones(4)
    opt.step()
    assert torch.isfinite(x).all()
    conf.write_text('task = "logreg/train/0"\nhorizon = 10\nunroll = 5\nepisodes = 2\nlr = 0.01\n')
    assert main(["meta-train", "l2l", "--config", str(conf), "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    assert "'lr'" in capsys.readouterr().err


@pytest.mark.parametrize("forge", ["drop-log", "drop-config", "nan-weights", "config-not-object"])
def test_resume_refuses_forged_checkpoints_with_a_checkpoint_error(tmp_path, forge):
    from tests.learned.test_learned_robustness import _drop_meta, _forge, _set_meta

    cfg = _tiny_config(episodes=2)
    meta_train(cfg, tmp_path, progress=False, task_sampler=_sampler, stop_after=1)
    path = tmp_path / CHECKPOINT_NAME
    good = path.with_suffix(".orig")
    path.rename(good)

    def nan_net(tensors: dict) -> None:
        tensors["net.W_out"] = torch.full_like(tensors["net.W_out"], float("nan"))

    edits = {"drop-log": {"meta_text": _drop_meta("log")}, "drop-config": {"meta_text": _drop_meta("config")},
             "nan-weights": {"edit_tensors": nan_net}, "config-not-object": {"meta_text": _set_meta("config", "3")}}
    _forge(good, path, **edits[forge])  # digest recomputed: only validation can catch it
    with pytest.raises(CheckpointError, match=str(path)):
        meta_train(cfg, tmp_path, progress=False, task_sampler=_sampler, resume=True)
