"""Per-iteration cost of each optimizer relative to Adam, measured in one process.

Times ``closure + optimizer.step`` (one mini-batch; the true-objective evaluation the harness adds
is excluded) for every registered optimizer with its tuned hyperparameters, and prints the ratio to
Adam on the same task, parameters and batches. Ratios, not seconds, are the result: they transfer
between machines.

A second table (``--learned``, default ``mlp-lopt``) times learned optimizers against Adam on two
nets of the paper's kind at batch 64 on synthetic N(0, 1) inputs (no dataset needed): 48-48-10
(2,842 parameters) and 784-1250-10 (993,760 ≈ 1M). Adam and the learned optimizer run interleaved,
one iteration each in turn on their own copy of the parameters and the same batches, so machine
load affects both alike; the table gives medians of the whole iteration (zero grads, forward,
backward, step) and of the step alone, as ratios to Adam. For PSD and L2LBGDBGD it also gives the
step ÷ its floor: the policy network's matrix products alone (``addmm`` of [x, h] against the
stacked gate weights per LSTM layer, and the output layer) over the same number of coordinates,
on preallocated buffers at the best of several row chunkings, timed in the same loop. Usage:

    python benchmarks/bench_step_time.py [--task mnist:48-48:b64] [--steps 200] [--data-dir DIR]
        [--learned mlp-lopt psd ... | all] [--learned-steps 50] [--big-steps 20] [--nets small big] [--skip-baselines]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from l2o.baselines.registry import BASELINES, optimizer_names, parse_optimizer
from l2o.baselines.tuned import load_tuned
from l2o.tasks.registry import make_task


def time_per_step(task, spec, steps: int, seed: int = 0) -> float:
    """Median seconds per iteration over ``steps`` iterations (after 10 warm-up steps)."""
    params = {k: v.requires_grad_(True) for k, v in task.init_params(seed).items()}
    opt = spec.build([params[g.name] for g in task.groups])
    gen = torch.Generator().manual_seed(seed)
    times = []
    for i in range(steps + 10):
        idx = task.sample_batch(gen)

        def closure():
            opt.zero_grad()
            loss = task.loss(params, idx)
            loss.backward()
            return loss

        t0 = time.perf_counter()
        opt.step(closure)
        if i >= 10:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_task(inputs: int, hidden: int, classes: int = 10, examples: int = 4096, batch: int = 64,
                   seed: int = 0):
    """The 2017 MLP objective on N(0, 1) inputs with random labels (cost is what is measured)."""
    from l2o.tasks.mlp import MLPClassifierTask, ProjectedData

    g = torch.Generator().manual_seed(seed)
    data = ProjectedData(torch.randn(examples, inputs, generator=g), torch.randint(0, classes, (examples,), generator=g),
                         classes, "synthetic N(0,1)")
    return MLPClassifierTask(data, hidden, batch, name=f"synthetic:{inputs}-{hidden}-{classes}:b{batch}")


def policy_products(opt) -> list[tuple[int, int]] | None:
    """The (in, out) sizes of the per-coordinate matrix products of a learned optimizer's network
    (one per LSTM layer with [x, h] stacked, plus the output layer); None if unknown."""
    from l2o.learned.l2l import L2LBGDBGD
    from l2o.learned.psd import PredictedStepDescent

    if isinstance(opt, PredictedStepDescent):
        H, P = opt.hidden_size, int(opt._net["W_ih"].shape[1])
        return [(P + H, 4 * H), (H, 1)]
    if isinstance(opt, L2LBGDBGD):
        H = opt.hidden_size
        return [(2 + H, 4 * H), (2 * H, 4 * H), (H, 1)]
    return None


def make_floor(n: int, products: list[tuple[int, int]], chunks=(256, 512, 1024, 2048, 4096, 8192, 16384),
               reps: int = 5):
    """A callable doing only ``products`` for ``n`` rows (preallocated inputs, outputs and weights),
    at the row chunking that was fastest over ``reps`` calls; returns (callable, chunk)."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, k, generator=g) for k, _ in products]
    ws = [torch.randn(k, m, generator=g) / k ** 0.5 for k, m in products]
    bs = [torch.randn(m, generator=g) for _, m in products]

    def build(chunk: int):
        outs = [torch.empty(min(chunk, n), m) for _, m in products]

        def run() -> None:
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                for x, w, b, o in zip(xs, ws, bs, outs):
                    torch.addmm(b, x[s:e], w, out=o[: e - s])
        return run

    best = None
    for chunk in sorted({min(c, n) for c in chunks}):
        fn = build(chunk)
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        t = statistics.median(ts)
        if best is None or t < best[0]:
            best = (t, chunk, fn)
    return best[2], best[1]


