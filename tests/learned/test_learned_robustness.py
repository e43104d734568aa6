"""Every learned optimizer (PSD, L2LBGDBGD, the 2016 optimizer) on legitimate but unusual losses,
on non-finite losses/gradients, and on checkpoints whose values were edited (digest recomputed)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from l2o.checkpoint import CheckpointError, _digest, load_checkpoint
from l2o.features.conv2017 import LOSS_FLOOR, observation_step
from l2o.features.history2016 import feature_dim
from l2o.learned import psd as psd_mod
from l2o.learned.l2l import DEFAULT_CHECKPOINT as L2L_CHECKPOINT
from l2o.learned.l2l import L2LBGDBGD
from l2o.learned.lto2016 import LearnedOptimizer2016, save_policy
from l2o.learned.psd import PredictedStepDescent
from l2o.learned.lto2016 import MLPPolicy2016

N = 6  # coordinates of the test problem


@pytest.fixture
def lto_path(tmp_path: Path) -> Path:
    pol = MLPPolicy2016(feature_dim(N, 3), N, hidden=8, seed=1)
    with torch.no_grad():
        pol.fc2.weight.mul_(10.0)
    return save_policy(tmp_path / "lto.safetensors", pol, 3, {"note": "test"})


def _make(kind: str, params: list[torch.Tensor], lto_path: Path) -> torch.optim.Optimizer:
    if kind == "psd":
        return PredictedStepDescent(params)
    if kind == "l2l":
        return L2LBGDBGD(params)
    return LearnedOptimizer2016(params, checkpoint=lto_path)


KINDS = ("psd", "l2l", "lto2016")


def _loss_closure(opt: torch.optim.Optimizer, x: torch.Tensor, value: Callable[[torch.Tensor], torch.Tensor]):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = value(x)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_of_exactly_zero_then_positive_never_break_an_optimizer(kind, dtype, lto_path):
    # A hinge loss: exactly 0 (with zero gradient) once the margin is met, positive otherwise.
    x = torch.full((N,), 0.5, dtype=dtype, requires_grad=True)
    opt = _make(kind, [x], lto_path)
    targets = [torch.zeros(N, dtype=dtype), torch.full((N,), 0.5, dtype=dtype), torch.ones(N, dtype=dtype)]
    for t in range(12):
        target = targets[t % 3]
        loss = opt.step(_loss_closure(opt, x, lambda z, c=target: torch.relu((z - c).abs() - 0.3).sum()))
        assert torch.isfinite(x).all(), f"{kind}: iterate not finite after step {t} (loss {float(loss)})"
    assert float(loss.detach()) >= 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_negative_losses_are_legitimate(kind, lto_path):
    x = torch.linspace(-1, 1, N, dtype=torch.float64).requires_grad_(True)
    opt = _make(kind, [x], lto_path)
    losses = []
    for _ in range(20):
        losses.append(float(opt.step(_loss_closure(opt, x, lambda z: (z ** 2).sum() - 10.0)).detach()))
        assert torch.isfinite(x).all()
    assert losses[0] < 0 and all(map(math.isfinite, losses))
    if kind != "lto2016":  # the shipped weights still descend (the test's 2016 policy is random)
        assert losses[-1] < losses[0]


def test_psd_loss_feature_is_the_papers_above_the_floor_and_keeps_its_sign_below():
    g = torch.ones(3, dtype=torch.float64)
    x0, x1 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def psi1(f: float, f_prev: float) -> float:
        obs = observation_step(torch.tensor(f, dtype=torch.float64), torch.tensor(f_prev, dtype=torch.float64),
                               g, g, x1, x0, None)
        return float(obs[0, 0])

    for f_prev, f in ((0.3, 0.2), (LOSS_FLOOR, 0.5), (2.5, 2.75)):
        assert psi1(f, f_prev) == (f - f_prev) / f_prev  # bit for bit the paper's feature
    assert psi1(0.5, 0.0) == 0.5 / LOSS_FLOOR  # after a zero loss: finite
    assert psi1(-3.0, -2.0) == -0.5  # a negative loss going down reads as a decrease
    assert psi1(-1.0, -2.0) == 0.5


def test_psd_with_shipped_weights_moves_identically_whenever_losses_stay_above_the_floor(monkeypatch):
    # Same steps with the old denominator f_prev when f_prev >= δ (here all losses are >= 0.1).
    import l2o.features.conv2017 as conv

    def run() -> torch.Tensor:
        x = torch.linspace(-1, 1, N, dtype=torch.float32).requires_grad_(True)
        opt = PredictedStepDescent([x])
        for _ in range(15):
            opt.step(_loss_closure(opt, x, lambda z: (z ** 2).sum() + 0.1))
        return x.detach().clone()

    new = run()
    monkeypatch.setattr(conv, "loss_denominator", lambda f: f)  # the paper's plain f_prev
    torch.testing.assert_close(run(), new, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["nan-loss", "inf-loss", "nan-grad", "inf-grad"])
def test_non_finite_input_raises_before_anything_moves(kind, bad, lto_path):
    x = torch.linspace(-1, 1, N, dtype=torch.float64).requires_grad_(True)
    y = torch.ones(2, dtype=torch.float64, requires_grad=True)
    params = [x] if kind == "lto2016" else [y, x]  # the 2016 policy is tied to N coordinates
    opt = _make(kind, params, lto_path)
    for _ in range(3):  # some history first
        opt.step(_loss_closure(opt, x, lambda z: (z ** 2).sum() + (y ** 2).sum()))
    before = [p.detach().clone() for p in params]
    state_before = json.dumps({k: str(v) for k, v in opt.state_dict().items()}, sort_keys=True)

    def value(z: torch.Tensor) -> torch.Tensor:
        loss = (z ** 2).sum() + (y ** 2).sum()
        if bad == "nan-loss":
            return loss * float("nan")
        if bad == "inf-loss":
            return loss + float("inf")
        bump = torch.zeros(N, dtype=z.dtype)
        bump[2] = float("nan") if bad == "nan-grad" else float("inf")
        return loss + _grad_only(z, bump)  # finite loss, non-finite gradient entry

    with pytest.raises(FloatingPointError):
        opt.step(_loss_closure(opt, x, value))
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b), f"{kind}: a parameter moved on {bad}"
    assert json.dumps({k: str(v) for k, v in opt.state_dict().items()}, sort_keys=True) == state_before


class _GradOnly(torch.autograd.Function):
    """Adds 0 to the loss but ``bump`` to the gradient (a finite loss with a non-finite gradient)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, bump: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(bump)
        return z.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (bump,) = ctx.saved_tensors
        return grad * bump, None


