"""Training pairs: (space-time window of conditioning, ground-truth frame).

The per-frame conditioning of a target is rendered once and cached as `[T, 9, S, S]` uint8
(`cache_conditioning`): 8 bits are ample for colour, a correspondence position (1/255 of the
face's extent) and the gaze map, and it makes a 1,500-frame target at 256 px 0.9 GB, small
enough to live on the GPU during training. Windows are stacked from it per batch
(`WindowDataset.batch`), by DESIGN.md's rule (`renderer.conditioning.window_indices`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from generator.errors import DataError
from generator.target import TargetDir, file_sha256, load_cached
from generator.unet import FRAME_CHANNELS
from renderer.conditioning import window_indices
from tracker.files import partial_path, remove_stale_partials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingData:
    """Everything training and evaluation read, for T frames at S x S (host arrays).

    conditioning: `[T, 9, S, S]` uint8 (value/255 is the contract's [0, 1]) or float32 in [0, 1];
    per frame colour RGB, correspondence XYZ, gaze RGB.
    masks: `[T, 1, S, S]` uint8 or bool, 1 where the face model covers the pixel.
    frames: `[T, S, S, 3]` uint8 RGB ground truth.
    timestamps: `(T,)` seconds, non-decreasing. fps: the target's frame rate.
    holdout_start: frames [holdout_start, T) are held out of training. n_w: window length.
    mouth_box: `(2, 3)` float32 corners of the mouth in correspondence units
    (`generator.regions`), None when unknown (then no pixel is "mouth").
    """

    conditioning: np.ndarray
    masks: np.ndarray
    frames: np.ndarray
    timestamps: np.ndarray
    fps: float
    holdout_start: int
    n_w: int = 11
    mouth_box: np.ndarray | None = None

    def __post_init__(self) -> None:
        t = len(self.frames)
        if t < self.n_w:
            raise DataError(f"the target has {t} frames, fewer than the window's {self.n_w}")
        s = self.frames.shape[1]
        expect = {"conditioning": (t, FRAME_CHANNELS, s, s), "masks": (t, 1, s, s),
                  "frames": (t, s, s, 3), "timestamps": (t,)}
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise DataError(f"training data '{name}' has shape {got}, expected {shape}")
        if not 0 < self.holdout_start < t:
            raise DataError(f"holdout_start {self.holdout_start} must lie in 1..{t - 1}")

    @property
    def size(self) -> int:
        """S, pixels."""
        return int(self.frames.shape[1])

    @property
    def train_indices(self) -> np.ndarray:
        """Frame indices trained on, `(holdout_start,)` int64."""
        return np.arange(self.holdout_start, dtype=np.int64)

    @property
    def heldout_indices(self) -> np.ndarray:
        """Held-out frame indices, `(T - holdout_start,)` int64."""
        return np.arange(self.holdout_start, len(self.frames), dtype=np.int64)

    def window_table(self) -> np.ndarray:
        """`[T, n_w]` int64: the frames of each frame's window, oldest first."""
        return np.stack([window_indices(self.timestamps, i, self.fps, self.n_w)
                         for i in range(len(self.frames))])


class WindowDataset(torch.utils.data.Dataset):
    """(window `[9*n_w, S, S]` float32 in [0, 1], frame `[3, S, S]` float32 in [-1, 1]) pairs.

    `indices` chooses the frames (e.g. `data.train_indices`); item i is the pair of frame
    `indices[i]`. With a CUDA `device` the whole cache (conditioning, frames, masks, the
    window table and `indices`) is uploaded once and batches are gathered there by index
    tensors (`gather`), with no host copy and no wait for the GPU; with the CPU (the
    default) the arrays stay as they are (memory maps too) and batches are gathered from them.
    """

    def __init__(self, data: TrainingData, indices: np.ndarray,
                 device: torch.device | None = None) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.device = device = device or torch.device("cpu")
        self.n_w = data.n_w
        self.mouth_box = data.mouth_box
        self.table = data.window_table()  # T,n_w
        self._store: list[Any] = [data.conditioning, data.frames, data.masks]  # T,9,S,S T,S,S,3 T,1,S,S
        self._index: list[torch.Tensor] = []
        if device.type != "cpu":
            self._store = [_upload(a, device) for a in self._store]
            self._index = [torch.from_numpy(a).to(device) for a in (self.indices, self.table)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window, frame = self.batch(np.array([i]))
        return window[0], frame[0]

    def positions(self, positions: np.ndarray) -> torch.Tensor:
        """`positions` as an int64 tensor on `device` (an asynchronous copy on CUDA)."""
        host = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Items at `positions` stacked: windows `[B, 9*n_w, S, S]`, frames `[B, 3, S, S]`.

        Both are float32 on `device`; windows frame-major, oldest first (as `stack_window`).
        """
        windows, truth, _ = self.raw(positions)
        return _as_unit(windows), _as_signed(truth)

    def raw(self, positions: np.ndarray | torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Items at `positions` as stored: windows `[B, 9*n_w, S, S]` (uint8: value/255, or
        float in [0, 1]), frames `[B, S, S, 3]` uint8, masks of the current frame
        `[B, 1, S, S]`; on `device`. A tensor of positions must be on `device` (`positions`):
        then the gather is index arithmetic on the device alone (CUDA-graph safe)."""
        if self._index:
            pos = positions if isinstance(positions, torch.Tensor) else self.positions(positions)
            frames = self._index[0].index_select(0, pos)
            rows = self._index[1].index_select(0, frames).reshape(-1)  # B*n_w
            cond, truth, masks = (store.index_select(0, ids) for store, ids in
                                  zip(self._store, (rows, frames, frames)))
        else:
            picked = self.indices[np.asarray(positions.cpu() if isinstance(
                positions, torch.Tensor) else positions)]
            rows = self.table[picked].reshape(-1)
            cond, truth, masks = (torch.from_numpy(np.asarray(store[ids])) for store, ids in
                                  zip(self._store, (rows, picked, picked)))
        b, s = len(frames if self._index else picked), cond.shape[-1]
        return cond.reshape(b, self.n_w * FRAME_CHANNELS, s, s), truth, masks


def _as_signed(frames: torch.Tensor) -> torch.Tensor:
    """`[B, S, S, 3]` uint8 -> `[B, 3, S, S]` float32 in [-1, 1]."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class BatchOrder:
    """The order in which one rank takes training frames, batch after batch, epoch after epoch.

    Each epoch a `DistributedSampler` (shuffle, `seed`, `set_epoch(epoch)`) permutes
    positions 0..n-1 the same way at every world size; rank r of `world` takes every
    `world`-th entry from r, and each `next()` takes its next `batch` of them. So one step's
    batches of all ranks are together the same frames as one process with `batch * world`.
    An epoch ends when a full batch no longer fits (the rest is skipped). `epoch` and
    `position` (batches taken in the epoch) are the state a checkpoint keeps.
    """

    def __init__(self, n: int, batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 epoch: int = 0, position: int = 0) -> None:
        self.batch, self.epoch, self.position = batch, epoch, position
        self.sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=seed)
        self.order = self._permutation()
        if len(self.order) < batch:
            raise DataError(f"{n} training frames give each of {world} processes "
                            f"{len(self.order)}, fewer than its batch of {batch}")

    def _permutation(self) -> np.ndarray:
        self.sampler.set_epoch(self.epoch)
        return np.fromiter(iter(self.sampler), dtype=np.int64)

    def next(self) -> np.ndarray:
        """The next batch of positions, `(batch,)` int64."""
        if (self.position + 1) * self.batch > len(self.order):
            self.epoch, self.position = self.epoch + 1, 0
            self.order = self._permutation()
        taken = self.order[self.position * self.batch:(self.position + 1) * self.batch]
        self.position += 1
        return taken


def _upload(array: np.ndarray, device: torch.device, chunk: int = 256) -> torch.Tensor:
    """Copy a host array (a memory map too) to `device`, `chunk` frames at a time."""
    first = torch.from_numpy(np.array(array[:1]))
    out = torch.empty(array.shape, dtype=first.dtype, device=device)
    for start in range(0, len(array), chunk):
        out[start:start + chunk] = torch.from_numpy(np.array(array[start:start + chunk]))
    return out


def _as_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 value/255; float stays (as float32)."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


class ConditioningSource(Protocol):
    """What renders conditioning (renderer.conditioning.ConditioningRenderer does).

    `frames(params, indices)` -> `[n, 9, S, S]` float32 in [0, 1];
    `masks(params, indices)` -> `[n, 1, S, S]` in {0, 1}; any device.
    """

    def frames(self, params: Any, indices: np.ndarray | None = None) -> torch.Tensor: ...

    def masks(self, params: Any, indices: np.ndarray | None = None) -> torch.Tensor: ...


def cache_conditioning(target: TargetDir, renderer: Callable[[], ConditioningSource],
                       chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Render every frame's conditioning once; return (`[T,9,S,S]`, `[T,1,S,S]`) uint8 memmaps.

    renderer: makes the ConditioningSource; called only when the cache must be (re)built.
    Stored as `cache/conditioning.npy` and `cache/masks.npy` beside `cache/conditioning.json`,
    which records the SHA-256 of params.npz and albedo.png: a cache made from other inputs,
    or a damaged one (truncated, say), is rendered again. Files are written aside and renamed.
    """
    cache = target.output_dir("cache")
    t, s = target.info.frames, target.info.resolution
    key = {"params": file_sha256(target.params_path), "albedo": file_sha256(target.albedo_path),
           "frames": t, "resolution": s}
    key_path = cache / "conditioning.json"
    paths = {"conditioning": cache / "conditioning.npy", "masks": cache / "masks.npy"}
    shapes = {"conditioning": (t, FRAME_CHANNELS, s, s), "masks": (t, 1, s, s)}
    if _recorded_key(key_path) == key:
        cached = [load_cached(paths[n], shapes[n], np.uint8) for n in ("conditioning", "masks")]
        if cached[0] is not None and cached[1] is not None:
            return cached[0], cached[1]
    log.info("rendering conditioning of %d frames at %d px", t, s)
    key_path.unlink(missing_ok=True)
    remove_stale_partials(cache)
    params, source = target.params(), renderer()
    tmp = {n: partial_path(p) for n, p in paths.items()}
    try:
        out = {n: np.lib.format.open_memmap(tmp[n], mode="w+", dtype=np.uint8,
                                            shape=shapes[n]) for n in paths}
        for start in range(0, t, chunk):
            idx = np.arange(start, min(start + chunk, t))
            out["conditioning"][idx] = _quantise(source.frames(params, idx))
            out["masks"][idx] = _quantise(source.masks(params, idx), scale=1.0)
        for name, path in paths.items():
            out[name].flush()
            os.replace(tmp[name], path)
        del out
    finally:
        for partial in tmp.values():
            partial.unlink(missing_ok=True)
    key_path.write_text(json.dumps(key))
    return np.load(paths["conditioning"], mmap_mode="r"), np.load(paths["masks"], mmap_mode="r")


def _recorded_key(path: Path) -> Any:
    """The inputs a conditioning cache was made from (conditioning.json), None if unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _quantise(x: torch.Tensor, scale: float = 255.0) -> np.ndarray:
    return (x.detach().float() * scale).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def load_training_data(target: TargetDir, renderer: Callable[[], ConditioningSource],
                       mouth_box: np.ndarray | None = None) -> TrainingData:
    """The target's frames, cached conditioning, timestamps and split, as TrainingData.

    renderer: makes the ConditioningSource when the conditioning cache must be built.
    mouth_box: the face model's mouth in correspondence units (`renderer.regions.mouth_box`).
    """
    conditioning, masks = cache_conditioning(target, renderer)
    return TrainingData(
        conditioning=conditioning, masks=masks, frames=target.frames(),
        timestamps=target.params().timestamps, fps=target.info.fps,
        holdout_start=target.info.holdout_start, n_w=target.info.window, mouth_box=mouth_box)


def data_on_device(data: TrainingData, device: torch.device, placement: str) -> torch.device:
    """Where the dataset's tensors should live: `device` or the CPU.

    placement 'device' / 'host' forces it; 'auto' chooses the GPU when the cache takes under
    a quarter of its memory.
    """
    if placement not in ("auto", "device", "host"):
        raise DataError(f"unknown data placement '{placement}': use auto, device or host")
    if device.type != "cuda" or placement == "host":
        return torch.device("cpu")
    if placement == "device":
        return device
    nbytes = data.conditioning.nbytes + data.frames.nbytes + data.masks.nbytes
    total = torch.cuda.get_device_properties(device).total_memory
    return device if nbytes < total / 4 else torch.device("cpu")
