"""Meta-training mlp-lopt on a mixture of tasks (``tasks = [...]``) and from a saved θ (``init_from``):
the mixture steps each task's particles exactly as that task's own problem would, runs are
deterministic and resume bit for bit, and bad task lists are rejected with a clear message."""

from __future__ import annotations

import json

import pytest
import torch

from l2o.learned.mlp_lopt import MLPLOptArch, flat_to_theta, init_theta, load_policy, save_policy, theta_to_flat
from l2o.outer.lopt import MLPLOptMixture, MLPLOptProblem
from l2o.outer.meta_mlp_lopt import MetaMLPLOptConfig, build_trainer, meta_train
from tests.conftest import tiny_mlp_task

MIX = ["mnist:48-48:b64", "mnist:48-48:b10"]  # names only: the tests pass tiny tasks in their place


def _tasks():  # two batch sizes and two net widths: different parameter counts
    return [tiny_mlp_task(batch=16, hidden=5), tiny_mlp_task(batch=4, hidden=7)]


def _config(**kw) -> MetaMLPLOptConfig:
    base = dict(tasks=MIX, hidden=8, n_pairs=3, sigma=0.02, truncation=4, horizon=12, steps=7, meta_lr=0.01)
    return MetaMLPLOptConfig(**{**base, **kw})


def test_mixture_steps_each_task_like_its_own_problem() -> None:
    arch = MLPLOptArch(hidden=8)
    problems = [MLPLOptProblem(t, arch) for t in _tasks()]
    mix = MLPLOptMixture(problems)
    assert mix.n == max(p.n for p in problems) and problems[0].n != problems[1].n
    N = 5  # particles 0, 2, 4 on task 0; 1, 3 on task 1
    assert mix.assignment(N).tolist() == [0, 1, 0, 1, 0]
    g = torch.Generator().manual_seed(0)
    theta = theta_to_flat(init_theta(arch)) + 0.1 * torch.randn(2, N, arch.dim, generator=g)
    state = {k: v.unsqueeze(0).expand(2, *v.shape).clone() for k, v in mix.init_particles(torch.arange(N), g).items()}
    assert all(v.shape == (2, N, mix.n) for v in state.values())
    assert torch.all(state["x"][:, 1::2, problems[1].n:] == 0) and torch.all(state["x"][:, 0::2, problems[0].n:] == 0)
    t = torch.arange(N)
    g_ref = torch.Generator()
    g_ref.set_state(g.get_state())
    loss, new = mix.step(theta, state, t, g)
    assert loss.shape == (2, N) and torch.isfinite(loss).all()
    for k, problem in enumerate(problems):  # same draws in task order from the shared generator
        sel = torch.arange(k, N, 2)
        sub = {key: v[:, sel, :problem.n] for key, v in state.items()}
        ref_loss, ref_state = problem.step(theta[:, sel], sub, t[sel], g_ref)
        assert torch.equal(loss[:, sel], ref_loss)
        for key, v in ref_state.items():
            assert torch.equal(new[key][:, sel, :problem.n], v)
            assert torch.all(new[key][:, sel, problem.n:] == 0)
    assert torch.equal(g.get_state(), g_ref.get_state())


def test_mixture_run_is_deterministic_resumes_exactly_and_logs_each_task(tmp_path) -> None:
    cfg = _config()
    full = meta_train(cfg, tmp_path / "a", progress=False, task=_tasks())
    again = meta_train(cfg, tmp_path / "c", progress=False, task=_tasks())
    meta_train(cfg, tmp_path / "b", progress=False, task=_tasks(), stop_after=3)
    resumed = meta_train(cfg, tmp_path / "b", progress=False, task=_tasks(), resume=True)
    assert full.steps == resumed.steps == 7
    assert torch.equal(full.theta, again.theta) and torch.equal(full.theta, resumed.theta)
    assert not torch.equal(full.theta, theta_to_flat(init_theta(cfg.arch)))
    la = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [(r["meta_loss"], r["grad_norm"]) for r in la] == [(r["meta_loss"], r["grad_norm"]) for r in lb]
    assert all(sorted(r["meta_loss_by_task"]) == ["tiny"] for r in la)  # both tiny tasks are named "tiny"
    different = meta_train(_config(seed=1), tmp_path / "d", progress=False, task=_tasks())
    assert not torch.equal(full.theta, different.theta)
    with pytest.raises(ValueError, match="differs"):
        meta_train(_config(tasks=["mnist:48-48:b64"]), tmp_path / "a", progress=False, task=_tasks(), resume=True)


def test_mixture_per_task_log_names_the_tasks() -> None:
    a, b = tiny_mlp_task(batch=16), tiny_mlp_task(batch=4)
    a.name, b.name = "A", "B"
    tr = build_trainer(_config(stagger=False), [a, b])
    info = tr.step()
    assert sorted(info["meta_loss_by_task"]) == ["A", "B"]
    assert info["meta_loss"] == pytest.approx(sum(info["meta_loss_by_task"][k] * n for k, n in (("A", 2), ("B", 1))) / 3)


def test_single_task_list_is_the_single_task_problem() -> None:
    task = tiny_mlp_task()
    one = build_trainer(_config(tasks=["mnist:48-48:b10"]), [task])
    assert type(one.problem) is MLPLOptProblem
    plain = build_trainer(_config(tasks=None), task)
    for _ in range(3):
        assert one.step() == plain.step()
    assert torch.equal(one.theta, plain.theta)


