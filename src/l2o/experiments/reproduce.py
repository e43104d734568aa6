"""``l2o reproduce``: regenerate Figures 1–5 of Li & Malik (2017) and a table of their numbers.

The grid is the paper's §4 evaluation: five settings (one per figure: 48-48 or 100-200 MLP, batch
64 or 10, T = 400 or 800) × three datasets (TFD, CIFAR-10, CIFAR-100, or the best real stand-ins
found here) × optimizers (the paper's nine: seven tuned baselines, L2LBGDBGD, Predicted Step Descent;
then the learned optimizers beyond the paper: the default PSD and issue 12's policy × meta-trainer 2 × 2) ×
several seeds. Runs go through the benchmark harness (:func:`~l2o.experiments.benchmark.run_grid`:
spawned worker processes, one atomic record per run, resume skips finished runs). Each figure's
runs live in their own folder (``OUT/figN/runs/...``) because Figures 2 and 5 share a task and
differ only in T.

Outputs, all generated: one figure per paper figure (a panel per dataset, mean true objective
with a shaded 95% t-interval over seeds, against iteration and, in a second row, against
wall-clock seconds), ``summary.csv`` (with time to target), a scorecard, and a Markdown document
(default ``docs/REPRODUCTION.md``) that embeds them with the command, versions and wall time.

The scorecard rule (also stated in the document): in each cell (figure × dataset) and for each
metric (final objective f(x_T), AUC = mean f over iterations 1..T), optimizers are ranked as in
:func:`l2o.experiments.summary.rank_key` (any diverged seed ranks behind every optimizer with none,
then lower mean is better). An optimizer **wins** when it ranks first and its 95% interval lies
entirely below the runner-up's (or the runner-up diverged on some seed and it did not); it
**ties** when it ranks first without such a margin, or ranks lower but its interval overlaps the
first's (and it did not diverge where the first did not); otherwise it **loses**. Each learned
optimizer is ranked among :data:`COMPARISON` (the paper's seven baselines and L2LBGDBGD) and itself,
not among the other learned optimizers beyond the paper.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from l2o.baselines.registry import (
    BASELINES,
    OptimizerSpec,
    get_optimizer,
    parse_optimizer,
)
from l2o.execution import Executor, check_backend, describe_execution, make_executor
from l2o.experiments.benchmark import environment, run_grid
from l2o.experiments.runner import RunResult
from l2o.experiments.store import RunKey, slug, write_json_atomic
from l2o.experiments.summary import TARGET_RULE, CellStats, rank_key, summarize, to_target_text

CAPTION_TAIL = "The vertical axis is the true objective value and the horizontal axis represents the iteration."


@dataclass(frozen=True)
class Setting:
    """One paper figure: the MLP architecture, mini-batch size and horizon T."""

    figure: int
    input_dim: int
    hidden: int
    batch: int
    iterations: int
    caption: str  # the paper's caption, verbatim up to the axis sentence

    @property
    def label(self) -> str:
        return f"{self.input_dim}-{self.hidden} MLP, batch {self.batch}, T = {self.iterations}"

    def task(self, slot: DatasetSlot) -> str:
        spec = f"{slot.dataset}:{self.input_dim}-{self.hidden}:b{self.batch}"
        return spec if slot.projection_seed == 0 else f"{spec}:p{slot.projection_seed}"


SETTINGS: tuple[Setting, ...] = (
    Setting(1, 48, 48, 64, 400, "Comparison of the various hand-engineered and learned algorithms on training neural nets "
            "with 48 input and hidden units on (a) TFD, (b) CIFAR-10 and (c) CIFAR-100 with mini-batches of size 64."),
    Setting(2, 100, 200, 64, 400, "Comparison of the various hand-engineered and learned algorithms on training neural "
            "nets with 100 input units and 200 hidden units on (a) TFD, (b) CIFAR-10 and (c) CIFAR-100 with "
            "mini-batches of size 64."),
    Setting(3, 48, 48, 10, 400, "Comparison of the various hand-engineered and learned algorithms on training neural nets "
            "with 48 input and hidden units on (a) TFD, (b) CIFAR-10 and (c) CIFAR-100 with mini-batches of size 10."),
    Setting(4, 100, 200, 10, 400, "Comparison of the various hand-engineered and learned algorithms on training neural "
            "nets with 100 input units and 200 hidden units on (a) TFD, (b) CIFAR-10 and (c) CIFAR-100 with "
            "mini-batches of size 10."),
    Setting(5, 100, 200, 64, 800, "Comparison of the various hand-engineered and learned algorithms on training neural "
            "nets with 100 input units and 200 hidden units on (a) TFD, (b) CIFAR-10 and (c) CIFAR-100 for 800 "
            "iterations with mini-batches of size 64."),
)
"""The five settings of the paper's Figures 1–5 (captions from the paper)."""


