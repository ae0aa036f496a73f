"""Training checkpoints: written aside then renamed, so a crash never leaves a corrupt one.

A checkpoint `checkpoints/step-00001000.pt` (torch.save of a dict) holds:
`format`, `step`, `epoch` and `batch` (the data position: batches of `epoch`'s order taken),
`world_size`, `generator` / `discriminator` (`shape` and `state`), `opt_g` / `opt_d`
(optimiser states), `train` (learning rate, betas, L1 weight, global batch, seed, preset) and
`rng`: one entry per rank of the run that wrote it, each the states of torch (CPU), CUDA (the
rank's device), numpy and python's `random`. Only this module reads or writes them.

Checkpoints hold tensors and plain data only (dicts, lists, tuples, strings, numbers) and
are read with `torch.load(..., weights_only=True)`, which never runs code from the file: a
target directory received from someone else cannot execute anything by being loaded.
Format 1 (before this rule) pickled numpy's RNG state and was read with the unrestricted
unpickler; such files, and any file holding other objects, are refused by name.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.errors import CheckpointError
from generator.unet import UNet

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint after `step` steps ('step-00001000.pt')."""
    return f"step-{step:08d}.pt"


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step in `directory`, or None.

    Partial files (being written, or left by a crash) never match the name pattern.
    """
    if not directory.is_dir():
        return None
    found = sorted(p for p in directory.iterdir() if _NAME.match(p.name))
    return found[-1] if found else None


def save_checkpoint(directory: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` as the checkpoint of `state['step']`; keep the newest `keep` ones.

    The bytes go to a hidden partial file, are flushed to disk, then renamed over the final
    name (atomic on POSIX): readers see the old set of checkpoints or the new one, never half
    a file. Returns the checkpoint's path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(int(state["step"]))
    tmp = directory / f".{path.name}.{os.getpid()}.partial"
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(directory)
    for old in sorted(p for p in directory.iterdir() if _NAME.match(p.name))[:-keep]:
        old.unlink()
    log.info("saved checkpoint %s", path)
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; CheckpointError if it is unreadable or not ours."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except pickle.UnpicklingError as err:
        foreign = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if foreign is None:
            raise CheckpointError(f"{path} is not a readable checkpoint: "
                                  f"{str(err).splitlines()[-3] or err}") from None
        raise CheckpointError(
            f"{path} was refused: it holds objects other than tensors and plain data "
            f"({foreign.group(1)}), which could run code when loaded; checkpoints of format 1, "
            "written before dvp loaded them safely, are refused too: train again from the "
            "target directory") from None
    except Exception as err:  # torch raises many kinds on a damaged file
        raise CheckpointError(f"{path} is not a readable checkpoint: {err}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"{path} is not a dvp generator checkpoint of format "
                              f"{CHECKPOINT_FORMAT} (found format {found!r})")
    for key in ("step", "generator"):
        if key not in state:
            raise CheckpointError(f"{path} lacks '{key}': it is not a complete dvp generator "
                                  "checkpoint")
    return state


def _describe(shape: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(shape.items()))


def check_shape(path: Path, what: str, saved: dict[str, int], wanted: dict[str, int]) -> None:
    """Raise CheckpointError if a saved network shape differs from the one asked for."""
    if saved != wanted:
        raise CheckpointError(
            f"{path} holds a {what} of another shape ({_describe(saved)}) than this run's "
            f"({_describe(wanted)}): use the matching preset and resolution, or another "
            "target directory")


def load_generator(path: Path, device: torch.device | None = None) -> UNet:
    """The generator of a checkpoint, in eval mode on `device` (default: the CPU)."""
    state = load_checkpoint(path)
    try:
        model = UNet(**state["generator"]["shape"])
        model.load_state_dict(state["generator"]["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} holds no usable generator ({first}): it is damaged "
                              "or was not written by dvp") from None
    return model.to(device or torch.device("cpu")).eval()


def latest_generator(directory: Path, device: torch.device | None = None) -> UNet:
    """The generator of the newest checkpoint in `directory` (eval mode, on `device`).

    Raises CheckpointError when there is none.
    """
    return load_generator(require_checkpoint(directory), device)


def require_checkpoint(directory: Path) -> Path:
    """The newest complete checkpoint in `directory`; CheckpointError when there is none."""
    path = latest_checkpoint(directory)
    if path is None:
        raise CheckpointError(f"no checkpoint in {directory}: run 'dvp train "
                              f"{directory.parent}' first")
    return path


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU, and this process's current CUDA device if CUDA is in
    use), numpy and python's random, as tensors and plain data (numpy's MT19937 state as
    `{"keys": int64 tensor (624,), "pos", "has_gauss", "gauss"}`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    assert kind == "MT19937"
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by `rng_state` (the CUDA one only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def seed_all(seed: int, step: int, rank: int) -> None:
    """Seed torch, CUDA, numpy and random from (seed, step, rank) (the resume rule)."""
    value = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
