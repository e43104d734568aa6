"""Checkpoints round-trip exactly and refuse corrupt, tampered or foreign files."""

from __future__ import annotations

import pytest
import torch

from l2o.checkpoint import (
    CheckpointError,
    generator_state,
    load_checkpoint,
    restore_generator,
    save_checkpoint,
)


def _ckpt(tmp_path):
    tensors = {"w": torch.randn(5, 3), "b": torch.arange(4, dtype=torch.float64), "step": torch.tensor([7])}
    meta = {"iteration": 3, "config": {"lr": 0.1}}
    return save_checkpoint(tmp_path / "c.safetensors", tensors, meta, kind="test"), tensors, meta


def test_round_trip_is_exact(tmp_path):
    path, tensors, meta = _ckpt(tmp_path)
    t2, m2 = load_checkpoint(path, kind="test")
    assert set(t2) == set(tensors) and all(torch.equal(t2[k], tensors[k]) for k in tensors)
    assert m2["iteration"] == 3 and m2["config"] == {"lr": 0.1} and m2["kind"] == "test"


def test_generator_state_round_trip():
    g = torch.Generator().manual_seed(4)
    torch.rand(3, generator=g)
    g2 = restore_generator(generator_state(g))
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=g2))


def test_flipped_byte_in_tensor_data_is_detected(tmp_path):
    path, _, _ = _ckpt(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="integrity"):
        load_checkpoint(path)


def test_edited_metadata_is_detected(tmp_path):
    path, _, _ = _ckpt(tmp_path)
    raw = path.read_bytes()
    edited = raw.replace(b'\\"iteration\\": 3', b'\\"iteration\\": 9')
    assert edited != raw
    path.write_bytes(edited)
    with pytest.raises(CheckpointError, match="integrity"):
        load_checkpoint(path)


def test_truncated_garbage_missing_and_wrong_kind(tmp_path):
    path, _, _ = _ckpt(tmp_path)
    with pytest.raises(CheckpointError, match="expected 'other'"):
        load_checkpoint(path, kind="other")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(path)
    (tmp_path / "g.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "g.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="lacks l2o metadata"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_a_pickle_is_never_loaded(tmp_path):
    p = tmp_path / "evil.safetensors"
    torch.save({"w": torch.zeros(1)}, p)  # a zip/pickle file, not safetensors
    with pytest.raises(CheckpointError):
        load_checkpoint(p)
