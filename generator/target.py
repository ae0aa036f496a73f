"""The target directory: everything one target actor needs, made by `dvp prepare`.

Layout (format_version 1)::

    target.yaml     format_version, source_video {path, sha256}, crop {x, y, size} (the square
                    box in source-video pixels), resolution (S), window (N_w), preset,
                    holdout_start (first held-out frame), frames (T), fps, consent,
                    software {dvp, python, torch, numpy}, created (UTC, ISO 8601)
    frames/         000000.png ... : the cropped S x S RGB frames, 8-bit PNG (lossless: they
                    are the training and evaluation ground truth, so no JPEG artefacts to learn)
    params.npz      FaceParams of every frame, camera of the S x S crop
    albedo.png      UV albedo texture, 8-bit RGB
    neutral.npz     reference pose and expression for relative transfer
    ranges.npz      per-axis [1st, 99th] percentile of the training frames' pose, expression
                    and gaze around the neutral (tracker.ranges.Ranges); optional: a target
                    without it (made before it existed) gets it computed on load
    checkpoints/    training checkpoints (generator.checkpoint)
    engine/         exported inference engines (generator.export)
    samples/        PNG grids of held-out frames and TensorBoard event files
    cache/          derived arrays (decoded frames, rendered conditioning); safe to delete

`TargetDir(path)` loads and checks one; `TargetWriter` builds one aside and renames it into
place, so a directory named like a target is always complete.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import logging
import os
import platform
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

import numpy as np
import yaml
from PIL import Image

from generator.errors import TargetError
from generator.parallel import ordered_map
from tracker.files import partial_path, read_npz, remove_stale_partials

if TYPE_CHECKING:
    from tracker.params import FaceParams
    from tracker.ranges import Ranges

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: Fraction of the frames, at the end of the video, held out of training.
HOLDOUT_FRACTION = 0.1
_FILES = ("params.npz", "albedo.png", "neutral.npz")
_KEYS = ("source_video", "crop", "resolution", "window", "preset", "holdout_start", "frames",
         "fps", "consent", "software")
_OUTPUT_DIRS = ("checkpoints", "engine", "samples")
_FRAME_FILE = re.compile(r"^(\d{6,})\.png$")
#: What PIL raises on a file that is not a readable image (UnidentifiedImageError and
#: "image file is truncated" are OSErrors).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class TargetInfo:
    """The contents of `target.yaml`.

    source_video / source_sha256: path of the video the target was made from and the SHA-256
    of its bytes. crop: (x, y, size) of the square crop in source-video pixels (left, top,
    side). resolution: S, pixels. window: N_w frames. preset: generator preset name.
    holdout_start: index of the first held-out frame (frames [holdout_start, frames) are not
    trained on). frames: T. fps: frames per second of the source video. consent: the consent
    text given to `dvp prepare`. software: package versions that wrote it.
    """

    source_video: str
    source_sha256: str
    crop: tuple[int, int, int]
    resolution: int
    window: int
    preset: str
    holdout_start: int
    frames: int
    fps: float
    consent: str
    software: dict[str, str] = field(default_factory=dict)
    created: str = ""

    def to_yaml(self) -> dict[str, Any]:
        """The mapping written to target.yaml."""
        data = asdict(self)
        x, y, size = self.crop
        return {
            "format_version": FORMAT_VERSION,
            "source_video": {"path": data.pop("source_video"), "sha256": data.pop("source_sha256")},
            "crop": {"x": int(x), "y": int(y), "size": int(size)},
            **{k: v for k, v in data.items() if k != "crop"},
        }

    @classmethod
    def from_yaml(cls, data: Mapping[str, Any], where: str) -> TargetInfo:
        """Parse target.yaml's mapping; `where` names the file in error messages."""
        missing = [k for k in _KEYS if k not in data]
        if missing:
            raise TargetError(f"{where} is missing key(s): {', '.join(missing)}")
        try:
            source, crop = data["source_video"], data["crop"]
            info = cls(
                source_video=str(source["path"]), source_sha256=str(source["sha256"]),
                crop=(int(crop["x"]), int(crop["y"]), int(crop["size"])),
                resolution=int(data["resolution"]), window=int(data["window"]),
                preset=str(data["preset"]), holdout_start=int(data["holdout_start"]),
                frames=int(data["frames"]), fps=float(data["fps"]),
                consent="" if data["consent"] is None else str(data["consent"]),
                software={str(k): str(v) for k, v in dict(data["software"]).items()},
                created=str(data.get("created", "")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise TargetError(f"{where} has a malformed entry: {err}") from err
        info.check(where)
        return info

    def check(self, where: str) -> None:
        """Raise TargetError naming the first value out of its range, or an empty consent."""
        if not self.consent.strip():
            raise TargetError(
                f"{where} records no consent ('consent' is empty): a target needs the "
                "consent of the person shown; make it with 'dvp prepare --consent TEXT'")
        for key, value in (("resolution", self.resolution), ("window", self.window),
                           ("frames", self.frames), ("crop size", self.crop[2])):
            if value < 1:
                raise TargetError(f"{where}: {key} must be at least 1, got {value}")
        if not 0 < self.fps < float("inf"):
            raise TargetError(f"{where}: fps must be a positive number, got {self.fps}")


def frame_name(index: int) -> str:
    """File name of frame `index` inside frames/ ('000042.png')."""
    return f"{index:06d}.png"


def holdout_start_for(frames: int) -> int:
    """First held-out frame: the last 10 % of `frames` (at least one frame) are held out."""
    return frames - max(1, round(frames * HOLDOUT_FRACTION))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def software_versions() -> dict[str, str]:
    """Versions of the software that writes a target (dvp, python, torch, numpy)."""
    try:
        dvp = importlib.metadata.version("live-dvp")
    except importlib.metadata.PackageNotFoundError:
        dvp = "unknown (not installed)"
    import torch

    return {"dvp": dvp, "python": platform.python_version(), "torch": str(torch.__version__),
            "numpy": str(np.__version__)}


def read_png(path: Path) -> np.ndarray:
    """An 8-bit RGB PNG as `[H, W, 3]` uint8 (a writable array).

    Raises TargetError naming the file when it is not a readable image (garbage, truncated).
    """
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise TargetError(f"{path} is missing") from None
    except _IMAGE_ERRORS as err:
        reason = str(err).replace(f" '{path}'", "") or type(err).__name__
        raise TargetError(f"{path} is not a readable image ({reason}): restore it, or make "
                          "the target again with 'dvp prepare'") from None


def load_cached(path: Path, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray | None:
    """A cached `.npy` array, memory-mapped read-only, or None when it must be made again:
    missing, damaged (truncated, not an .npy) or of another shape or dtype."""
    if not path.is_file():
        return None
    try:
        cached = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        log.warning("%s is damaged (%s): making it again", path, err)
        return None
    if cached.shape != shape or cached.dtype != np.dtype(dtype):
        return None
    return cached


def _write_frame(path_rgb: tuple[Path, np.ndarray]) -> None:
    """write_png of one frame of a target (its path and pixels), a failure raised as
    TargetError naming it."""
    path, rgb = path_rgb
    try:
        write_png(path, rgb)
    except OSError as err:
        raise TargetError(f"cannot write frame {path.name} of the target ({err})") from err


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write `[H, W, 3]` uint8 RGB as PNG."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3] uint8 RGB, got {rgb.shape} {rgb.dtype}")
    Image.fromarray(rgb).save(path, compress_level=1)


class TargetDir:
    """A checked target directory (see the module docstring for the layout).

    Loading reads target.yaml, checks its format_version and that every file exists, and
    raises TargetError naming the first problem: the missing files all at once.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta = self.root / "target.yaml"
        if not meta.is_file():
            raise TargetError(
                f"{self.root} is not a target directory: target.yaml is missing "
                "(make one with 'dvp prepare')")
        try:
            data = yaml.safe_load(meta.read_text())
        except yaml.YAMLError as err:
            raise TargetError(f"{meta} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise TargetError(f"{meta} is not a mapping")
        check_format_version(data.get("format_version"), meta)
        self.info = TargetInfo.from_yaml(data, str(meta))
        missing = [name for name in _FILES if not (self.root / name).is_file()]
        absent, first = self._absent_frames()
        if absent:
            more = f" (and {absent - 1} more frames)" if absent > 1 else ""
            missing.append(f"frames/{frame_name(first)}{more}")
        if missing:
            raise TargetError(f"target directory {self.root} is incomplete: missing "
                              + ", ".join(missing))
        if not 0 < self.info.holdout_start < self.info.frames:
            raise TargetError(
                f"{meta}: holdout_start {self.info.holdout_start} must lie in 1..{self.info.frames - 1}")

    def _absent_frames(self) -> tuple[int, int]:
        """(how many of frames/0..T-1 are missing, the first missing index), from one
        listing of frames/ (so a huge `frames` in target.yaml costs nothing)."""
        t = self.info.frames
        try:
            names = [e.name for e in os.scandir(self.frames_dir)]
        except (FileNotFoundError, NotADirectoryError):
            names = []
        present = set()
        for name in names:
            match = _FRAME_FILE.match(name)
            if match is not None and frame_name(int(match.group(1))) == name:
                index = int(match.group(1))
                if index < t:
                    present.add(index)
        if len(present) == t:
            return 0, -1
        first = next(i for i in range(len(present) + 1) if i not in present)
        return t - len(present), first

    @property
    def frames_dir(self) -> Path:
        return self.root / "frames"

    @property
    def params_path(self) -> Path:
        return self.root / "params.npz"

    @property
    def albedo_path(self) -> Path:
        return self.root / "albedo.png"

    @property
    def neutral_path(self) -> Path:
        return self.root / "neutral.npz"

    @property
    def ranges_path(self) -> Path:
        return self.root / "ranges.npz"

    def ranges(self, neutral: Any = None) -> Ranges | None:
        """The target's pose, expression and gaze ranges (tracker.ranges.Ranges) over its
        training frames, around its neutral (`neutral`, a tracker.transfer.Neutral, or
        neutral.npz's): `ranges.npz`, or computed here (not written) when the file is
        absent or was taken around another neutral. None when no training frame has a face.
        A damaged file raises TargetError."""
        from tracker.ranges import Ranges, RangesError
        from tracker.transfer import Neutral, TransferError

        if neutral is None:
            try:
                neutral = Neutral.load(self.neutral_path)
            except TransferError as err:
                raise TargetError(str(err)) from err
        if self.ranges_path.is_file():
            try:
                stored = Ranges.load(self.ranges_path)
            except RangesError as err:
                raise TargetError(f"{err} (delete it to have it computed again)") from err
            if stored.matches(neutral):
                return stored
            log.warning("%s was taken around another neutral than %s: computing the "
                        "ranges again", self.ranges_path, self.neutral_path)
        return training_ranges(self.params(), neutral, self.info.holdout_start)

    def output_dir(self, name: str) -> Path:
        """`checkpoints`, `engine`, `samples` or `cache` under the root, created if missing."""
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path

    def params(self) -> FaceParams:
        """The target's face parameters (tracker.params.FaceParams).

        Raises ParamsError (tracker.params) for an unreadable file, TargetError when it does
        not hold target.yaml's number of frames.
        """
        from tracker.params import FaceParams

        params = FaceParams.load(self.params_path)
        if params.frames != self.info.frames:
            raise TargetError(f"{self.params_path} holds {params.frames} frames, but "
                              f"target.yaml says {self.info.frames}")
        return params

    def neutral(self) -> dict[str, np.ndarray]:
        """The arrays of neutral.npz (reference pose and expression; keys as written by
        `dvp prepare`). Raises TargetError when the file is not a readable .npz."""
        try:
            return read_npz(self.neutral_path)
        except (ValueError, FileNotFoundError) as err:
            raise TargetError(f"{self.neutral_path}: not a readable .npz file ({err}): "
                              "make the target again with 'dvp prepare'") from None

    def albedo(self) -> np.ndarray:
        """The UV albedo texture `[H, W, 3]` uint8."""
        return read_png(self.albedo_path)

    def frame(self, index: int) -> np.ndarray:
        """Frame `index` as `[S, S, 3]` uint8 RGB."""
        return read_png(self.frames_dir / frame_name(index))

    def frames(self) -> np.ndarray:
        """All frames `[T, S, S, 3]` uint8, memory-mapped from `cache/frames.npy`.

        The cache is decoded from frames/ on first use (written aside, then renamed).
        """
        s, t = self.info.resolution, self.info.frames
        cache = self.output_dir("cache")
        path = cache / "frames.npy"
        cached = load_cached(path, (t, s, s, 3), np.uint8)
        if cached is not None:
            return cached
        remove_stale_partials(cache)
        tmp = partial_path(path)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(t, s, s, 3))
        try:
            for i in range(t):
                img = self.frame(i)
                if img.shape != (s, s, 3):
                    raise TargetError(f"{self.frames_dir / frame_name(i)} is {img.shape[1]}x"
                                      f"{img.shape[0]}, expected {s}x{s}")
                out[i] = img
            out.flush()
            del out
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return np.load(path, mmap_mode="r")


def training_ranges(params: FaceParams, neutral: Any, holdout_start: int) -> Ranges | None:
    """The ranges (tracker.ranges.Ranges) of the training frames [0, holdout_start) of
    `params` around `neutral` (what the network saw), or None when none of them has a face."""
    from tracker.ranges import Ranges

    train = params.select(slice(0, holdout_start))
    if not np.asarray(train.valid, bool).any():
        log.warning("no training frame has a face: no pose ranges (range adaptation off)")
        return None
    return Ranges.from_params(train, neutral)


def check_format_version(version: object, meta: Path) -> None:
    """Raise TargetError unless target.yaml's `format_version` is the one this dvp reads."""
    if version == FORMAT_VERSION and not isinstance(version, bool):
        return
    if version is None:
        raise TargetError(f"{meta} has no format_version; this dvp reads format_version "
                          f"{FORMAT_VERSION} (make the target again with 'dvp prepare')")
    if isinstance(version, str) and version.strip() == str(FORMAT_VERSION):
        raise TargetError(f"{meta} has format_version {version!r}, a string: write the number "
                          f"without quotes (format_version: {FORMAT_VERSION})")
    raise TargetError(f"{meta} has format_version {version!r}; this dvp reads format_version "
                      f"{FORMAT_VERSION} (make the target again with 'dvp prepare')")


class SavesNpz(Protocol):
    """Anything with `save(path)` writing an .npz (tracker.params.FaceParams does)."""

    def save(self, path: str | Path) -> Any: ...


class TargetWriter:
    """Builds a target directory in a staging folder beside `root`, renamed on `commit`.

    Use as a context manager: leaving it with an exception (or without `commit`) removes the
    staging folder, so `root` never holds half a target::

        with TargetWriter(root) as w:
            for rgb in frames: w.add_frame(rgb)
            w.write_params(params); w.write_albedo(tex); w.write_neutral(neutral)
            target = w.commit(info)
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists():
            raise TargetError(f"{self.root} already exists: choose a new target directory")
        self.root.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.root.parent, self.root.name)  # left by a killed run
        self.staging = partial_path(self.root)
        if self.staging.exists():
            shutil.rmtree(self.staging)
        (self.staging / "frames").mkdir(parents=True)
        for name in _OUTPUT_DIRS:
            (self.staging / name).mkdir()
        self.n_frames = 0
        self.size: int | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging)

    def _next_frame_path(self, rgb: np.ndarray) -> Path:
        """Check the next frame's shape against the others and claim its file name."""
        if rgb.ndim != 3 or rgb.shape[0] != rgb.shape[1]:
            raise ValueError(f"frames must be square [S, S, 3], got {rgb.shape}")
        if self.size is not None and rgb.shape[0] != self.size:
            raise ValueError(f"frame {self.n_frames} is {rgb.shape[0]} px, others {self.size} px")
        self.size = rgb.shape[0]
        path = self.staging / "frames" / frame_name(self.n_frames)
        self.n_frames += 1
        return path

    def add_frame(self, rgb: np.ndarray) -> None:
        """Append the next cropped frame, `[S, S, 3]` uint8 RGB."""
        write_png(self._next_frame_path(rgb), rgb)

    def add_frames(self, frames: Iterable[np.ndarray], threads: int = 0,
                   progress: Callable[[int], None] | None = None) -> int:
        """Append cropped frames `[S, S, 3]` uint8 RGB in order, their PNGs encoded and
        written on `threads` threads (generator.parallel.ordered_map: 0 auto, 1 one after
        another in this thread, as `add_frame`). `frames` is consumed in this thread, a few
        frames per thread ahead of the writes; `progress(1)` after each frame is written,
        in order. Returns the frames added. A frame of the wrong shape raises ValueError as
        `add_frame`; a write that fails raises TargetError naming the frame's file, after
        the writes under way have ended."""
        added = 0
        claimed = ((self._next_frame_path(rgb), rgb) for rgb in frames)
        for _ in ordered_map(_write_frame, claimed, threads):
            added += 1
            if progress is not None:
                progress(1)
        return added

    def write_params(self, params: SavesNpz) -> None:
        """Write params.npz (FaceParams of every frame, in the crop's camera)."""
        params.save(self.staging / "params.npz")

    def write_albedo(self, rgb: np.ndarray) -> None:
        """Write albedo.png, the UV albedo texture `[H, W, 3]` uint8."""
        write_png(self.staging / "albedo.png", rgb)

    def write_neutral(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Write neutral.npz from named arrays (reference pose and expression)."""
        np.savez(self.staging / "neutral.npz", **dict(arrays))

    def commit(self, info: TargetInfo) -> TargetDir:
        """Write target.yaml, check the staging folder loads, rename it to `root`."""
        if info.frames != self.n_frames:
            raise TargetError(f"target.yaml says {info.frames} frames but {self.n_frames} "
                              "were written")
        if self.size is not None and info.resolution != self.size:
            raise TargetError(f"target.yaml says {info.resolution} px but frames are "
                              f"{self.size} px")
        data = info.to_yaml()
        if not data["created"]:
            data["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        (self.staging / "target.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        TargetDir(self.staging)  # raises if anything is missing
        os.rename(self.staging, self.root)
        log.info("wrote target %s (%d frames at %d px)", self.root, info.frames, info.resolution)
        return TargetDir(self.root)
