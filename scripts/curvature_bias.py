"""How well does a second-order model price a mini-batch optimizer's steps? (Conv-GPS cost model)

Runs AdaGrad (lr 0.1, the tuned setting) on mnist:48-48:b64 for 100 steps and sums, over the
steps, the measured change of the true objective f, the first-order term ∇f·a, and the
second-order term ½ aᵀHa with H the Hessian of (i) the step's own mini-batch, (ii) the full
training set, (iii) an independent mini-batch. Case (i) is biased upwards: the step comes from that
batch's gradient, so it points where that batch curves most (see ``curvature_batch`` in
:class:`l2o.outer.gps.conv_trainer.ConvGPSConfig`).

    python scripts/curvature_bias.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse

import torch

from l2o.tasks.base import flatten, unflatten
from l2o.tasks.registry import make_task


def hvp(task, x: torch.Tensor, batch, v: torch.Tensor) -> torch.Tensor:
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(task.loss(unflatten(xg, task.groups), batch), xg, create_graph=True)
    (hv,) = torch.autograd.grad(g, xg, grad_outputs=v)
    return hv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = make_task("mnist:48-48:b64", data_dir=args.data_dir)
    groups = task.groups
    x = flatten(task.init_params(3), groups).clone()
    batches, other = torch.Generator().manual_seed(5), torch.Generator().manual_seed(77)
    acc = torch.zeros_like(x)
    sums = dict.fromkeys(("df", "grad_f.a", "half aHa (own batch)", "half aHa (full data)", "half aHa (independent batch)"), 0.0)
    for _ in range(args.steps):
        idx = task.sample_batch(batches)
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(task.loss(unflatten(xg, groups), idx), xg)
        acc += g * g
        a = -args.lr * g / (acc.sqrt() + 1e-10)
        xf = x.clone().requires_grad_(True)
        f = task.loss(unflatten(xf, groups), None)
        (gf,) = torch.autograd.grad(f, xf)
        sums["df"] += task.true_loss(unflatten(x + a, groups)) - float(f.detach())
        sums["grad_f.a"] += float(gf @ a)
        sums["half aHa (own batch)"] += 0.5 * float(a @ hvp(task, x, idx, a))
        sums["half aHa (full data)"] += 0.5 * float(a @ hvp(task, x, None, a))
        sums["half aHa (independent batch)"] += 0.5 * float(a @ hvp(task, x, task.sample_batch(other), a))
        x = x + a
    print(f"AdaGrad lr {args.lr} on mnist:48-48:b64, {args.steps} steps, sums over steps:")
    for k, v in sums.items():
        print(f"  {k:32s} {v:9.3f}")


if __name__ == "__main__":
    main()
