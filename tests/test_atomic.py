"""lafs.atomic: a replaced file is the old one or the new one, never half, and a failed write leaves no litter."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lafs.atomic import replacing, write_text


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = write_text(tmp_path / "metrics.json", "old\n")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_success_replaces_with_the_umask_mode_and_fsync(tmp_path: Path) -> None:
    with replacing(tmp_path / "sub" / "last.pt", fsync=True) as tmp:
        tmp.write_bytes(b"state")
    target = tmp_path / "sub" / "last.pt"
    assert target.read_bytes() == b"state" and os.listdir(target.parent) == ["last.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_equal_checkpoints_are_equal_bytes(tmp_path: Path) -> None:
    """A rewritten teacher with the same weights must not look like a new input to DVC or a resumed run."""
    import torch

    from lafs.models.io import save_model
    from lafs.tensor_files import load_checkpoint

    net = torch.nn.Linear(3, 2)
    first = save_model(net, "linear", {"in": 3}, tmp_path / "a" / "teacher.pt").read_bytes()
    again = save_model(net, "linear", {"in": 3}, tmp_path / "a" / "teacher.pt").read_bytes()
    elsewhere = save_model(net, "linear", {"in": 3}, tmp_path / "b" / "other.pt").read_bytes()
    assert first == again == elsewhere
    assert torch.equal(load_checkpoint(tmp_path / "b" / "other.pt")["state_dict"]["weight"], net.weight.detach())
