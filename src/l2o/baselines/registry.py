"""The optimizer registry: every optimizer the harness can run, hand-designed or learned.

Every optimizer is a ``torch.optim.Optimizer`` driven through ``step(closure)``, so the benchmark
harness has no special cases. An :class:`OptimizerEntry` says how to build one from
hyperparameters and which grid the tuning command searches; an :class:`OptimizerSpec` is one
concrete choice of hyperparameters.

The seven hand-designed baselines of Li & Malik (2017): SGD, momentum (heavy ball), conjugate
gradient, L-BFGS, AdaGrad, Adam, RMSprop. The five first-order methods are ``torch.optim``'s own
implementations; CG and L-BFGS are l2o's (see :mod:`l2o.baselines.cg`, :mod:`l2o.baselines.lbfgs`)
because they must do their line search and curvature pairs on one iteration's mini-batch.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Factory = Callable[[list[torch.Tensor], dict[str, Any]], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerEntry:
    """How to build an optimizer, its fixed defaults, and the grid that tuning searches."""

    name: str
    display: str
    factory: Factory
    defaults: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    accepts: tuple[str, ...] = ()  # further hyperparameters that may be set but are not tuned
    learned: bool = False

    @property
    def hyperparameters(self) -> set[str]:
        return set(self.defaults) | set(self.grid) | set(self.accepts)

    def grid_points(self) -> list[dict[str, Any]]:
        """All hyperparameter settings of the tuning grid (Cartesian product)."""
        points: list[dict[str, Any]] = [{}]
        for key, values in self.grid.items():
            points = [{**p, key: v} for p in points for v in values]
        return points


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer name with concrete hyperparameters, e.g. ``adam:lr=0.003``."""

    name: str
    hparams: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, name: str, hparams: Mapping[str, Any] | None = None) -> OptimizerSpec:
        entry = get_optimizer(name)
        hp = dict(hparams or {})
        allowed = entry.hyperparameters
        unknown = set(hp) - allowed
        if unknown:
            raise ValueError(f"optimizer {name!r}: unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(allowed)}")
        for key, value in hp.items():
            _check_value(name, entry, key, value)
        return cls(name, tuple(sorted(hp.items())))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.hparams)

    def build(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        entry = get_optimizer(self.name)
        return entry.factory(list(params), {**entry.defaults, **self.kwargs})

    def __str__(self) -> str:
        if not self.hparams:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.hparams)

    @property
    def display(self) -> str:
        return get_optimizer(self.name).display


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _string_valued(entry: OptimizerEntry, key: str) -> bool:
    known = [entry.defaults[key]] if key in entry.defaults else list(entry.grid.get(key, ()))
    return bool(known) and not all(_is_number(v) for v in known)


def _check_value(name: str, entry: OptimizerEntry, key: str, value: Any) -> None:
    """A hyperparameter whose default or grid is numeric (and every ``accepts`` one) must be a
    finite number; one whose default is a string must be a string."""
    import math

    numeric = not _string_valued(entry, key)
    if numeric and not (_is_number(value) and math.isfinite(value)):
        raise ValueError(f"optimizer {name!r}: hyperparameter {key} must be a finite number, got {value!r}")
    if not numeric and not isinstance(value, str):
        raise ValueError(f"optimizer {name!r}: hyperparameter {key} must be a string, got {value!r}")


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _parse_value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


_SPEC_RE = re.compile(r"^(?P<name>[a-z0-9_-]+)(?::(?P<hp>.*))?$")


def parse_optimizer(text: str) -> OptimizerSpec:
    """Parse ``name`` or ``name:key=value,key=value`` (values int, float or string)."""
    m = _SPEC_RE.match(text.strip())
    if not m:
        raise ValueError(f"cannot parse optimizer {text!r}: expected NAME or NAME:KEY=VALUE,...")
    hp: dict[str, Any] = {}
    if m["hp"]:
        entry = get_optimizer(m["name"])
        for item in m["hp"].split(","):
            if "=" not in item:
                raise ValueError(f"optimizer {text!r}: hyperparameter {item!r} is not KEY=VALUE")
            k, v = item.split("=", 1)
            k, v = k.strip(), v.strip()
            if k in hp:
                raise ValueError(f"optimizer {text!r}: hyperparameter {k} is given twice")
            hp[k] = v if _string_valued(entry, k) else _parse_value(v)  # e.g. a file name stays text
    return OptimizerSpec.make(m["name"], hp)


