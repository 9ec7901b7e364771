"""Checkpoint I/O: atomic writes, safe loads, one-line errors naming the file."""

import os
import pickle

import pytest
import torch

from src.core import checkpoint as ck
from src.core.errors import CheckpointError


def test_roundtrip_and_kind(tmp_path):
    path = ck.save_checkpoint({"kind": "mamba", "w": torch.arange(4.0), "step": 3}, tmp_path / "a.pt")
    state = ck.load_checkpoint(path, kind="mamba")
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4.0))
    with pytest.raises(CheckpointError, match=r"a\.pt: checkpoint is for 'mamba', expected 'rl'"):
        ck.load_checkpoint(path, kind="rl")


def test_crash_during_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    ck.save_checkpoint({"kind": "x", "v": torch.ones(3)}, path)
    before = path.read_bytes()

    def exploding_save(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck.torch, "save", exploding_save)
    with pytest.raises(RuntimeError, match="disk full"):
        ck.save_checkpoint({"kind": "x", "v": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_is_one_line_error(tmp_path, damage):
    path = ck.save_checkpoint({"kind": "x", "v": torch.randn(100, 100)}, tmp_path / "c.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as err:
        ck.load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        torch.save({"kind": "x", "payload": Evil()}, handle, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="evil.pt: cannot read checkpoint"):
        ck.load_checkpoint(path)


def test_mismatched_weights_name_the_file(tmp_path):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"w\.pt: weights do not match"):
        ck.load_state_dict_checked(model, {"weight": torch.zeros(5, 5)}, tmp_path / "w.pt")


def test_find_latest_uses_pointer_then_mtime(tmp_path):
    assert ck.find_latest_checkpoint(tmp_path) is None
    a = ck.save_checkpoint({}, tmp_path / "checkpoint_epoch_1.pt")
    b = ck.save_checkpoint({}, tmp_path / "checkpoint_step_7.pt")
    os.utime(a, ns=(2 * 10**18, 2 * 10**18))
    assert ck.find_latest_checkpoint(tmp_path) == a
    ck.write_latest_pointer(tmp_path, b, 7)
    assert ck.find_latest_checkpoint(tmp_path) == b
