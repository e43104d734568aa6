"""Meta-training PSD's LSTM by PES: the batched inner problem equals PredictedStepDescent, exact
resume, config validation, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from l2o.learned.psd import BASE_KEYS, TRAINED_KEYS, PredictedStepDescent, init_net, load_policy, save_policy
from l2o.outer.meta_psd_pes import MetaPSDPESConfig, build_problem, meta_train
from l2o.outer.psd_problem import PSDProblem
from tests.conftest import tiny_mlp_task

OBS = {"scale-free": 13, "paper2017": 3}


def _net(features: str, hidden: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    net = init_net(seed, hidden_size=hidden, input_size=OBS[features])
    g = torch.Generator().manual_seed(seed + 1)
    net["W_out"] = 0.3 * torch.randn(1, hidden, generator=g)  # init_net's zero output layer takes no step
    net["in_std"] = 1 + torch.rand(OBS[features], generator=g)
    net["out_scale"] = torch.tensor([0.05])
    return net


def _policy_file(path: Path, features: str, **kw) -> Path:
    return save_policy(path, _net(features, **kw), {"features": features})


@pytest.mark.parametrize("features, base", [("scale-free", False), ("paper2017", False), ("scale-free", True)])
def test_batched_inner_step_equals_predicted_step_descent(features: str, base: bool, tmp_path) -> None:
    task = tiny_mlp_task()
    net, keys = _net(features, hidden=16), TRAINED_KEYS
    if base:  # a base step exp(c₀ + c·Ψ)(uᵀΨ) beside the LSTM, trained too
        g = torch.Generator().manual_seed(9)
        net.update(base_u=0.05 * torch.randn(OBS[features], generator=g),
                   base_c=0.3 * torch.randn(OBS[features] + 1, generator=g),
                   base_mask=torch.stack([(torch.arange(OBS[features]) % 3 != 2).float(),  # some directions and
                                          (torch.arange(OBS[features]) % 4 != 1).float()]))  # step-size features masked out
        keys = TRAINED_KEYS + BASE_KEYS[:2]
    problem = PSDProblem(task, net, features, keys)
    N, steps = 2, 5
    g = torch.Generator().manual_seed(0)
    theta = problem.theta0() + 0.1 * torch.randn(2, N, problem.dim, generator=g)  # four different ω's
    state = {k: v.unsqueeze(0).expand(2, *v.shape).clone() for k, v in problem.init_runs(N, g).items()}
    x0 = state["x"].clone()
    batch_gens, losses = [], []
    for s in range(steps):
        batch_gens.append(g.get_state())
        loss, state = problem.step(theta, state, torch.full((N,), s), g)
        losses.append(loss)
    for branch in range(2):
        for i in range(N):
            path = save_policy(tmp_path / f"m{branch}{i}.safetensors", problem.net(theta[branch, i]), {"features": features})
            params = [p.clone().requires_grad_() for p in torch.split(x0[branch, i], [gr.numel for gr in task.groups])]
            shaped = {gr.name: p.view(gr.shape) for gr, p in zip(task.groups, params)}
            opt = PredictedStepDescent(params, checkpoint=path)
            for s in range(steps):
                gs = torch.Generator()
                gs.set_state(batch_gens[s])
                idx = torch.randint(0, task.num_examples, (N, task.batch_size), generator=gs)[i]

                def closure():
                    opt.zero_grad()
                    loss = task.loss(shaped, idx)
                    loss.backward()
                    return loss

                f = opt.step(closure)
                torch.testing.assert_close(f.detach(), losses[s][branch, i], rtol=1e-5, atol=1e-6)
            x = torch.cat([p.detach() for p in params])
            assert not torch.equal(x, x0[branch, i])  # the policy moved the iterate
            torch.testing.assert_close(x, state["x"][branch, i], rtol=1e-5, atol=1e-6)


def _config(init: Path, **kw) -> MetaPSDPESConfig:
    base = dict(init_from=str(init), n_pairs=3, sigma=0.02, truncation=4, horizon=12, steps=6, meta_lr=0.01,
                checkpoint_every=1)
    return MetaPSDPESConfig(**{**base, **kw})


def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path) -> None:
    task = tiny_mlp_task()
    init = _policy_file(tmp_path / "init.safetensors", "scale-free")
    cfg = _config(init)
    full = meta_train(cfg, tmp_path / "a", progress=False, task=task)
    meta_train(cfg, tmp_path / "b", progress=False, task=task, stop_after=3)
    resumed = meta_train(cfg, tmp_path / "b", progress=False, task=task, resume=True)
    assert full.steps == resumed.steps == 6
    assert torch.equal(full.theta, resumed.theta)
    la = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [(r["meta_loss"], r["grad_norm"]) for r in la] == [(r["meta_loss"], r["grad_norm"]) for r in lb]
    # The export is a PSD checkpoint: the trained entries are θ, the rest the starting ω.
    net, meta = load_policy(tmp_path / "b" / "psd-pes.safetensors")
    start, _ = load_policy(init)
    assert meta["features"] == "scale-free"
    flat = torch.cat([net[k].reshape(-1) for k in ("W_ih", "W_hh", "b", "W_out", "b_out")])
    assert torch.equal(flat, resumed.theta) and not torch.equal(flat, torch.cat(
        [start[k].reshape(-1) for k in ("W_ih", "W_hh", "b", "W_out", "b_out")]))
    assert all(torch.equal(net[k], start[k]) for k in ("in_mean", "in_std", "out_scale"))
    PredictedStepDescent([torch.zeros(3, requires_grad=True)], checkpoint=tmp_path / "b" / "psd-pes.safetensors")
    with pytest.raises(ValueError, match="exists"):
        meta_train(cfg, tmp_path / "a", progress=False, task=task)
    with pytest.raises(ValueError, match="differs"):
        meta_train(_config(init, sigma=0.03), tmp_path / "a", progress=False, task=task, resume=True)
    _policy_file(init, "scale-free", seed=5)  # a different file at the same path
    with pytest.raises(ValueError, match="not the file"):
        meta_train(cfg, tmp_path / "a", progress=False, task=task, resume=True)


def test_train_subset_keeps_the_rest_of_the_network(tmp_path) -> None:
    task = tiny_mlp_task()
    init = _policy_file(tmp_path / "init.safetensors", "paper2017")
    result = meta_train(_config(init, train=["W_out", "b_out"], steps=2), tmp_path / "r", progress=False, task=task)
    assert result.theta.numel() == 8 + 1
    net, meta = load_policy(tmp_path / "r" / "psd-pes.safetensors")
    start, _ = load_policy(init)
    assert meta["features"] == "paper2017" and meta["training"]["trained"] == ["W_out", "b_out"]
    assert all(torch.equal(net[k], start[k]) for k in ("W_ih", "W_hh", "b", "in_mean", "in_std", "out_scale"))
    assert not torch.equal(net["W_out"], start["W_out"])


def test_a_base_adagrad_start_trains_the_base_and_the_lstm_correction(tmp_path) -> None:
    """base = "adagrad": the starting ω gets the base step −0.1·g/√G and a zero LSTM output layer (so
    θ₀ is AdaGrad), and the export carries the trained base."""
    task = tiny_mlp_task()
    init = _policy_file(tmp_path / "init.safetensors", "scale-free")
    cfg = _config(init, base="adagrad", train=["W_out", "b_out", "base_u", "base_c"], steps=2)
    problem = build_problem(cfg, task)
    start = problem.net(problem.theta0())
    assert float(start["base_u"][0]) == pytest.approx(-0.1) and not start["W_out"].any() and not start["b_out"].any()
    result = meta_train(cfg, tmp_path / "r", progress=False, task=task)
    assert result.theta.numel() == 8 + 1 + 13 + 14
    net, _ = load_policy(tmp_path / "r" / "psd-pes.safetensors")
    assert not torch.equal(net["base_c"], start["base_c"]) and torch.equal(net["W_ih"], start["W_ih"])
    with pytest.raises(ValueError, match="train must be"):
        _config(init, train=["base_u"])  # no base without base = "adagrad"
    paper = _policy_file(tmp_path / "paper.safetensors", "paper2017")
    with pytest.raises(ValueError, match="scale-free"):
        build_problem(_config(paper, base="adagrad"), task)
    timed = build_problem(_config(init, base="adagrad", base_schedule="time"), task)
    mask = timed.net(timed.theta0())["base_mask"]
    assert mask[0].tolist() == [1.0] * 7 + [0.0] * 6 and mask[1].tolist() == [0.0] * 10 + [1.0] * 3  # the τ's
    with pytest.raises(ValueError, match="base_schedule"):
        _config(init, base="adagrad", base_schedule="loss")
    few = build_problem(_config(init, base="adagrad", base_directions=["g/sqrtG", "m0.9/sqrtG"]), task)
    assert few.net(few.theta0())["base_mask"][0].tolist() == [1.0] + [0.0] * 5 + [1.0] + [0.0] * 6
    with pytest.raises(ValueError, match="not Ψ features"):
        build_problem(_config(init, base="adagrad", base_directions=["g/sqrtG", "adam"]), task)


def test_config_rejects_bad_values_with_clear_errors(tmp_path) -> None:
    init = _policy_file(tmp_path / "init.safetensors", "scale-free")
    with pytest.raises(ValueError, match="unknown psd-pes config key"):
        MetaPSDPESConfig.from_dict({"popsize": 3})
    cases = [({"train": ["W_xx"]}, "train must be"), ({"train": []}, "train must be"),
             ({"task": "cifar10:48-48:b64"}, "MNIST"), ({"task": "mnist:48-48:bfull"}, "mini-batch"),
             ({"horizon": 30, "truncation": 7}, "multiple of truncation"), ({"sigma": -1.0}, "sigma"),
             ({"steps": 0}, "steps"), ({"dtype": "half"}, "dtype"), ({"persistent": "yes"}, "persistent")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            MetaPSDPESConfig.from_dict({"init_from": str(init), **bad})
    with pytest.raises(ValueError, match="not a file"):
        meta_train(MetaPSDPESConfig(init_from=str(tmp_path / "missing.safetensors")), tmp_path / "o",
                   progress=False, task=tiny_mlp_task())


def test_shipped_config_parses() -> None:
    cfg = MetaPSDPESConfig.from_file(Path(__file__).resolve().parents[2] / "configs" / "psd-pes.toml")
    assert cfg.task == "mnist:48-48:b64" and cfg.horizon == 400


def test_cli_meta_train_and_resume(tmp_path, monkeypatch) -> None:
    from l2o import cli
    from l2o.outer import meta_psd_pes

    task = tiny_mlp_task()
    monkeypatch.setattr(meta_psd_pes, "build_problem",
                        lambda config, _task=None, _orig=meta_psd_pes.build_problem: _orig(config, task))
    init = _policy_file(tmp_path / "init.safetensors", "scale-free", hidden=4)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'init_from = "{init}"\nn_pairs = 2\ntruncation = 2\nhorizon = 4\nsteps = 3\n')
    out = tmp_path / "run"
    assert cli.main(["meta-train", "psd-pes", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert cli.main(["meta-train", "psd-pes", "--config", str(cfg), "--out", str(out), "--iterations", "5",
                     "--resume", "--quiet"]) == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 5
    assert (out / "psd-pes.safetensors").is_file() and (out / "psd-pes.json").is_file()


def test_packaged_psd_pes_policy_is_registered() -> None:
    import l2o
    from l2o.baselines.registry import optimizer_names
    from l2o.learned.psd import PES_CHECKPOINT

    assert "psd-pes" in optimizer_names(learned=True)
    x = torch.zeros(5, requires_grad=True)
    opt = l2o.make_optimizer("psd-pes", [x])
    assert opt.checkpoint == str(PES_CHECKPOINT) and opt.features.name == "scale-free"
    x.grad = torch.ones(5)
    opt.step(loss=torch.tensor(1.0))
    assert torch.isfinite(x).all() and not torch.equal(x.detach(), torch.zeros(5))