def interleaved_times(task, specs: dict, steps: int, warmup: int = 3, seed: int = 0,
                      floors: dict | None = None) -> dict[str, tuple[float, float]]:
    """Median (iteration, step-only) seconds per optimizer, the optimizers taking turns every
    iteration; each entry of ``floors`` (name → callable) is timed in the same turn order."""
    runs = {}
    for name, spec in specs.items():
        params = {k: v.requires_grad_(True) for k, v in task.init_params(seed).items()}
        runs[name] = (params, spec.build([params[g.name] for g in task.groups]), [], [])
    gen = torch.Generator().manual_seed(seed)
    floor_t: dict[str, list[float]] = {}
    for i in range(steps + warmup):
        idx = task.sample_batch(gen)
        for params, opt, t_it, t_st in runs.values():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            loss = task.loss(params, idx)
            loss.backward()
            t1 = time.perf_counter()
            opt.step(lambda loss=loss: loss)
            t2 = time.perf_counter()
            if i >= warmup:
                t_it.append(t2 - t0)
                t_st.append(t2 - t1)
        for name, fn in (floors or {}).items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                floor_t.setdefault(name, []).append(time.perf_counter() - t0)
    out = {n: (statistics.median(r[2]), statistics.median(r[3])) for n, r in runs.items()}
    out.update({n: (math.nan, statistics.median(t)) for n, t in floor_t.items()})
    return out


NETS = {"small": (48, 48), "big": (784, 1250)}
"""The two nets of the learned-optimizer table: (inputs, hidden units); 10 classes."""


def learned_table(names: list[str], steps: int, big_steps: int, nets: tuple[str, ...] = tuple(NETS)) -> None:
    """Per-iteration cost × Adam of learned optimizers on the 48-48-10 and ~1M-parameter nets."""
    tuned = load_tuned()
    print(f"\nlearned optimizers vs Adam ({tuned.spec('adam')}), batch 64, 1 thread, interleaved, medians")
    print("| model | parameters | iters | optimizer | Adam ms/iter | ms/iter | × Adam (iteration) "
          "| Adam step ms | step ms | × Adam (step only) | floor ms (chunk) | step ÷ floor |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for net in nets:
        (inputs, hidden), n_steps = NETS[net], steps if net == "small" else big_steps
        task = synthetic_task(inputs, hidden)
        for name in names:
            spec = parse_optimizer(name)
            try:
                products = policy_products(spec.build([torch.zeros(1, requires_grad=True)]))
            except ValueError as e:  # e.g. lto2016 without a chosen policy: say so, time the others
                print(f"| MLP {inputs}-{hidden}-10 | {task.dim:,} | — | {name} | not run: {e} |", flush=True)
                continue
            floors, chunk = {}, None
            if products is not None:
                floors["floor"], chunk = make_floor(task.dim, products)
            res = interleaved_times(task, {"adam": tuned.spec("adam"), name: spec}, n_steps, floors=floors)
            (a_it, a_st), (l_it, l_st) = res["adam"], res[name]
            fl = f"{res['floor'][1] * 1e3:.2f} ({chunk}) | {l_st / res['floor'][1]:.2f}" if floors else "— | —"
            print(f"| MLP {inputs}-{hidden}-10 | {task.dim:,} | {n_steps} | {name} | {a_it * 1e3:.2f} | {l_it * 1e3:.2f} "
                  f"| {l_it / a_it:.2f} | {a_st * 1e3:.2f} | {l_st * 1e3:.2f} | {l_st / a_st:.1f} | {fl} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mnist:48-48:b64")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--data-dir")
    ap.add_argument("--optimizers", nargs="+", default=list(BASELINES))
    ap.add_argument("--learned", nargs="*", default=["mlp-lopt"],
                    help="learned optimizers for the second table (specs; 'all' = every registered learned optimizer)")
    ap.add_argument("--learned-steps", type=int, default=50, help="timed iterations on the 48-48-10 net")
    ap.add_argument("--big-steps", type=int, default=20, help="timed iterations on the ~1M-parameter net")
    ap.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS),
                    help="nets of the learned-optimizer table: small = 48-48-10, big = 784-1250-10")
    ap.add_argument("--skip-baselines", action="store_true", help="only the learned-optimizer table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if "all" in args.learned:
        args.learned = [n for n in args.learned if n != "all"] + optimizer_names(learned=True)
    if args.skip_baselines:
        learned_table(args.learned, args.learned_steps, args.big_steps, tuple(args.nets))
        return
    task = make_task(args.task, data_dir=args.data_dir)
    tuned = load_tuned()
    specs = {n: (tuned.spec(n) if ":" not in n and n in tuned.settings else parse_optimizer(n)) for n in args.optimizers}
    ref = time_per_step(task, tuned.spec("adam"), args.steps)
    print(f"task {task.name} ({task.dim} coordinates), {args.steps} steps, 1 thread; Adam: {ref * 1e3:.3f} ms/iteration")
    print(f"{'optimizer':12s} {'ms/iter':>9s} {'× Adam':>8s}")
    for name, spec in specs.items():
        t = time_per_step(task, spec, args.steps)
        print(f"{name:12s} {t * 1e3:9.3f} {t / ref:8.2f}")
    if args.learned:
        learned_table(args.learned, args.learned_steps, args.big_steps, tuple(args.nets))


if __name__ == "__main__":
    main()