def _grad_only(z: torch.Tensor, bump: torch.Tensor) -> torch.Tensor:
    return _GradOnly.apply(z, bump)


def _forge(src: Path, dst: Path, edit_tensors: Callable[[dict], None] | None = None,
           meta_text: Callable[[str], str] | None = None) -> Path:
    """Rewrite a checkpoint with edited contents and a *recomputed* digest (what an attacker, or a
    buggy tool, can do): loading must still refuse it because the values are validated."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    text = header["l2o.meta"]
    if edit_tensors:
        edit_tensors(tensors)
    if meta_text:
        text = meta_text(text)
    save_file(tensors, str(dst), metadata={"l2o.meta": text, "l2o.sha256": _digest(tensors, text)})
    return dst


def _set_meta(key: str, raw: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        meta = json.loads(text)
        meta[key] = "@@"
        return json.dumps(meta).replace('"@@"', raw)
    return edit


def _drop_meta(key: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        meta = json.loads(text)
        del meta[key]
        return json.dumps(meta)
    return edit


def _nan_first(tensors: dict) -> None:
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_with_nan_weights_is_refused(kind, tmp_path, lto_path):
    src = {"psd": psd_mod.DEFAULT_CHECKPOINT, "l2l": L2L_CHECKPOINT, "lto2016": lto_path}[kind]
    bad = _forge(Path(src), tmp_path / "nan.safetensors", edit_tensors=_nan_first)
    x = torch.zeros(N, requires_grad=True)
    ctor = {"psd": PredictedStepDescent, "l2l": L2LBGDBGD, "lto2016": LearnedOptimizer2016}[kind]
    with pytest.raises(CheckpointError, match="non-finite"):
        ctor([x], checkpoint=bad)


@pytest.mark.parametrize("edit, message", [
    (_set_meta("output_scale", "NaN"), "non-finite number NaN"),
    (_set_meta("output_scale", "1e400"), "overflows"),
    (_set_meta("output_scale", "1e30"), "output_scale must be nonzero"),
    (_set_meta("output_scale", "0"), "output_scale must be nonzero"),
    (_set_meta("output_scale", '"0.1"'), "output_scale must be a finite number"),
    (_set_meta("preprocess_p", "1e6"), "preprocess_p must be in"),
    (_set_meta("hidden_size", "7"), "hidden_size 7 does not match"),
    (_drop_meta("output_scale"), "lacks output_scale"),
    (_drop_meta("preprocess_p"), "lacks preprocess_p"),
    (lambda text: "[1, 2]", "must be a JSON object"),
    (lambda text: text[:-3], "unreadable metadata"),
])
def test_l2l_checkpoint_metadata_is_validated(edit, message, tmp_path):
    bad = _forge(L2L_CHECKPOINT, tmp_path / "bad.safetensors", meta_text=edit)
    with pytest.raises(CheckpointError, match=message):
        L2LBGDBGD([torch.zeros(3, requires_grad=True)], checkpoint=bad)


@pytest.mark.parametrize("edit, message", [
    (_drop_meta("history"), "lacks history"),
    (_set_meta("hidden", "-1"), "hidden must be an integer"),
    (_set_meta("obs_dim", "2.5"), "obs_dim must be an integer"),
    (_set_meta("action_dim", "1000000000000"), "action_dim must be an integer"),
    (_set_meta("history", "2"), "does not match action_dim"),
    (_set_meta("hidden", "9"), "weight fc1.weight has shape"),
])
def test_lto2016_checkpoint_metadata_is_validated(edit, message, tmp_path, lto_path):
    bad = _forge(lto_path, tmp_path / "bad.safetensors", meta_text=edit)
    with pytest.raises(CheckpointError, match=message):
        LearnedOptimizer2016([torch.zeros(N, requires_grad=True)], checkpoint=bad)


def test_l2l_training_checkpoint_without_config_is_a_checkpoint_error(tmp_path):
    from l2o.checkpoint import save_checkpoint
    from l2o.learned.l2l import TRAIN_KIND

    tensors, _ = load_checkpoint(L2L_CHECKPOINT)
    path = save_checkpoint(tmp_path / "t.safetensors", {f"net.{k}": v for k, v in tensors.items()}, {}, TRAIN_KIND)
    with pytest.raises(CheckpointError, match="without a config"):
        L2LBGDBGD([torch.zeros(3, requires_grad=True)], checkpoint=path)
