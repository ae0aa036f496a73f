"""Checkpoints are loaded without running code from the file (hostile target directories)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from generator import checkpoint as ckpt
from generator.errors import CheckpointError


class _WritesAFile:
    """Unpickling this calls Path.write_text: what an attacker's checkpoint would do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (self.target, "owned"))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    bad = tmp_path / "checkpoints" / ckpt.checkpoint_name(10)
    bad.parent.mkdir()
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "step": 10,
                "generator": _WritesAFile(marker)}, bad)
    with pytest.raises(CheckpointError, match=r"was refused: it holds objects other than "
                                              r"tensors and plain data"):
        ckpt.load_generator(bad)
    assert not marker.exists()


def test_a_format_1_checkpoint_is_refused_by_name(tmp_path: Path) -> None:
    old = tmp_path / ckpt.checkpoint_name(5)
    torch.save({"format": 1, "step": 5, "rng": [{"numpy": np.random.get_state()}]}, old)
    with pytest.raises(CheckpointError, match="format 1"):
        ckpt.load_checkpoint(old)


def test_a_checkpoint_without_its_generator_is_named(tmp_path: Path) -> None:
    path = tmp_path / ckpt.checkpoint_name(5)
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "step": 5}, path)
    with pytest.raises(CheckpointError, match=f"{path} lacks 'generator'"):
        ckpt.load_checkpoint(path)


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path: Path) -> None:
    np.random.seed(3)
    torch.manual_seed(3)
    state = ckpt.rng_state()
    path = ckpt.save_checkpoint(tmp_path, {"step": 1, "generator": {}, "rng": [state]})
    want = (np.random.rand(4), torch.rand(4))
    np.random.seed(99)
    torch.manual_seed(99)
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"][0])
    got = (np.random.rand(4), torch.rand(4))
    np.testing.assert_array_equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
