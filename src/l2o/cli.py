"""The ``l2o`` command line: benchmark, tune, meta-train, reproduce, data, list."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict] = {
    # The README's main job: needs no download (scikit-learn's bundled digits, real 8x8 images);
    # the shipped learned optimizers beside the seven tuned baselines.
    "demo": {"tasks": ("digits:48-48:b64",), "seeds": 5, "iterations": 400,
             "optimizers": ("mlp-lopt", "psd", "l2lbgdbgd", "sgd", "momentum", "cg", "lbfgs", "adagrad", "adam",
                            "rmsprop"),
             "title": "Learned (mlp-lopt, PSD, L2LBGDBGD) and tuned baselines on digits (embedded default), "
                      "48-48 MLP, batch 64"},
    # The paper's meta-training objective (Li & Malik 2017, §4).
    "meta-objective": {"tasks": ("mnist:48-48:b64",), "seeds": 5, "iterations": 400,
                       "title": "Tuned baselines on the meta-training objective: MNIST 48-48-10, batch 64"},
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--iterations 0`` is a usage error, not an empty run)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _usable_out(path: Path) -> Path:
    """An output folder that exists or can be created; otherwise a one-line ``ValueError``."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {path}: cannot create the folder ({e.strerror or e})") from e
    return path


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="dataset root (also env L2O_DATA_DIR; see `l2o data`)")
    p.add_argument("--jobs", type=positive_int, default=None, help="parallel worker processes (default: CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["local", "ray"], default=None,
                   help="where runs execute: local = worker processes on this machine (default); ray = one Ray task "
                        "per run (needs `pip install l2o[ray]`)")
    p.add_argument("--address", default=None,
                   help="with --backend ray: the Ray cluster to use (e.g. auto, or ray://HEAD:10001); without it, "
                        "a local Ray instance with --jobs CPUs (default: all)")


def _check_backend(backend: str, address: str | None) -> None:
    """Bad backend combinations are one-line usage errors, found before anything runs."""
    if address is not None and backend != "ray":
        raise ValueError("--address names a Ray cluster: it needs --backend ray")
    if address is not None and not str(address).strip():
        raise ValueError("--address must not be empty (e.g. auto, or ray://HEAD:10001)")
    from l2o.execution import require_backend

    require_backend(backend)


def _jobs(args: argparse.Namespace, backend: str = "local", address: str | None = None) -> int | None:
    """--jobs, else all CPUs: this machine's (local, or a local Ray instance), the cluster's
    (``--backend ray --address``: None, no cap on runs in flight)."""
    import os

    if args.jobs is not None:
        return args.jobs
    if backend == "ray" and address:
        return None
    return max(1, os.cpu_count() or 1)


