"""Config plumbing shared by every dataclass config: unknown keys are errors that name them."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming the keys of ``d`` that are not fields of dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} config key(s) {sorted(unknown)}; known: {sorted(known)}")
