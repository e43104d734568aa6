"""The tuned hyperparameters of the hand-designed baselines, as a versioned JSON file.

"All algorithms are tuned on the training objective function" (Li & Malik 2017, §4): ``l2o tune``
grid-searches each baseline on the meta-training objective and writes this file; evaluation on
unseen tasks then uses it unchanged. The file shipped in the package (``tuned.json`` beside this
module) records the command, settings and environment that produced it, and every grid point's
score, so the choice can be audited and rerun.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from l2o.baselines.registry import OptimizerSpec
from l2o.checkpoint import write_json_atomic

FORMAT_VERSION = 1
_REQUIRED = {"format_version", "task", "iterations", "seeds", "criterion", "command", "environment", "settings", "grid"}


class TunedSettingsError(ValueError):
    """The tuned-settings file is missing, malformed, or lacks an optimizer."""


@dataclass(frozen=True)
class TunedSettings:
    """Chosen hyperparameters per baseline, with the tuning protocol that chose them."""

    task: str | list[str]  # one task spec, or the list tuned on together
    iterations: int
    seeds: tuple[int, ...]
    criterion: str
    command: str
    environment: dict[str, str]
    settings: dict[str, dict[str, Any]]
    grid: dict[str, list[dict[str, Any]]]
    source: str = "<memory>"

    def spec(self, name: str) -> OptimizerSpec:
        """The tuned :class:`OptimizerSpec` for baseline ``name``."""
        if name not in self.settings:
            raise TunedSettingsError(
                f"no tuned hyperparameters for {name!r} in {self.source} (has {sorted(self.settings)}); "
                f"run `l2o tune` or give them explicitly, e.g. '{name}:lr=0.01'"
            )
        return OptimizerSpec.make(name, self.settings[name])

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "task": self.task, "iterations": self.iterations,
                "seeds": list(self.seeds), "criterion": self.criterion, "command": self.command,
                "environment": self.environment, "settings": self.settings, "grid": self.grid}

    def save(self, path: Path) -> Path:
        write_json_atomic(Path(path), self.to_dict())
        return Path(path)


def default_tuned_path() -> Path:
    return Path(str(resources.files("l2o.baselines") / "tuned.json"))


def load_tuned(path: str | Path | None = None) -> TunedSettings:
    """Read and validate a tuned-settings file (default: the one shipped with l2o)."""
    p = Path(path) if path is not None else default_tuned_path()
    if not p.exists():
        raise TunedSettingsError(f"tuned-settings file {p} not found; run `l2o tune --write {p}` to create it")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TunedSettingsError(f"tuned-settings file {p} is not valid JSON: {e}") from e
    if not isinstance(d, dict) or _REQUIRED - set(d):
        missing = sorted(_REQUIRED - set(d)) if isinstance(d, dict) else "all"
        raise TunedSettingsError(f"tuned-settings file {p} lacks fields {missing}")
    if d["format_version"] != FORMAT_VERSION:
        raise TunedSettingsError(f"tuned-settings file {p} has format_version {d['format_version']}, expected {FORMAT_VERSION}")
    if not isinstance(d["settings"], dict) or not all(isinstance(v, dict) for v in d["settings"].values()):
        raise TunedSettingsError(f"tuned-settings file {p}: 'settings' must map optimizer names to hyperparameter tables")
    t = TunedSettings(d["task"], int(d["iterations"]), tuple(d["seeds"]), d["criterion"], d["command"],
                      d["environment"], d["settings"], d["grid"], source=str(p))
    for name in t.settings:  # validates names and hyperparameter keys
        try:
            t.spec(name)
        except ValueError as e:
            raise TunedSettingsError(f"tuned-settings file {p}: {e}") from e
    return t
