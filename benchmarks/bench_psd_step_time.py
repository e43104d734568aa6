"""Per-iteration cost of Predicted Step Descent relative to Adam, measured in one process.

Two objectives of the paper's kind (two-layer ReLU MLP, softmax cross-entropy, batch 64) on
synthetic standardised inputs, so no dataset is needed: (a) the meta-training net's shape
48-48-10 (2,842 parameters) and (b) 784-1250-10 (993,760 parameters, ≈1M). Each iteration is
timed in two parts on the same parameters and batches: the closure (zero grads, forward,
backward) and the optimizer step (PSD via ``step(loss=...)``: observation Ψ, LSTM, update). The
table gives the full iteration (closure + step) and the step alone, as ratios to Adam
(``torch.optim.Adam``, default implementation). Ratios, not seconds, are the result: they
transfer between machines. PSD's cost is dominated by its 128-cell LSTM run on every coordinate
(≈ 4·128·(128+3)·2 ≈ 134k flops per coordinate per step).

Uses the packaged PSD policy if present, else a random-weight policy (same cost). Usage:

    python benchmarks/bench_psd_step_time.py [--steps 50] [--big-steps 5] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from l2o.learned.psd import DEFAULT_CHECKPOINT, PredictedStepDescent
from l2o.learned.psd import init_net, save_policy
from l2o.tasks.mlp import MLPClassifierTask, ProjectedData

BATCH = 64
WARMUP = 2


def synthetic_task(inputs: int, hidden: int, classes: int = 10, examples: int = 4096, seed: int = 0) -> MLPClassifierTask:
    """The 2017 MLP objective on N(0, 1) inputs with random labels (cost is what is measured)."""
    g = torch.Generator().manual_seed(seed)
    data = ProjectedData(torch.randn(examples, inputs, generator=g), torch.randint(0, classes, (examples,), generator=g),
                         classes, "synthetic N(0,1)")
    return MLPClassifierTask(data, hidden, BATCH, name=f"synthetic:{inputs}-{hidden}-{classes}:b{BATCH}")


def random_policy(path: Path) -> Path:
    net = init_net(0)
    net["W_out"] = torch.randn(1, net["W_hh"].shape[-1], generator=torch.Generator().manual_seed(1)) * 0.1
    net["out_scale"] = torch.tensor([1e-3])
    return save_policy(path, net, {"note": "random weights for timing only"})


def time_iterations(task: MLPClassifierTask, make_opt, steps: int, seed: int = 0) -> tuple[float, float]:
    """Median seconds per iteration of (closure, optimizer step) over ``steps`` iterations."""
    params = {k: v.requires_grad_(True) for k, v in task.init_params(seed).items()}
    opt = make_opt([params[g.name] for g in task.groups])
    gen = torch.Generator().manual_seed(seed)
    t_closure, t_step = [], []
    for i in range(steps + WARMUP):
        idx = task.sample_batch(gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = task.loss(params, idx)
        loss.backward()
        t1 = time.perf_counter()
        if isinstance(opt, PredictedStepDescent):
            opt.step(loss=loss)
        else:
            opt.step()
        t2 = time.perf_counter()
        if i >= WARMUP:
            t_closure.append(t1 - t0)
            t_step.append(t2 - t1)
    return statistics.median(t_closure), statistics.median(t_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="timed iterations on the 48-48-10 net")
    ap.add_argument("--big-steps", type=int, default=5, help="timed iterations on the ~1M-parameter net")
    ap.add_argument("--checkpoint", help="PSD policy (default: the packaged one, else random weights)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt, which = Path(args.checkpoint), f"given policy {args.checkpoint}"
        elif DEFAULT_CHECKPOINT.is_file():
            ckpt, which = DEFAULT_CHECKPOINT, f"packaged policy {DEFAULT_CHECKPOINT}"
        else:
            ckpt, which = random_policy(Path(tmp) / "psd.safetensors"), "random-weight policy (packaged one absent)"
        print(f"PSD weights: {which}")
        print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}, float32, batch {BATCH}; "
              f"medians after {WARMUP} warm-up iterations\n")
        rows = []
        for inputs, hidden, steps in ((48, 48, args.steps), (784, 1250, args.big_steps)):
            task = synthetic_task(inputs, hidden)
            adam_c, adam_s = time_iterations(task, lambda ps: torch.optim.Adam(ps, lr=1e-3), steps)
            psd_c, psd_s = time_iterations(task, lambda ps: PredictedStepDescent(ps, checkpoint=ckpt), steps)
            rows.append((f"MLP {inputs}-{hidden}-10", task.dim, steps, adam_c + adam_s, psd_c + psd_s, adam_s, psd_s))

    print("| model | parameters | iters | Adam ms/iter | PSD ms/iter | PSD/Adam (iteration) "
          "| Adam step ms | PSD step ms | PSD/Adam (step only) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, dim, steps, a_it, p_it, a_st, p_st in rows:
        print(f"| {name} | {dim:,} | {steps} | {a_it * 1e3:.3f} | {p_it * 1e3:.1f} | {p_it / a_it:.1f} "
              f"| {a_st * 1e3:.3f} | {p_st * 1e3:.1f} | {p_st / a_st:.0f} |")


if __name__ == "__main__":
    main()
