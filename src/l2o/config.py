"""Config plumbing shared by every dataclass config: unknown keys and bad values are errors that name
them (:class:`Config` is the base that bundles it)."""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C", bound="Config")


def check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming the keys of ``d`` that are not fields of dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} config key(s) {sorted(unknown)}; known: {sorted(known)}")


def check_field_types(obj: Any, what: str) -> None:
    """Raise ``ValueError`` naming the first field of dataclass ``obj`` whose value does not match its
    annotation: ``int`` (not bool), ``float`` (finite; ints accepted), ``bool``, ``str`` (non-empty),
    ``str | None`` and ``float | None``. Other annotations are left to the caller."""
    import math

    for f in fields(obj):
        v = getattr(obj, f.name)
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if t == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif t == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        elif t == "bool":
            ok = isinstance(v, bool)
        elif t == "str":
            ok = isinstance(v, str) and v != ""
        elif t in ("str | None", "Optional[str]"):
            ok = v is None or isinstance(v, str)
        elif t in ("float | None", "Optional[float]"):
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        else:
            continue
        if not ok:
            raise ValueError(f"{what} config: {f.name} = {v!r} has the wrong type (expected {t})")


def read_config_file(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse a TOML (or ``.json``) config file into a mapping; ``overrides`` that are not None
    replace its values (command-line options over the file)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path} is {'a directory' if path.is_dir() else 'not found'}: give a TOML or JSON file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config {path} cannot be read: {e}") from e
    try:
        if path.suffix == ".json":
            d = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            d = tomllib.loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"config {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"config {path} must hold a table of fields, got {type(d).__name__}")
    d.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return d


class Config:
    """Base of a frozen dataclass config: ``from_dict`` / ``from_file`` reject unknown keys by name,
    ``to_dict`` is its JSON form, and :meth:`check` / :meth:`require` raise ``ValueError`` naming the
    config (``_label``) and the field; subclasses validate in ``__post_init__``."""

    _label = "config"

    def check(self, ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"{self._label} config: {msg}")

    def require(self, ge0: tuple[str, ...] = (), ge1: tuple[str, ...] = (), gt0: tuple[str, ...] = (),
                choices: dict[str, tuple[str, ...]] | None = None) -> None:
        """Each named field ≥ 0, ≥ 1 or > 0 (None, where a field allows it, passes), or one of its
        allowed values."""
        for names, ok, what in ((ge0, lambda v: v >= 0, ">= 0"), (ge1, lambda v: v >= 1, ">= 1"),
                                (gt0, lambda v: v > 0, "> 0")):
            for n in names:
                v = getattr(self, n)
                self.check(v is None or ok(v), f"{n} must be {what}, got {v!r}")
        for n, allowed in (choices or {}).items():
            self.check(getattr(self, n) in allowed, f"{n} must be one of {allowed}, got {getattr(self, n)!r}")

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Build from a mapping (e.g. parsed TOML), rejecting unknown keys by name."""
        check_keys(cls, dict(d), cls._label)
        return cls(**dict(d))

    @classmethod
    def from_file(cls: type[C], path: str | os.PathLike, **overrides: Any) -> C:
        """A TOML (or JSON) file; ``overrides`` that are not None replace its values."""
        return cls.from_dict(read_config_file(path, overrides))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]