@dataclass(frozen=True)
class DatasetSlot:
    """One dataset column of the paper (``paper``), filled by ``dataset`` (a name of
    :func:`l2o.data.load_dataset`); ``original`` is the loader name of the paper's own dataset,
    so anything else is reported as a stand-in."""

    paper: str
    dataset: str
    original: str
    projection_seed: int = 0


DATASETS: tuple[DatasetSlot, ...] = (
    DatasetSlot("TFD", "faces", "tfd"),  # TFD if present, else FER2013 as its stand-in
    DatasetSlot("CIFAR-10", "cifar10", "cifar10"),
    DatasetSlot("CIFAR-100", "cifar100", "cifar100"),
)
QUICK_DATASETS: tuple[DatasetSlot, ...] = tuple(
    DatasetSlot(s.paper, "digits", s.original, projection_seed=i + 1) for i, s in enumerate(DATASETS)
)
"""``--quick``: scikit-learn's bundled digits (no download) in every slot, each with its own
random projection so the three panels are three different problems."""

PAPER_LEARNED: tuple[str, ...] = ("l2lbgdbgd", "psd-paper")
"""The paper's two learned optimizers: L2LBGDBGD and its own Predicted Step Descent."""
TWO_BY_TWO: dict[tuple[str, str], str] = {
    ("PSD's LSTM", "Convolutional GPS"): "psd-gps",
    ("PSD's LSTM", "Persistent ES"): "psd-pes",
    ("per-coordinate MLP", "Convolutional GPS"): "mlp-lopt-gps",
    ("per-coordinate MLP", "Persistent ES"): "mlp-lopt",
}
"""Issue 12's comparison: {policy} × {meta-trainer}, each cell a shipped optimizer; all four are
meta-trained on the same objective (``mnist:48-48:b64``, T = 400) and read scale-free features
(the paper's PSD, ``psd-paper``, is GPS × LSTM on the paper's features)."""
BEYOND: dict[str, str] = {
    "psd": "l2o's default PSD (issue 11): an AdaGrad-started base step plus the LSTM's correction on "
           "scale-free features, meta-trained by Persistent ES",
    **{name: f"{policy} meta-trained by {trainer}" for (policy, trainer), name in TWO_BY_TWO.items()},
}
"""The learned optimizers beyond the paper, with what each is."""
LEARNED: tuple[str, ...] = PAPER_LEARNED + tuple(BEYOND)
OPTIMIZERS: tuple[str, ...] = BASELINES + LEARNED
"""The paper's nine (seven tuned hand-designed baselines, L2LBGDBGD, Predicted Step Descent), then
the learned optimizers beyond the paper (:data:`BEYOND`: the default ``psd`` and the 2 × 2)."""
COMPARISON: tuple[str, ...] = BASELINES + ("l2lbgdbgd",)
"""What every learned optimizer is scored against: the paper's comparison set (the seven tuned
hand-designed baselines and L2LBGDBGD), never the other l2o variants, so that a row's verdicts do
not depend on which sibling rows the grid happens to list."""

QUICK_SEEDS = 2
QUICK_DIVISOR = 40  # --quick runs T/40 iterations (10, or 20 for Figure 5)


class MissingOptimizerError(ValueError):
    """An optimizer of the grid cannot be built here (unregistered, or its weights are missing)."""