def _merge(cfg: dict, args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    """Overlay command-line values (those given) on a config mapping, plus jobs and data dir."""
    for key in keys:
        v = getattr(args, key)
        if v is not None:
            cfg[key] = v
    if args.backend is not None:
        cfg["backend"] = args.backend
    if args.address is not None:
        cfg["address"] = args.address
    _check_backend(cfg.get("backend", "local"), cfg.get("address"))
    cfg["jobs"] = _jobs(args, cfg.get("backend", "local"), cfg.get("address"))
    if args.data_dir:
        cfg["data_dir"] = args.data_dir
    return cfg


def cmd_benchmark(args: argparse.Namespace) -> int:
    from l2o.baselines.registry import BASELINES
    from l2o.experiments.benchmark import BenchmarkConfig, load_config_file, run_benchmark

    cfg: dict = {"optimizers": BASELINES}
    if args.preset:
        cfg.update(PRESETS[args.preset])
    if args.config:
        cfg.update(load_config_file(Path(args.config)))
    _merge(cfg, args, ("tasks", "optimizers", "seeds", "iterations", "tuned", "title"))
    if "tasks" not in cfg:
        print("l2o benchmark: give --tasks, --preset or --config", file=sys.stderr)
        return 2
    config = BenchmarkConfig.from_dict(cfg)
    for what in ("tasks", "optimizers"):
        given = [cfg[what]] if isinstance(cfg.get(what), str) else list(cfg.get(what) or [])
        if what == "tasks":
            from l2o.tasks.registry import expand_task_specs

            given = expand_task_specs(given)
        if len(given) > len(getattr(config, what)):
            print(f"note: repeated {what} ignored (each runs once): "
                  f"{sorted({x for x in given if given.count(x) > 1})}", file=sys.stderr)
    out = Path(args.out or f"runs/{args.preset or 'benchmark'}")
    report = run_benchmark(config, out, progress=not args.quiet)
    print(report.files["markdown"].read_text())
    for k, p in report.files.items():
        print(f"{k}: {p}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from l2o.baselines.tuned import default_tuned_path
    from l2o.experiments.benchmark import load_config_file
    from l2o.experiments.tuning import TuningConfig, format_tuned, tune

    cfg: dict = {}
    if args.config:
        cfg.update(load_config_file(Path(args.config)))
    _merge(cfg, args, ("task", "optimizers", "seeds", "iterations", "criterion"))
    config = TuningConfig.from_dict(cfg)
    out = _usable_out(Path(args.out))
    target = Path(args.write) if args.write else out / "tuned.json"
    if target.resolve() == default_tuned_path().resolve() and not args.write:
        raise ValueError("refusing to overwrite the packaged tuned settings without --write")
    tuned = tune(config, out, progress=not args.quiet)
    tuned.save(target)
    print(format_tuned(tuned))
    print(f"\nwritten: {target}")
    if target.resolve() != default_tuned_path().resolve():
        print(f"use it with: l2o benchmark --tuned {target} ...  (the packaged settings, {default_tuned_path()}, "
              f"are unchanged; --write {default_tuned_path()} replaces them)")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from l2o.data import DatasetError, data_search_path, dataset_names, load_dataset

    from l2o.data.base import DataNotFoundError

    print("search path:", ", ".join(str(p) for p in data_search_path(args.data_dir)))
    status = 0
    for name in args.names or dataset_names():
        try:
            ds = load_dataset(name, split="train", data_dir=args.data_dir, progress=not args.quiet, download=args.download)
            print(f"  {name:16s} ok   {ds.description}")
        except DataNotFoundError as e:  # absent: fine unless it was asked for by name
            first = str(e).splitlines()[0]
            print(f"  {name:16s} --   {first}")
            status = 1 if args.names else status
        except DatasetError as e:  # found but corrupt or failing its checksum: always a failure
            first = str(e).splitlines()[0]
            print(f"  {name:16s} BAD  {first}")
            status = 1
    if status:
        print("some datasets are missing or failed verification (see above)", file=sys.stderr)
    return status


def cmd_list(args: argparse.Namespace) -> int:
    from l2o.baselines.registry import get_optimizer, optimizer_names
    from l2o.tasks.registry import META_TRAINING_TASK
    from l2o.tasks.synthetic import FAMILIES

    print("optimizers:")
    for n in optimizer_names():
        e = get_optimizer(n)
        kind = "learned" if e.learned else "hand-designed"
        print(f"  {n:10s} {e.display:20s} {kind:14s} tuned: {', '.join(e.grid) or '-'}")
    print("\ntasks:  DATASET:IN-HIDDEN:bBATCH[:pSEED]   e.g. " + META_TRAINING_TASK + " (the meta-training objective)")
    print("        FAMILY/SPLIT/INDEX                 families: " + ", ".join(FAMILIES))
    print("\npresets: " + ", ".join(PRESETS))
    return 0


def _meta_train_l2l(args: argparse.Namespace) -> int:
    """Meta-train the L2LBGDBGD LSTM optimizer (Andrychowicz et al. 2016)."""
    import shlex

    from l2o.outer.meta_l2l import MetaL2LConfig, meta_train

    overrides = {"data_dir": args.data_dir, "episodes": args.episodes}
    if args.config:
        config = MetaL2LConfig.from_file(Path(args.config), **overrides)
    else:
        config = MetaL2LConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out or "runs/meta-train-l2l")
    words = ["l2o", "meta-train", "l2l"] + (["--config", args.config] if args.config else []) + ["--out", str(out)]
    if args.episodes is not None:
        words += ["--episodes", str(args.episodes)]
    if args.data_dir:
        words += ["--data-dir", args.data_dir]
    result = meta_train(config, out, resume=args.resume, progress=not args.quiet, command=shlex.join(words))
    last = [r["meta_loss"] for r in result.log[-10:] if r["meta_loss"] is not None]
    print(f"episodes: {len(result.log)}  wall: {result.wall_s:.1f} s  "
          f"meta-loss (mean of last {len(last)}): {sum(last) / max(1, len(last)):.4f}")
    for name, path in (("checkpoint", result.checkpoint), ("weights", result.policy), ("log", result.log_file)):
        print(f"{name}: {path}")
    return 0


def _meta_executor(args: argparse.Namespace) -> Any:
    """Where GPS's trajectories run: in this process (no --backend), or on an executor of
    :mod:`l2o.execution` (same results; closed when training ends)."""
    import contextlib

    if args.backend is None:
        return contextlib.nullcontext(None)
    from l2o.execution import make_executor

    return make_executor(args.backend, _jobs(args, args.backend, args.address), args.address)


def _meta_train_psd(args: argparse.Namespace) -> int:
    """Meta-train Predicted Step Descent with Convolutional GPS (Li & Malik 2017)."""
    import shlex

    from l2o.outer.gps.conv_trainer import ConvGPSConfig
    from l2o.outer.meta_psd import meta_train

    overrides = {"data_dir": args.data_dir, "iterations": args.iterations}
    if args.config:
        config = ConvGPSConfig.from_file(Path(args.config), **overrides)
    else:
        config = ConvGPSConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out or "runs/meta-train-psd")
    words = ["l2o", "meta-train", "psd"] + (["--config", args.config] if args.config else []) + ["--out", str(out)]
    if args.iterations is not None:
        words += ["--iterations", str(args.iterations)]
    if args.data_dir:
        words += ["--data-dir", args.data_dir]
    with _meta_executor(args) as executor:
        result = meta_train(config, out, resume=args.resume, progress=not args.quiet, command=shlex.join(words),
                            executor=executor)
    best = min((r["pi_auc"] for r in result.log if r["pi_auc"] is not None), default=float("nan"))
    print(f"iterations: {len(result.log)}  wall: {result.wall_s:.1f} s  best held-out π AUC: {best:.4f}")
    for name, path in (("checkpoint", result.checkpoint), ("policy", result.policy), ("log", result.log_file)):
        print(f"{name}: {path}")
    return 0


