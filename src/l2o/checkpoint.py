"""Safe checkpoints: tensors in safetensors, metadata as JSON, an integrity digest over both.

Nothing executes on load (no pickle). A checkpoint is one ``.safetensors`` file whose header
metadata holds ``l2o.meta`` (JSON: config, counters, RNG states, ...) and ``l2o.sha256``, a digest
of every tensor's name, dtype, shape and bytes plus the metadata JSON. A truncated or corrupted
file fails with :class:`CheckpointError` naming the file and the problem. Writes go to a
temporary file renamed into place, so an interrupted save leaves the previous checkpoint intact.

The digest is an unkeyed SHA-256: it detects accidents (bit rot, truncation, a careless edit),
not deliberate tampering — anyone who edits a file can recompute it. Loading is nevertheless
safe for untrusted files in the sense that nothing executes, and every loader validates the
values it uses (weights finite and of the right shapes, metadata fields present, typed and in
range), so an edited file is refused with a :class:`CheckpointError` rather than corrupting a
run. To trust a checkpoint's *origin*, compare its SHA-256 with a published one (the JSON beside
each shipped policy records it).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT = "l2o-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, holds invalid values, or is of the wrong kind."""


def _digest(tensors: Mapping[str, torch.Tensor], meta_json: str) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(meta_json.encode())
    return h.hexdigest()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in metadata")


def _finite_float(text: str) -> float:
    v = float(text)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} in metadata overflows to {v}")
    return v


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], kind: str) -> Path:
    """Write ``tensors`` and JSON-serialisable ``meta`` atomically; ``kind`` names what it holds."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta_json = json.dumps({"format": FORMAT, "kind": kind, **meta}, sort_keys=True, allow_nan=False)
    header = {"l2o.meta": meta_json, "l2o.sha256": _digest(tensors, meta_json)}
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _atomic(path: Path, write: Any) -> Path:
    """``write(tmp)`` a temporary file beside ``path``, then rename it into place: the file is
    either the complete new one or the old one, never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return _atomic(Path(path), write)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (no NaN or inf) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, allow_nan=False))


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint; return ``(tensors, meta)``. ``kind`` must match if given."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {e}") from e
    if "l2o.meta" not in header or "l2o.sha256" not in header:
        raise CheckpointError(f"checkpoint {path} lacks l2o metadata (not an l2o checkpoint)")
    if _digest(tensors, header["l2o.meta"]) != header["l2o.sha256"]:
        raise CheckpointError(f"checkpoint {path} failed its integrity check (corrupt or modified)")
    try:
        meta = json.loads(header["l2o.meta"], parse_constant=_reject_constant, parse_float=_finite_float)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path} holds {meta.get('kind')!r}, expected {kind!r}")
    return tensors, meta


def rng_state() -> dict[str, Any]:
    """torch's global CPU RNG state as JSON-friendly data (for exact resume)."""
    return {"torch": torch.get_rng_state().tolist()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def generator_state(g: torch.Generator) -> list[int]:
    return g.get_state().tolist()


def restore_generator(state: list[int]) -> torch.Generator:
    g = torch.Generator()
    g.set_state(torch.tensor(state, dtype=torch.uint8))
    return g