_REGISTRY: dict[str, OptimizerEntry] = {}


def register_optimizer(entry: OptimizerEntry) -> OptimizerEntry:
    """Add an optimizer to the registry (learned optimizers register themselves on import)."""
    _REGISTRY[entry.name] = entry
    return entry


def get_optimizer(name: str) -> OptimizerEntry:
    _load_plugins()
    if name not in _REGISTRY:
        if name in _plugin_errors:
            raise ValueError(f"optimizer {name!r} is unavailable: its plugin failed to import ({_plugin_errors[name]})")
        hint = "" if _plugins_loaded else f" (no {PLUGIN_GROUP!r} entry points found: is l2o installed? pip install -e .)"
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(_REGISTRY)}{hint}")
    return _REGISTRY[name]


def optimizer_names(learned: bool | None = None) -> list[str]:
    """Registered names in registration order (hand-designed first)."""
    _load_plugins()
    return [n for n, e in _REGISTRY.items() if learned is None or e.learned == learned]


PLUGIN_GROUP = "l2o.optimizers"
"""Entry-point group of the modules that register learned optimizers when imported (l2o's own are
declared in its pyproject.toml; any installed package may add more)."""
_plugins_loaded: set[str] = set()
_plugin_errors: dict[str, str] = {}
_plugins_scanned = False


def _load_plugins() -> None:
    """Import every registered plugin module not imported yet. One that fails is warned about and
    kept in ``_plugin_errors`` (its optimizer's lookup names the failure), never marked loaded:
    the next lookup tries it again. Once a scan has loaded them all, lookups skip the scan (it
    reads every installed distribution's metadata: milliseconds per lookup)."""
    global _plugins_scanned
    if _plugins_scanned and not _plugin_errors:
        return
    from importlib.metadata import entry_points

    _plugins_scanned = True
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.value in _plugins_loaded:
            continue
        try:
            ep.load()
        except Exception as e:  # any import-time failure of a third-party module is reported, not raised
            _plugin_errors[ep.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"learned-optimizer plugin {ep.name!r} ({ep.value}) failed to import: {e}",
                          RuntimeWarning, stacklevel=3)
            continue
        _plugins_loaded.add(ep.value)
        _plugin_errors.pop(ep.name, None)


def _sgd(params: list[torch.Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=hp["lr"])


def _momentum(params: list[torch.Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"])


def _adagrad(params: list[torch.Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=hp["lr"], eps=hp["eps"])


def _adam(params: list[torch.Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"])


def _rmsprop(params: list[torch.Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=hp["lr"], alpha=hp["alpha"], eps=hp["eps"])


def _cg(params: list[torch.Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    from l2o.baselines.cg import ConjugateGradient

    return ConjugateGradient(params, **hp)


def _lbfgs(params: list[torch.Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    from l2o.baselines.lbfgs import LBFGS

    return LBFGS(params, **hp)


_LR = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
_LR_ADAPTIVE = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)

for _entry in (
    OptimizerEntry("sgd", "SGD", _sgd, grid={"lr": _LR + (3.0,)}),
    OptimizerEntry("momentum", "Momentum", _momentum, grid={"lr": _LR, "momentum": (0.9, 0.99)}),
    OptimizerEntry(
        "cg", "Conjugate gradient", _cg, defaults={"beta": "PR+", "line_search": "strong_wolfe", "c2": 0.1},
        grid={"max_step": (0.1, 1.0, 10.0)}, accepts=("c1", "max_evals", "restart_every"),
    ),
    OptimizerEntry(
        "lbfgs", "L-BFGS", _lbfgs, defaults={"line_search": "strong_wolfe"},
        grid={"history_size": (5, 20), "max_step": (0.1, 1.0, 10.0)}, accepts=("c1", "c2", "max_evals"),
    ),
    OptimizerEntry("adagrad", "AdaGrad", _adagrad, defaults={"eps": 1e-10}, grid={"lr": _LR}),
    OptimizerEntry("adam", "ADAM", _adam, defaults={"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}, grid={"lr": _LR_ADAPTIVE}),
    OptimizerEntry("rmsprop", "RMSprop", _rmsprop, defaults={"eps": 1e-8}, grid={"lr": _LR_ADAPTIVE, "alpha": (0.9, 0.99)}),
):
    register_optimizer(_entry)

BASELINES: tuple[str, ...] = ("sgd", "momentum", "cg", "lbfgs", "adagrad", "adam", "rmsprop")
"""The seven hand-designed optimizers of the paper's comparison, in its order."""