def _meta_train_gps2016(args: argparse.Namespace) -> int:
    """Meta-train the Learning to Optimize (2016) policy with (multi-condition) GPS."""
    import json
    import shlex
    import time

    from l2o.experiments.benchmark import load_config_file
    from l2o.outer.meta_gps2016 import LTO2016Config, meta_train

    config = LTO2016Config.from_dict(load_config_file(Path(args.config)) if args.config else {})
    out = Path(args.out or "runs/meta-train-gps2016")
    words = ["l2o", "meta-train", "gps2016"] + (["--config", args.config] if args.config else []) + ["--out", str(out)]
    if args.iterations is not None:
        words += ["--iterations", str(args.iterations)]
    t0 = time.perf_counter()
    with _meta_executor(args) as executor:
        policy = meta_train(config, out, resume=args.resume, progress=not args.quiet, iterations=args.iterations,
                            command=shlex.join(words), executor=executor)
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    if logs:
        r = logs[-1]
        print(f"GPS iterations: {len(logs)}  wall (this call): {time.perf_counter() - t0:.1f} s  "
              f"last ψ cost: {r['psi_cost']:.4g}  last π cost: {r['pi_cost']}")
    print(f"policy: {policy}\nlog: {out / 'log.jsonl'}")
    return 0


def _meta_train_mlp_lopt(args: argparse.Namespace) -> int:
    """Meta-train the per-coordinate MLP optimizer with Persistent ES (l2o.outer)."""
    from l2o.outer.meta_mlp_lopt import cli_run

    return cli_run(args)


def _meta_train_psd_pes(args: argparse.Namespace) -> int:
    """Meta-train PSD's LSTM with Persistent ES (l2o.outer), from a PSD checkpoint."""
    from l2o.outer.meta_psd_pes import cli_run

    return cli_run(args)