def test_init_from_starts_at_the_saved_theta(tmp_path) -> None:
    arch = MLPLOptArch(hidden=8)
    theta = theta_to_flat(init_theta(arch)) + 0.05 * torch.randn(arch.dim, generator=torch.Generator().manual_seed(3))
    path = save_policy(tmp_path / "p.safetensors", flat_to_theta(theta, arch), arch)
    tr = build_trainer(_config(init_from=str(path)), _tasks())
    assert torch.equal(tr.theta, theta)
    out = meta_train(_config(init_from=str(path), steps=2), tmp_path / "run", progress=False, task=_tasks())
    _, _, meta = load_policy(tmp_path / "run" / "mlp-lopt.safetensors")
    assert str(path) in meta["info"]["method"] and out.steps == 2
    other = save_policy(tmp_path / "q.safetensors", init_theta(MLPLOptArch(hidden=4)), MLPLOptArch(hidden=4))
    with pytest.raises(ValueError, match="arch"):
        build_trainer(_config(init_from=str(other)), _tasks())


def test_init_from_a_policy_without_the_snr_term_starts_snr_training_at_the_same_optimizer(tmp_path) -> None:
    """snr = true from a θ saved without the term: c gets c₄ = 0 (the same optimizer), the rest is the
    saved θ; training then moves c₄ and exports an snr policy."""
    arch = MLPLOptArch(hidden=8)
    theta = theta_to_flat(init_theta(arch)) + 0.05 * torch.randn(arch.dim, generator=torch.Generator().manual_seed(3))
    path = save_policy(tmp_path / "p.safetensors", flat_to_theta(theta, arch), arch)
    tr = build_trainer(_config(init_from=str(path), snr=True), _tasks())
    start = flat_to_theta(tr.theta, MLPLOptArch(hidden=8, snr=True))
    saved = flat_to_theta(theta, arch)
    assert start["c"][-1] == 0 and torch.equal(start["c"][:-1], saved["c"])
    assert all(torch.equal(start[k], saved[k]) for k in saved if k != "c")
    meta_train(_config(init_from=str(path), snr=True, steps=3, sigma=0.3), tmp_path / "run", progress=False,
               task=_tasks())
    th, arch_out, _ = load_policy(tmp_path / "run" / "mlp-lopt.safetensors")
    assert arch_out.snr and th["c"][-1] != 0


@pytest.mark.parametrize("tasks, match", [
    ([], "empty"),
    (["cifar10:48-48:b10"], "not an MNIST"),
    (["faces:48-48:b64", "mnist:48-48:b64"], "not an MNIST"),
    (["logreg/train/0"], "not an MNIST"),
    (["mnist:48-48:bfull"], "full-batch"),
    (["mnist:48-48"], "cannot parse"),
    (["mnist:48-48:b64", "mnist:48-48:b64"], "twice"),
    ("mnist:48-48:b64", "list"),
    (["mnist:48-48:b64", "mnist:48-48:b10", "mnist:48-48:b16", "mnist:48-48:b32"], "n_pairs"),
])
def test_bad_task_lists_are_rejected(tasks, match) -> None:
    with pytest.raises(ValueError, match=match):
        MetaMLPLOptConfig.from_dict({"tasks": tasks, "n_pairs": 3})


def test_config_keys() -> None:
    with pytest.raises(ValueError, match="not both"):
        MetaMLPLOptConfig.from_dict({"task": "mnist:48-48:b64", "tasks": MIX})
    with pytest.raises(ValueError, match="unknown"):
        MetaMLPLOptConfig.from_dict({"tasks": MIX, "task_weights": [1, 2]})
    assert MetaMLPLOptConfig.from_dict({}).task_specs == ["mnist:48-48:b64"]


def test_mix_config_parses() -> None:
    from pathlib import Path

    cfg = MetaMLPLOptConfig.from_file(Path(__file__).resolve().parents[2] / "configs" / "mlp-lopt-pes-mix.toml")
    assert all(t.startswith("mnist:") for t in cfg.task_specs) and len(cfg.task_specs) > 1
    assert cfg.init_from is not None and cfg.n_pairs >= len(cfg.task_specs)


def test_packaged_mixture_weights_are_the_documented_run() -> None:
    import hashlib

    import l2o
    from l2o.learned.mlp_lopt import WEIGHTS_DIR, MLPLOpt

    path = WEIGHTS_DIR / "mlp-lopt-mix.safetensors"
    desc = json.loads(path.with_suffix(".json").read_text())
    assert desc["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    theta, arch, meta = load_policy(path)
    info = meta["info"]
    assert info["outer_steps"] == desc["info"]["outer_steps"] == 2690
    assert all(t.startswith("mnist:") for t in info["config"]["tasks"])  # TFD and CIFAR unseen
    shipped, _, _ = load_policy(WEIGHTS_DIR / "mlp-lopt.safetensors")
    assert not torch.equal(theta_to_flat(theta), theta_to_flat(shipped))
    m = torch.nn.Linear(4, 3)
    assert isinstance(l2o.make_optimizer(f"mlp-lopt:checkpoint={path}", m.parameters()), MLPLOpt)


def test_rank_shaping_ranks_within_each_task() -> None:
    a, b = tiny_mlp_task(batch=16), tiny_mlp_task(batch=4)
    tr = build_trainer(_config(rank_shaping=True, n_pairs=4), [a, b])
    L = torch.tensor([[1.0, 100.0, 2.0, 300.0], [4.0, 200.0, 3.0, 400.0]])
    s = tr.score(L)  # task 0: particles 0, 2 (losses 1, 2 | 4, 3); task 1: particles 1, 3
    torch.testing.assert_close(s[:, 0::2], torch.tensor([[-0.5, -1 / 6], [0.5, 1 / 6]]))
    torch.testing.assert_close(s[:, 1::2], torch.tensor([[-0.5, 1 / 6], [-1 / 6, 0.5]]))
    plain = build_trainer(_config(rank_shaping=False, n_pairs=4), [a, b])
    assert torch.equal(plain.score(L), L)