@dataclass(frozen=True)
class ReproduceConfig:
    quick: bool = False
    seeds: int | None = None  # None: 5 (2 with quick)
    jobs: int | None = 1  # worker processes (local) / CPUs of the local Ray instance; None = all CPUs
    data_dir: str | None = None
    optimizers: tuple[str, ...] = OPTIMIZERS
    skip_missing: bool = False
    tuned: str | None = None  # tuned-settings file; None = the one shipped with l2o
    settings: tuple[Setting, ...] = SETTINGS
    command: str = "l2o reproduce"
    backend: str = "local"  # where runs execute: "local" or "ray" (see l2o.execution)
    address: str | None = None  # Ray cluster address (backend "ray" only)

    def __post_init__(self) -> None:
        if self.n_seeds < 2:
            raise ValueError(f"reproduce needs at least 2 seeds for its 95% intervals, got {self.n_seeds}")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        check_backend(self.backend, self.jobs, self.address)
        if not self.optimizers:
            raise ValueError("reproduce needs at least one optimizer")

    @property
    def n_seeds(self) -> int:
        return self.seeds if self.seeds is not None else (QUICK_SEEDS if self.quick else 5)

    def grid_settings(self) -> tuple[Setting, ...]:
        if not self.quick:
            return self.settings
        return tuple(dataclasses.replace(s, iterations=max(2, s.iterations // QUICK_DIVISOR)) for s in self.settings)

    def slots(self) -> tuple[DatasetSlot, ...]:
        return QUICK_DATASETS if self.quick else DATASETS


# ---------------------------------------------------------------- optimizers


@dataclass
class OptimizerStatus:
    name: str  # the registry name (``psd`` for ``psd:checkpoint=...``)
    spec: OptimizerSpec | None
    display: str
    reason: str | None = None  # why it cannot run; None = available
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    text: str = ""  # as given

    @property
    def available(self) -> bool:
        return self.reason is None


def _sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _base(text: str) -> str:
    return text.split(":", 1)[0].strip()


def check_optimizers(names: Sequence[str], tuned: str | None = None) -> list[OptimizerStatus]:
    """Resolve every name (tuned hyperparameters for bare baseline names) and build it once on a
    dummy parameter, so an optimizer that cannot run (unknown, weights missing, no tuned
    setting) is found before any run starts, with the reason."""
    import torch

    from l2o.baselines.tuned import load_tuned

    out = []
    tuned_settings = None
    for text in names:
        display = text
        try:
            spec = parse_optimizer(text)
            entry = get_optimizer(spec.name)
            display = entry.display
            if not spec.hparams and ":" not in text and not entry.learned:
                tuned_settings = tuned_settings or load_tuned(tuned)
                spec = tuned_settings.spec(spec.name)
            opt = spec.build([torch.zeros(3, requires_grad=True)])
        except (ValueError, OSError) as e:  # unknown name, bad or missing weights or settings: "cannot run";
            # anything else (TypeError, AttributeError, ...) is a bug and propagates
            out.append(OptimizerStatus(_base(text), None, display, f"{type(e).__name__}: {e}", text=text))
            continue
        ckpt = getattr(opt, "checkpoint", None)
        ckpt = str(ckpt) if ckpt is not None else None
        out.append(OptimizerStatus(spec.name, spec, display, None, ckpt, _sha256(ckpt) if ckpt else None, text))
    return out


# ---------------------------------------------------------------- scorecard


def _mean_ci(c: CellStats, metric: str) -> tuple[float, float]:
    m, ci = (c.final_mean, c.final_ci) if metric == "final" else (c.auc_mean, c.auc_ci)
    return m, (ci if math.isfinite(ci) else 0.0)


def judge(cells: Sequence[CellStats], target: str, metric: str = "final") -> str:
    """``"win"``, ``"tie"``, ``"loss"`` or ``"absent"`` for optimizer ``target`` (its name, the part
    of the spec before ``:``) among the optimizers of one cell; the rule is the module docstring's."""
    mine = [c for c in cells if c.optimizer.split(":", 1)[0] == target]
    if not mine:
        return "absent"
    t = mine[0]
    tm, tci = _mean_ci(t, metric)
    if not math.isfinite(tm):
        return "loss"
    ranked = sorted(cells, key=lambda c: rank_key(c, metric))
    best = ranked[0]
    if best is t:
        if len(ranked) == 1:
            return "win"
        ru = ranked[1]
        rm, rci = _mean_ci(ru, metric)
        if (ru.diverged and not t.diverged) or not math.isfinite(rm):
            return "win"
        return "win" if tm + tci < rm - rci else "tie"
    if t.diverged and not best.diverged:
        return "loss"
    bm, bci = _mean_ci(best, metric)
    return "tie" if tm - tci <= bm + bci else "loss"


# ---------------------------------------------------------------- running


@dataclass
class Cell:
    setting: Setting
    slot: DatasetSlot
    task: str
    results: list[RunResult]
    stats: list[CellStats]


@dataclass
class ReproduceReport:
    cells: list[Cell]
    optimizers: list[OptimizerStatus]
    out: Path
    doc: Path
    files: dict[str, Path] = field(default_factory=dict)
    scorecard: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)


def _dataset_info(slots: Sequence[DatasetSlot], data_dir: str | None) -> dict[str, dict[str, Any]]:
    """Load each slot's dataset once (fails early, with the loader's message, if it is missing)."""
    from l2o.data import load_dataset

    info = {}
    for s in slots:
        ds = load_dataset(s.dataset, split="train", data_dir=data_dir, progress=False)
        n = len(ds.labels)
        stand_in = ds.name != s.original
        short = f"{ds.name} ({n:,} images{', subset' if ds.is_subset else ''}{', stand-in' if stand_in else ''})"
        if s.projection_seed:
            short += f", projection {s.projection_seed}"
        info[s.paper] = {"loader": s.dataset, "name": ds.name, "images": n, "classes": ds.num_classes,
                         "is_subset": ds.is_subset, "stand_in": stand_in, "description": ds.description,
                         "short": short}
    return info


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=here,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + (", with uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


class CorruptManifestError(ValueError):
    """OUT/manifest.json exists but is not a JSON object of this tool."""


def _load_manifest(path: Path) -> dict[str, Any]:
    """The provenance of earlier invocations into this output folder ({} for a new one); a file that
    does not parse, or holds anything but a JSON object, is an error (never silently replaced)."""
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptManifestError(f"{path} is corrupt ({e}); restore it, or delete it to start the provenance "
                                   "record afresh (the run records in that folder are kept)") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("invocations", []), list):
        raise CorruptManifestError(f"{path} is not a reproduction manifest (expected a JSON object with a list of "
                                   "invocations); restore it, or delete it to start the provenance record afresh")
    return manifest


def reproduce(config: ReproduceConfig, out: Path, doc: Path | None = None, progress: bool = True,
              log: Callable[[str], None] = print, executor: Executor | None = None) -> ReproduceReport:
    """Run (or resume) the grid, then write figures, tables, scorecard and the document. Runs
    execute on ``executor`` if given, else on one made from config's backend, shared by the
    figures and closed at the end."""
    out = Path(out)
    doc = Path(doc) if doc is not None else out / "REPRODUCTION.md"
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()

    statuses = check_optimizers(config.optimizers, config.tuned)
    missing = [s for s in statuses if not s.available]
    if missing:
        lines = "\n".join(f"  {s.text}: {s.reason}" for s in missing)
        if not config.skip_missing:
            raise MissingOptimizerError(
                f"{len(missing)} optimizer(s) of the grid cannot run here:\n{lines}\n"
                "Provide them (e.g. ship the learned optimizer's weights), or pass --skip-missing to run the "
                "rest and mark them absent in the document.")
        log(f"l2o reproduce: WARNING: skipping {len(missing)} optimizer(s) that cannot run; "
            f"they are marked absent in the document:\n{lines}")
    ready = [s for s in statuses if s.available]
    if not ready:
        raise MissingOptimizerError("no optimizer of the grid can run here")

    manifest_path = out / "manifest.json"
    manifest = _load_manifest(manifest_path)
    digests = {str(s.spec): s.checkpoint_sha256 for s in ready if s.checkpoint_sha256}
    for name, old in (manifest.get("checkpoints") or {}).items():
        if name in digests and old and digests[name] != old:
            raise ValueError(
                f"the weights of {name!r} changed since the runs in {out} were made (sha256 {old[:12]}… → "
                f"{digests[name][:12]}…): delete {out}/fig*/runs/*/{slug(name)} or use a new --out")

    if digests:  # recorded before any run, so an interrupted first invocation is guarded too
        write_json_atomic(manifest_path, {**manifest, "checkpoints": {**(manifest.get("checkpoints") or {}),
                                                                      **digests}})
    slots = config.slots()
    data = _dataset_info(slots, config.data_dir)
    settings = config.grid_settings()
    keys_by_fig: dict[int, list[RunKey]] = {}
    for st in settings:
        keys_by_fig[st.figure] = [RunKey(st.task(slot), s.spec, seed, st.iterations)  # type: ignore[arg-type]
                                  for slot in slots for s in ready for seed in range(config.n_seeds)]
    total = sum(len(k) for k in keys_by_fig.values())
    before = sum(1 for st in settings for k in keys_by_fig[st.figure] if k.path(out / f"fig{st.figure}").exists())
    log(f"l2o reproduce: {len(settings)} figures × {len(slots)} datasets × {len(ready)} optimizers × "
        f"{config.n_seeds} seeds = {total} runs ({before} already stored in {out}); runs execute in "
        f"{describe_execution(config.backend, config.jobs, config.address)}")

    cells: list[Cell] = []
    owned = executor is None and before < total
    if owned:
        executor = make_executor(config.backend, config.jobs, config.address)
    try:
        for st in settings:
            results = run_grid(keys_by_fig[st.figure], out / f"fig{st.figure}", config.jobs, config.data_dir,
                               progress, desc=f"Figure {st.figure} ({st.label})", backend=config.backend,
                               address=config.address, executor=executor)
            for slot in slots:
                task = st.task(slot)
                rs = [r for r in results if r.task == task]
                cells.append(Cell(st, slot, task, rs, summarize(rs)))
    finally:
        if owned and executor is not None:
            executor.close()
    wall = time.perf_counter() - t0
    _check_weights_unchanged(ready, digests, out)

    figdir = doc.parent / "figures" / "reproduction"
    files: dict[str, Path] = {}
    for st in settings:
        files[f"figure{st.figure}"] = _plot_figure(st, [c for c in cells if c.setting.figure == st.figure],
                                                   statuses, data, config, figdir / f"figure{st.figure}.png")
    files["csv"] = _write_csv(cells, out / "summary.csv")
    scorecard = {name: scorecard_counts(cells, name) for name in _learned_names(config.optimizers)}
    write_json_atomic(out / "scorecard.json", {"rule": SCORECARD_RULE, "scorecard": scorecard,
                                               "cells": _cell_verdicts(cells, [n for n in scorecard])})
    files["scorecard"] = out / "scorecard.json"

    runs_executed = total - before
    invocations = list(manifest.get("invocations") or [])
    invocations.append({"started": started.isoformat(timespec="seconds"), "wall_s": round(wall, 1),
                        "runs_executed": runs_executed, "command": config.command})
    manifest = {
        "config": {"quick": config.quick, "seeds": config.n_seeds, "jobs": config.jobs, "backend": config.backend,
                   "address": config.address, "data_dir": config.data_dir,
                   "optimizers": list(config.optimizers), "skip_missing": config.skip_missing, "tuned": config.tuned},
        "settings": [dataclasses.asdict(s) for s in settings],
        "datasets": data,
        "optimizers": [{"name": s.text, "spec": str(s.spec) if s.spec else None, "reason": s.reason,
                        "checkpoint": s.checkpoint, "checkpoint_sha256": s.checkpoint_sha256} for s in statuses],
        "checkpoints": {**(manifest.get("checkpoints") or {}), **digests},
        "environment": environment(),
        "git": _git_revision(),
        "invocations": invocations,
        "run_time_s_total": sum(r.wall_time_s for c in cells for r in c.results),
    }
    write_json_atomic(manifest_path, manifest)
    files["manifest"] = manifest_path
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render_document(cells, statuses, data, config, manifest, files, doc, scorecard))
    files["doc"] = doc
    return ReproduceReport(cells, statuses, out, doc, files, scorecard)


# ---------------------------------------------------------------- outputs

SCORECARD_RULE = (
    "In each cell (figure × dataset) and for each metric, optimizers are ranked with any diverged seed "
    "behind every optimizer without one, then by lower mean. An optimizer wins the cell when it ranks first and "
    "its 95% interval lies entirely below the runner-up's (or the runner-up diverged on some seed and it did not); "
    "it ties when it ranks first without that margin, or ranks lower but its interval overlaps the first's "
    "(and it did not diverge where the first did not); otherwise it loses. Non-overlap of two 95% intervals is a "
    "conservative test, so a win is a clear win. Each learned optimizer is ranked among the paper's comparison set "
    "— the seven tuned hand-designed baselines and L2LBGDBGD — and itself, not among the other learned optimizers "
    "beyond the paper (so a row's verdicts do not depend on which sibling rows are listed; the tables below show "
    "every row).")


def _check_weights_unchanged(ready: Sequence[OptimizerStatus], digests: dict[str, str], out: Path) -> None:
    """Refuse to summarise runs if a weight file changed while the grid ran: workers load the file
    when they start a run, so the stored runs could mix two sets of weights."""
    changed = [str(s.spec) for s in ready if s.checkpoint and str(s.spec) in digests
               and _sha256(s.checkpoint) != digests[str(s.spec)]]
    if changed:
        raise ValueError(
            f"the weights of {', '.join(map(repr, changed))} changed while the grid ran, so its stored runs may mix "
            f"two sets of weights; delete {out}/fig*/runs/*/" + "{" + ",".join(slug(n) for n in changed) + "}"
            " (or use a new --out) and rerun")


def _learned_names(texts: Sequence[str]) -> list[str]:
    """The learned optimizers among ``texts`` (registry names, in order, once each): the ones scored."""
    names = []
    for text in texts:
        name = _base(text)
        try:
            learned = get_optimizer(name).learned
        except ValueError:  # unknown: reported as absent, not scored
            continue
        if learned and name not in names:
            names.append(name)
    return names


def rivals(stats: Sequence[CellStats], name: str) -> list[CellStats]:
    """The part of one cell that optimizer ``name`` is judged in: itself and :data:`COMPARISON`."""
    return [c for c in stats if _base(c.optimizer) in COMPARISON or _base(c.optimizer) == name]


def verdict(stats: Sequence[CellStats], name: str, metric: str) -> str:
    """:func:`judge` of ``name`` among its :func:`rivals` in one cell: the scorecard's verdict."""
    return judge(rivals(stats, name), name, metric)


def scorecard_counts(cells: Sequence[Cell], name: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for metric in ("final", "auc"):
        counts = {"win": 0, "tie": 0, "loss": 0, "absent": 0}
        for c in cells:
            counts[verdict(c.stats, name, metric)] += 1
        out[metric] = counts
    return out


def _cell_verdicts(cells: Sequence[Cell], names: Sequence[str]) -> list[dict[str, Any]]:
    return [{"figure": c.setting.figure, "dataset": c.slot.paper, "task": c.task, "iterations": c.setting.iterations,
             **{f"{n}_{m}": verdict(c.stats, n, m) for n in names for m in ("final", "auc")}} for c in cells]


def _write_csv(cells: Sequence[Cell], path: Path) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["figure", "dataset", "task", "iterations"] + [f.name for f in dataclasses.fields(CellStats)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for c in cells:
            for s in c.stats:
                w.writerow([c.setting.figure, c.slot.paper, c.task, c.setting.iterations,
                            *dataclasses.astuple(s)])
    return path


def _plot_figure(st: Setting, cells: Sequence[Cell], statuses: Sequence[OptimizerStatus], data: dict[str, Any],
                 config: ReproduceConfig, path: Path) -> Path:
    from l2o.experiments.plots import plot_benchmark

    order = {str(s.spec): i for i, s in enumerate(statuses) if s.spec is not None}
    labels = {str(s.spec): s.display for s in statuses if s.spec is not None}
    shown = []
    for letter, c in zip("abcdefghij", cells):
        title = f"({letter}) {c.slot.paper}: {data[c.slot.paper]['short']}"
        shown += [dataclasses.replace(r, task=title) for r in sorted(c.results, key=lambda r: order.get(r.optimizer, 99))]
    title = (f"Figure {st.figure} reproduced{' (--quick)' if config.quick else ''}: {st.label}; mean true objective "
             f"over {config.n_seeds} seeds, shaded 95% t-interval")
    return plot_benchmark(shown, path, title=title, labels=labels)


def _num(v: float) -> str:
    if not math.isfinite(v):
        return "—"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.3e}"


def _entry(c: CellStats | None, metric: str, bold: bool) -> str:
    if c is None:
        return "absent"
    m, ci = (c.final_mean, c.final_ci) if metric == "final" else (c.auc_mean, c.auc_ci)
    text = _num(m) if not math.isfinite(ci) else f"{_num(m)} ± {_num(ci)}"
    if bold:
        text = f"**{text}**"
    if c.diverged:
        text += f" (✕ {c.diverged}/{c.n} diverged)"
    return text


def _winner(stats: Sequence[CellStats], metric: str) -> CellStats | None:
    return min(stats, key=lambda c: rank_key(c, metric)) if stats else None


VERDICT = {"win": "**win**", "tie": "tie", "loss": "loss", "absent": "absent"}


def render_document(cells: Sequence[Cell], statuses: Sequence[OptimizerStatus], data: dict[str, Any],
                    config: ReproduceConfig, manifest: dict[str, Any], files: dict[str, Path], doc: Path,
                    scorecard: dict[str, dict[str, dict[str, int]]]) -> str:
    env = manifest["environment"]
    settings = config.grid_settings()
    display = {s.name: s.display for s in statuses}
    spec_name = {str(s.spec): s.name for s in statuses if s.spec is not None}
    total_wall = sum(i["wall_s"] for i in manifest["invocations"])
    last = manifest["invocations"][-1]
    n_runs = sum(len(c.results) for c in cells)
    L: list[str] = []
    L += ["# Reproduction of Li & Malik (2017), Figures 1–5" + (" (--quick smoke grid)" if config.quick else ""), "",
          "<!-- Generated by `l2o reproduce`; do not edit by hand: rerun the command below. -->", "",
          ("Everything below — figures, tables, scorecard — was generated by this command "
          "(rerunning it resumes: finished runs are read back, missing ones are run, this file is rewritten):"), "",
          "```bash", config.command, "```", ""]
    if config.quick:
        L += [("**This is the `--quick` smoke grid**: the same code on scikit-learn's bundled digits in every "
              f"dataset slot (three random projections), T divided by {QUICK_DIVISOR} and {config.n_seeds} seeds. "
              "Its numbers say nothing about the paper's claims."), ""]
    L += ["## Provenance", "",
          "| | |", "|---|---|",
          f"| l2o | {env['l2o']}{' (git ' + manifest['git'] + ')' if manifest.get('git') else ''} |",
          f"| torch / Python | {env['torch']} / {env['python']} |",
          (f"| machine | {env['machine']}, {env['cpus']} CPUs; runs in "
          f"{describe_execution(config.backend, config.jobs, config.address)}, 1 torch thread each |"),
          (f"| runs | {n_runs} ({len(settings)} figures × {len(config.slots())} datasets × "
          f"{sum(s.available for s in statuses)} optimizers × {config.n_seeds} seeds) |"),
          (f"| wall time | {_dur(total_wall)} over {len(manifest['invocations'])} invocation(s) "
          f"(the last: {_dur(last['wall_s'])}, {last['runs_executed']} runs executed) |"),
          f"| compute | {_dur(manifest['run_time_s_total'])} of single-thread run time (sum over run records) |",
          f"| generated | {last['started']} |", ""]
    L += ["## Protocol", "",
          ("As in §4 of the paper: each objective is training a two-layer MLP (ReLU hidden layer, softmax "
          "cross-entropy) on a dataset randomly projected to the input dimension and standardised; the optimizer "
          "sees mini-batch gradients, and the plotted/tabulated value is the **true objective** (loss on the whole "
          "training set) after each iteration. Seeds 0.."
          f"{config.n_seeds - 1} fix the initial point and the mini-batch sequence, shared by all optimizers. "
          "Final = f(x_T); AUC = mean of f(x_t) over t = 1..T. Entries are mean ± half-width of the 95% Student-t "
          "interval over seeds; a diverged run (NaN/inf) is counted and left out of the mean."), "",
          f"Time to target: {TARGET_RULE}. Each figure's second row plots the same curves against these "
          "seconds (mean over seeds); they depend on the machine and its load.", "",
          "Datasets (the paper's TFD, CIFAR-10 and CIFAR-100; stand-ins and subsets are named as such):", ""]
    for s in config.slots():
        d = data[s.paper]
        L.append(f"- **{s.paper}** → `{d['loader']}` = {d['short']}: {d['description']}")
    L += ["", "Optimizers (the paper's nine, then learned optimizers beyond the paper):", ""]
    tuned_src = "the tuned-settings file " + (f"`{config.tuned}`" if config.tuned else
                                              "shipped with l2o (`src/l2o/baselines/tuned.json`)")
    for s in statuses:
        if not s.available:
            L.append(f"- **{s.display}** (`{s.text}`): **ABSENT — not run here.** Reason: `{s.reason}`")
        elif s.checkpoint:
            L.append(f"- {s.display}: `{s.spec}`, weights `{_rel(s.checkpoint)}` (sha256 {s.checkpoint_sha256[:16]}…)"
                     if s.checkpoint_sha256 else f"- {s.display}: `{s.spec}`, weights `{_rel(s.checkpoint)}`")
        else:
            L.append(f"- {s.display}: `{s.spec}`")
        if s.name in BEYOND:
            L[-1] += f" — beyond the paper: {BEYOND[s.name]}"
    L += ["", (f"Hand-designed baselines use the hyperparameters in {tuned_src}, {_tuned_protocol(config.tuned)}, "
          "used unchanged here (the paper tunes every algorithm on the training objective only)."), ""]

    # scorecard
    L += ["## Scorecard", "", "**Rule.** " + SCORECARD_RULE, ""]
    L += _scorecard_lines(cells, statuses, scorecard, display)

    # figures + tables
    for st in settings:
        fc = [c for c in cells if c.setting.figure == st.figure]
        L += [f"## Figure {st.figure}: {st.label}", "",
              f"Paper: *Figure {st.figure}. {st.caption} {CAPTION_TAIL}*", "",
              f"![Figure {st.figure} reproduced]({_relpath(files[f'figure{st.figure}'], doc.parent)})", ""]
        for metric, head in (("final", "Final objective f(x_T)"), ("auc", "AUC (mean f over iterations 1..T)")):
            L += [f"{head}, mean ± 95% interval; **bold** = best in the cell:", "",
                  "| optimizer | " + " | ".join(f"{c.slot.paper} ({c.task})" for c in fc) + " |",
                  "|---" * (len(fc) + 1) + "|"]
            winners = {id(c): _winner(c.stats, metric) for c in fc}
            for s in statuses:
                row = [s.display]
                for c in fc:
                    if not s.available:
                        row.append("absent")
                        continue
                    cs = next((x for x in c.stats if x.optimizer == str(s.spec)), None)
                    row.append(_entry(cs, metric, cs is not None and cs is winners[id(c)]))
                L.append("| " + " | ".join(row) + " |")
            L.append("")
        L += ["Time to target (iterations / wall-clock seconds; rule under Protocol). Targets: "
              + "; ".join(f"{c.slot.paper} f ≤ {_num(c.stats[0].target)}" + (f" (`{c.stats[0].target_from}`)"
                          if c.stats and c.stats[0].target_from else "") for c in fc if c.stats) + ".", "",
              "| optimizer | " + " | ".join(f"{c.slot.paper} ({c.task})" for c in fc) + " |",
              "|---" * (len(fc) + 1) + "|"]
        for s in statuses:
            row = [s.display]
            for c in fc:
                cs = next((x for x in c.stats if x.optimizer == str(s.spec)), None) if s.available else None
                row.append("absent" if cs is None else to_target_text(cs))
            L.append("| " + " | ".join(row) + " |")
        L.append("")
    L += ["## All 15 cells at a glance" if len(cells) == 15 else f"## All {len(cells)} cells at a glance", "",
          "| figure | dataset | setting | winner (final) | winner (AUC) | "
          + " | ".join(f"{display.get(n, n)} (final / AUC)" for n in scorecard) + " |",
          "|---" * (5 + len(scorecard)) + "|"]
    for c in cells:
        wf, wa = _winner(c.stats, "final"), _winner(c.stats, "auc")
        verdicts = [f"{VERDICT[verdict(c.stats, n, 'final')]} / {VERDICT[verdict(c.stats, n, 'auc')]}" for n in scorecard]
        L.append(f"| {c.setting.figure} | {c.slot.paper} | {c.setting.label} | "
                 f"{display.get(spec_name.get(wf.optimizer, ''), wf.optimizer) if wf else '—'} | "
                 f"{display.get(spec_name.get(wa.optimizer, ''), wa.optimizer) if wa else '—'} | "
                 + " | ".join(verdicts) + " |")
    L += ["", "## Closing note", ""]
    L += _closing(cells, statuses, scorecard, display, config)
    L += ["", (f"Run records: `{_rel(str(config_out(files)))}/fig*/runs/`; per-cell statistics: `summary.csv`; "
          "verdicts: `scorecard.json`; provenance: `manifest.json` (same folder)."), ""]
    return "\n".join(L)


def config_out(files: dict[str, Path]) -> Path:
    return files["manifest"].parent


def _scorecard_lines(cells, statuses, scorecard, display) -> list[str]:
    L = ["| optimizer | metric | wins | ties | losses | absent |", "|---|---|---|---|---|---|"]
    for name, by_metric in scorecard.items():
        for metric, counts in by_metric.items():
            L.append(f"| {display.get(name, name)} | {'final f(x_T)' if metric == 'final' else 'AUC'} | "
                     f"{counts['win']} | {counts['tie']} | {counts['loss']} | {counts['absent']} |")
    L.append("")
    return L


def _closing(cells, statuses, scorecard, display, config) -> list[str]:
    n = len(cells)
    L = []
    absent = {s.name: s.reason for s in statuses if not s.available}
    psd = "psd-paper" if "psd-paper" in scorecard else "psd"
    if psd in absent or psd not in scorecard:
        why = absent.get(psd, "not in the optimizer list")
        L.append(f"**Predicted Step Descent was not run** ({why}), so this document cannot say whether it wins: "
                 f"0 of {n} cells are scored for it. Rerun the command once its weights exist; only its runs will be added.")
    else:
        f, a = scorecard[psd]["final"], scorecard[psd]["auc"]
        which = " (the paper's, `psd-paper`)" if psd == "psd-paper" else ""
        L.append(f"**Predicted Step Descent**{which} — by final objective it wins {f['win']}, ties {f['tie']} and loses "
                 f"{f['loss']} of the {n} cells; by AUC it wins {a['win']}, ties {a['tie']} and loses {a['loss']}"
                 + (f" ({f['absent']} cells without PSD runs)" if f["absent"] else "") + ".")
        if f["win"] + f["tie"] < n:
            L.append("The paper reports PSD as descending fastest in every panel of Figures 1–4 and as behaving "
                     "reasonably beyond its training horizon in Figure 5; the cells it loses above are where this "
                     "reproduction disagrees.")
    if "l2lbgdbgd" in scorecard and "l2lbgdbgd" not in absent:
        f, a = scorecard["l2lbgdbgd"]["final"], scorecard["l2lbgdbgd"]["auc"]
        L.append("")
        L.append(f"For comparison, L2LBGDBGD wins {f['win']} / ties {f['tie']} / loses {f['loss']} by final objective "
                 f"and wins {a['win']} / ties {a['tie']} / loses {a['loss']} by AUC.")
    beyond = [n for n in scorecard if n not in (psd, "l2lbgdbgd") and n not in absent]
    for name in beyond:
        f, a = scorecard[name]["final"], scorecard[name]["auc"]
        L += ["", f"Beyond the paper, **{display.get(name, name)}** (`{name}`) wins {f['win']} / ties {f['tie']} / loses "
              f"{f['loss']} by final objective and wins {a['win']} / ties {a['tie']} / loses {a['loss']} by AUC."]
    cells_2x2 = {k: n for k, n in TWO_BY_TWO.items() if n in scorecard and n not in absent}
    if len(cells_2x2) > 1:
        policies = list(dict.fromkeys(p for p, _ in TWO_BY_TWO))
        trainers = list(dict.fromkeys(t for _, t in TWO_BY_TWO))

        def entry(name: str | None) -> str:
            if name is None:
                return "not run"
            f, a = scorecard[name]["final"], scorecard[name]["auc"]
            return (f"`{name}`: final {f['win']} / {f['tie']} / {f['loss']}, "
                    f"AUC {a['win']} / {a['tie']} / {a['loss']}")

        L += ["", (f"Policy × meta-trainer (issue 12's 2 × 2; wins / ties / losses of the {n} cells, every "
                   "optimizer meta-trained on `mnist:48-48:b64`, T = 400):"), "",
              "| policy | " + " | ".join(trainers) + " |", "|---" * (len(trainers) + 1) + "|"]
        for p in policies:
            L.append(f"| {p} | " + " | ".join(entry(cells_2x2.get((p, t))) for t in trainers) + " |")
    if absent:
        L.append("")
        L.append("Absent optimizers (not run, marked absent above): "
                 + "; ".join(f"{display.get(k, k)} — {v}" for k, v in absent.items()) + ".")
    if config.quick:
        L.append("")
        L.append("(--quick smoke grid: these counts test the pipeline, not the paper.)")
    return L


def _tuned_protocol(path: str | None) -> str:
    from l2o.baselines.tuned import load_tuned

    try:
        t = load_tuned(path)
    except ValueError:
        return "tuning protocol unreadable"
    task = ", ".join(t.task) if isinstance(t.task, list) else t.task
    return f"tuned on `{task}` (T = {t.iterations}, seeds {list(t.seeds)}, criterion {t.criterion})"


def _dur(s: float) -> str:
    s = float(s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _rel(path: str) -> str:
    """``path`` relative to the current directory when it is inside it (for readable documents)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _relpath(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