META_TRAINERS = {"l2l": _meta_train_l2l, "psd": _meta_train_psd, "gps2016": _meta_train_gps2016,
                 "mlp-lopt": _meta_train_mlp_lopt, "psd-pes": _meta_train_psd_pes}
"""``l2o meta-train METHOD``: one entry per meta-trained optimizer."""


META_TRAIN_FLAGS = {"l2l": {"episodes", "data_dir"}, "psd": {"iterations", "data_dir", "backend", "address", "jobs"},
                    "gps2016": {"iterations", "backend", "address", "jobs"}, "mlp-lopt": {"iterations", "data_dir"},
                    "psd-pes": {"iterations", "data_dir"}}
"""Which of the optional meta-train flags each method uses (any other given is an error)."""


def cmd_meta_train(args: argparse.Namespace) -> int:
    allowed = META_TRAIN_FLAGS.get(args.method)
    if allowed is not None:
        for flag in ("episodes", "iterations", "data_dir", "backend", "address", "jobs"):
            if getattr(args, flag, None) is not None and flag not in allowed:
                raise ValueError(f"--{flag.replace('_', '-')} does not apply to meta-train {args.method} "
                                 f"(it takes {', '.join('--' + f.replace('_', '-') for f in sorted(allowed))})")
    if args.backend is not None or args.address is not None:
        _check_backend(args.backend or "local", args.address)
    if allowed is not None:
        out = Path(args.out or f"runs/meta-train-{args.method}")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        if not args.resume and out.is_dir() and any(out.glob("*.safetensors")):
            raise ValueError(f"--out {out} already holds a meta-training run: pass --resume to continue it, "
                             "or choose another --out")
        _usable_out(out)
    try:
        return META_TRAINERS[args.method](args)
    except KeyboardInterrupt:
        print("\ninterrupted: every finished episode is checkpointed; rerun with --resume to continue", file=sys.stderr)
        return 130


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Regenerate the paper's Figures 1-5 and table (issue 6)."""
    import shlex

    from l2o.experiments.reproduce import ReproduceConfig, reproduce

    backend = args.backend or "local"
    _check_backend(backend, args.address)
    words = ["l2o", "reproduce"] + (["--quick"] if args.quick else [])
    for flag, v in (("--jobs", args.jobs), ("--seeds", args.seeds), ("--out", args.out), ("--doc", args.doc),
                    ("--data-dir", args.data_dir), ("--backend", args.backend),
                    ("--address", args.address)):
        if v is not None:
            words += [flag, str(v)]
    words += ["--skip-missing"] if args.skip_missing else []
    words += ["--optimizers", *args.optimizers] if args.optimizers else []
    config = ReproduceConfig(quick=args.quick, seeds=args.seeds, jobs=_jobs(args, backend, args.address),
                             data_dir=args.data_dir, skip_missing=args.skip_missing, command=shlex.join(words),
                             backend=backend,
                             address=args.address,
                             **({"optimizers": tuple(args.optimizers)} if args.optimizers else {}))
    out = Path(args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    doc = Path(args.doc) if args.doc else (out / "REPRODUCTION.md" if args.quick else Path("docs/REPRODUCTION.md"))
    report = reproduce(config, out, doc, progress=not args.quiet)
    for name, by_metric in report.scorecard.items():
        for metric, c in by_metric.items():
            print(f"{name:10s} {metric:5s}: {c['win']} win, {c['tie']} tie, {c['loss']} loss, {c['absent']} absent")
    for k, p in report.files.items():
        print(f"{k}: {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2o", description="Learned optimizers (Li & Malik 2016, 2017).")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("benchmark", help="run optimizers on tasks for several seeds; write table and figure")
    b.add_argument("--preset", choices=sorted(PRESETS))
    b.add_argument("--config", help="TOML/JSON file with BenchmarkConfig fields")
    b.add_argument("--tasks", nargs="+", help="task specs, e.g. mnist:48-48:b64; ranges like logreg/test/0-99 expand")
    b.add_argument("--optimizers", nargs="+", help="optimizer specs, e.g. adam or adam:lr=0.001 (default: the 7 tuned baselines)")
    b.add_argument("--seeds", type=positive_int)
    b.add_argument("--iterations", type=positive_int)
    b.add_argument("--tuned", help="tuned-settings file (default: the one shipped with l2o)")
    b.add_argument("--title")
    b.add_argument("--out", help="output folder (default runs/<preset>); rerunning resumes")
    _add_common(b)
    _add_backend(b)
    b.set_defaults(func=cmd_benchmark)

    t = sub.add_parser("tune", help="grid-search the baselines' hyperparameters on the meta-training objective")
    t.add_argument("--config", help="TOML/JSON file with TuningConfig fields")
    t.add_argument("--task", nargs="+", help="task spec(s) to tune on; ranges like logreg/train/0-89 expand")
    t.add_argument("--optimizers", nargs="+")
    t.add_argument("--seeds", type=positive_int)
    t.add_argument("--iterations", type=positive_int)
    t.add_argument("--criterion", choices=["auc", "final"])
    t.add_argument("--out", default="runs/tuning", help="folder for the grid's run records (resumable)")
    t.add_argument("--write", help="where to write the tuned settings (default OUT/tuned.json; the packaged "
                   "l2o/baselines/tuned.json is replaced only when named here)")
    _add_common(t)
    _add_backend(t)
    t.set_defaults(func=cmd_tune)

    d = sub.add_parser("data", help="show which datasets are found where (and verify them)")
    d.add_argument("names", nargs="*")
    d.add_argument("--download", action="store_true", help="download missing datasets from the official sources")
    _add_common(d)
    d.set_defaults(func=cmd_data)

    mt = sub.add_parser("meta-train", help="meta-train a learned optimizer (resumable; checkpoint after every episode)")
    mt.add_argument("method", choices=sorted(META_TRAINERS), help="l2l: Andrychowicz et al. 2016 (L2LBGDBGD); psd: Predicted Step Descent (Convolutional GPS); "
                    "gps2016: Learning to Optimize (Li & Malik 2016) with GPS; mlp-lopt: per-coordinate MLP by Persistent ES; "
                    "psd-pes: PSD's LSTM by Persistent ES")
    mt.add_argument("--config", help="TOML/JSON file with the method's config fields, e.g. configs/l2l.toml")
    mt.add_argument("--out", help="output folder (default runs/meta-train-METHOD)")
    mt.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    mt.add_argument("--episodes", type=positive_int, help="l2l: override the config's number of episodes")
    mt.add_argument("--iterations", type=positive_int, help="psd, gps2016: override the config's number of GPS iterations; mlp-lopt, psd-pes: of PES outer steps")
    mt.add_argument("--data-dir", default=None, help="l2l, psd, mlp-lopt, psd-pes: dataset root (also env L2O_DATA_DIR)")
    mt.add_argument("--jobs", type=positive_int, default=None,
                    help="psd, gps2016 with --backend: trajectories in flight at once (default: all CPUs)")
    _add_backend(mt)
    mt.add_argument("--quiet", action="store_true", help="no progress bar")
    mt.set_defaults(func=cmd_meta_train)

    rp = sub.add_parser("reproduce", help="regenerate the 2017 paper's Figures 1-5 and table (resumable)")
    rp.add_argument("--quick", action="store_true", help="same code on a small grid (bundled digits, T/40, 2 seeds)")
    rp.add_argument("--seeds", type=positive_int, help="seeds per cell (default 5; 2 with --quick)")
    rp.add_argument("--out", help="folder for run records and outputs (default runs/reproduce[-quick]); rerunning resumes")
    rp.add_argument("--doc", help="document to write (default docs/REPRODUCTION.md; with --quick OUT/REPRODUCTION.md)")
    rp.add_argument("--skip-missing", action="store_true",
                    help="run the rest when an optimizer cannot run (e.g. weights missing) and mark it absent")
    rp.add_argument("--optimizers", nargs="+", help="optimizer specs to run (default: the paper's nine and the learned optimizers beyond the paper, l2o.experiments.reproduce.OPTIMIZERS)")
    _add_common(rp)
    _add_backend(rp)
    rp.set_defaults(func=cmd_reproduce)

    ls = sub.add_parser("list", help="list optimizers, task grammar and presets")
    ls.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from l2o.data import DatasetError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are saved; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
            DatasetError) as e:
        print(f"l2o {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
