"""Meta-training mlp-lopt by PES: the vmapped inner problem equals the torch.optim front end,
exact resume, config validation, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from l2o.learned.mlp_lopt import MLPLOpt, MLPLOptArch, flat_to_theta, init_theta, load_policy, theta_to_flat
from l2o.outer.lopt import MLPLOptProblem
from l2o.outer.meta_mlp_lopt import MetaMLPLOptConfig, meta_train
from tests.conftest import tiny_mlp_task


def test_batched_inner_step_equals_the_optimizer_front_end() -> None:
    task = tiny_mlp_task()
    arch = MLPLOptArch(hidden=8)
    problem = MLPLOptProblem(task, arch)
    N = 3
    g = torch.Generator().manual_seed(0)
    base = theta_to_flat(init_theta(arch))
    theta = base + 0.3 * torch.randn(2, N, arch.dim, generator=g)  # six different θ's
    state = {k: v.unsqueeze(0).expand(2, *v.shape).clone() for k, v in problem.init_runs(N, g).items()}
    x0 = state["x"].clone()
    steps, batch_gens = 4, []
    for s in range(steps):
        batch_gens.append(g.get_state())
        _, state = problem.step(theta, state, torch.full((N,), s), g)
    for branch in range(2):
        for i in range(N):
            params = [p.clone().requires_grad_() for p in torch.split(x0[branch, i], [gr.numel for gr in task.groups])]
            shaped = {gr.name: p.view(gr.shape) for gr, p in zip(task.groups, params)}
            opt = MLPLOpt(params, theta=flat_to_theta(theta[branch, i], arch), arch=arch)
            for s in range(steps):
                gs = torch.Generator()
                gs.set_state(batch_gens[s])
                idx = torch.randint(0, task.num_examples, (N, task.batch_size), generator=gs)[i]
                opt.zero_grad()
                task.loss(shaped, idx).backward()
                opt.step()
            torch.testing.assert_close(torch.cat([p.detach() for p in params]), state["x"][branch, i], rtol=1e-5, atol=1e-6)


def _config(**kw) -> MetaMLPLOptConfig:
    base = dict(task="unused", hidden=8, n_pairs=3, sigma=0.02, truncation=4, horizon=12, steps=7, meta_lr=0.01)
    return MetaMLPLOptConfig(**{**base, **kw})


def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path) -> None:
    task = tiny_mlp_task()
    cfg = _config()
    full = meta_train(cfg, tmp_path / "a", progress=False, task=task)
    meta_train(cfg, tmp_path / "b", progress=False, task=task, stop_after=3)
    resumed = meta_train(cfg, tmp_path / "b", progress=False, task=task, resume=True)
    assert full.steps == resumed.steps == 7
    assert torch.equal(full.theta, resumed.theta)
    assert not torch.equal(full.theta, theta_to_flat(init_theta(cfg.arch)))  # θ moved
    la = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [(r["meta_loss"], r["grad_norm"]) for r in la] == [(r["meta_loss"], r["grad_norm"]) for r in lb]
    theta, arch, _ = load_policy(tmp_path / "b" / "mlp-lopt.safetensors")
    assert arch == cfg.arch and torch.equal(theta_to_flat(theta), resumed.theta.to(torch.float32))
    with pytest.raises(ValueError, match="exists"):
        meta_train(cfg, tmp_path / "a", progress=False, task=task)
    with pytest.raises(ValueError, match="differs"):
        meta_train(_config(sigma=0.03), tmp_path / "a", progress=False, task=task, resume=True)


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown"):
        MetaMLPLOptConfig.from_dict({"popsize": 3})
    for bad in ({"hidden": 64}, {"horizon": 30, "truncation": 7}, {"sigma": -1.0}, {"steps": 0}, {"dtype": "half"},
                {"persistent": "yes"}):
        with pytest.raises(ValueError):
            MetaMLPLOptConfig.from_dict(bad)


def test_shipped_config_parses() -> None:
    from pathlib import Path

    cfg = MetaMLPLOptConfig.from_file(Path(__file__).resolve().parents[2] / "configs" / "mlp-lopt-pes.toml")
    assert cfg.task == "mnist:48-48:b64" and cfg.horizon == 400 and cfg.arch.hidden <= 32


def test_cli_meta_train_and_resume(tmp_path, monkeypatch) -> None:
    from l2o import cli
    from l2o.outer import meta_mlp_lopt

    task = tiny_mlp_task()
    monkeypatch.setattr(meta_mlp_lopt, "build_trainer", lambda config, _task=None, _orig=meta_mlp_lopt.build_trainer: _orig(config, task))
    cfg = tmp_path / "c.toml"
    cfg.write_text('task = "unused"\nhidden = 4\nn_pairs = 2\ntruncation = 2\nhorizon = 4\nsteps = 3\n')
    out = tmp_path / "run"
    assert cli.main(["meta-train", "mlp-lopt", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert cli.main(["meta-train", "mlp-lopt", "--config", str(cfg), "--out", str(out), "--iterations", "5",
                     "--resume", "--quiet"]) == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 5
    assert (out / "mlp-lopt.safetensors").is_file()
