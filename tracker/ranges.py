"""The range of poses, expressions and gaze an actor showed, and fitting motion into it.

A target's network only reproduces what its video covered: a head turned or moved further
than the target ever did, or a mouth opened wider, comes out smeared. `Ranges` holds, per
axis, the [1st, 99th] percentile of what a tracked sequence showed, relative to the actor's
neutral (`tracker.transfer.Neutral`):

- rotation (2, 3): radians, the components of the axis-angle vector of R_n^T R (the head's
  rotation from its neutral, in the head frame: about x = pitch, y = yaw, z = roll for
  moderate angles);
- translation (2, 3): cm, t - t_n (camera axes);
- expression (2, 53): the coefficients themselves (in [0, 1]);
- gaze (2, 2, 2): radians, yaw and pitch per eye, the values themselves;

row 0 the low end, row 1 the high end. A target directory keeps its ranges in `ranges.npz`
(written by `dvp prepare`, computed on load for older targets; generator.target).

`RangeMap` fits a source's change from its neutral into a target's ranges (transfer's
`adapt` setting): per axis the change is scaled by min(1, target spread / source spread)
(spread = high - low; never amplified) and then passed through `soft_limit`, the identity
up to `knee` of the way to the target's extreme, then a tanh that bends toward the extreme
and never reaches it; smooth (C1), monotonic, the neutral maps to itself. Expression
coefficients are adapted only where the target's spread is narrow (below `narrow`); the
others pass unchanged.

`inside(...)`: whether a frame's pose lies inside a target's ranges widened by a fraction
of their spread on each side (issue 13: 10 %): the check of `dvp reenact --report`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tracker.errors import DvpError
from tracker.files import read_npz, save_npz
from tracker.params import FaceParams
from tracker.rotation import axis_angle_to_matrix_np, matrix_to_axis_angle

if TYPE_CHECKING:
    from tracker.transfer import Neutral

RANGES_FORMAT = 1
#: The percentiles a range spans.
PERCENTILES = (1.0, 99.0)
#: Fraction of a range's spread by which `inside` widens it on each side.
WIDEN = 0.1
#: Range settings of the transfer (TransferConfig.range).
RANGE_SETTINGS = ("adapt", "raw")
_GROUPS = {"rotation": (3,), "translation": (3,), "expression": None, "gaze": (2, 2)}


class RangesError(DvpError):
    """A ranges file or request that cannot be used (message says why)."""


def check_range_setting(value: str) -> str:
    """`value` when it is a range setting (adapt, raw); RangesError naming it otherwise."""
    if value not in RANGE_SETTINGS:
        raise RangesError(f"transfer.range must be one of {', '.join(RANGE_SETTINGS)}, "
                          f"got '{value}'")
    return value


def relative_pose(params: FaceParams, neutral: Neutral) -> tuple[np.ndarray, np.ndarray]:
    """The pose of every frame relative to `neutral`: rotation (T, 3) float32 radians (the
    axis-angle vector of R_n^T R, head frame) and translation (T, 3) float32 cm (t - t_n)."""
    r_n = axis_angle_to_matrix_np(np.asarray(neutral.rotation)[None])[0]
    rel = matrix_to_axis_angle(r_n.T[None] @ axis_angle_to_matrix_np(params.rotation))
    return rel.astype(np.float32), (params.translation - neutral.translation).astype(np.float32)


@dataclass(frozen=True)
class Ranges:
    """Per-axis [low, high] of a tracked sequence, relative to its neutral (module doc).

    rotation (2, 3) float32 rad; translation (2, 3) float32 cm; expression (2, E) float32;
    gaze (2, 2, 2) float32 rad; frames: how many frames they were taken over; neutral_rotation
    (3,), neutral_translation (3,): the neutral pose they are relative to.
    """

    rotation: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    gaze: np.ndarray
    frames: int
    neutral_rotation: np.ndarray
    neutral_translation: np.ndarray

    def __post_init__(self) -> None:
        for key, shape in _GROUPS.items():
            value = np.asarray(getattr(self, key), np.float32)
            want = (2,) + (shape if shape is not None else value.shape[1:2])
            if value.shape != want or value.ndim < 2:
                raise RangesError(f"ranges '{key}' has shape {value.shape}, expected {want}")
            if not np.all(np.isfinite(value)):
                raise RangesError(f"ranges '{key}' holds NaN or infinite values")
            if np.any(value[0] > value[1]):
                raise RangesError(f"ranges '{key}' has a low end above its high end")
            object.__setattr__(self, key, value)
        for key in ("neutral_rotation", "neutral_translation"):
            value = np.asarray(getattr(self, key), np.float32)
            if value.shape != (3,):
                raise RangesError(f"ranges '{key}' has shape {value.shape}, expected (3,)")
            object.__setattr__(self, key, value)
        object.__setattr__(self, "frames", int(self.frames))

    @classmethod
    def from_params(cls, params: FaceParams, neutral: Neutral,
                    percentiles: tuple[float, float] = PERCENTILES) -> Ranges:
        """The [1st, 99th] percentiles of the valid frames of `params` around `neutral`.
        Raises RangesError when no frame is valid."""
        valid = np.asarray(params.valid, bool)
        if not valid.any():
            raise RangesError("cannot measure ranges: no frame has a face (valid)")
        return cls.from_arrays(params.rotation[valid], params.translation[valid],
                               params.expression[valid], params.gaze[valid], neutral,
                               percentiles)

    @classmethod
    def from_arrays(cls, rotation: np.ndarray, translation: np.ndarray,
                    expression: np.ndarray, gaze: np.ndarray, neutral: Neutral,
                    percentiles: tuple[float, float] = PERCENTILES) -> Ranges:
        """`from_params` of the frames' arrays (N >= 1 frames, all with a face): rotation
        (N, 3) axis-angle, translation (N, 3) cm, expression (N, E), gaze (N, 2, 2)."""
        r_n = axis_angle_to_matrix_np(np.asarray(neutral.rotation)[None])[0]
        rot = matrix_to_axis_angle(r_n.T[None] @ axis_angle_to_matrix_np(rotation))
        trans = np.asarray(translation) - neutral.translation

        def span(values: np.ndarray) -> np.ndarray:
            return percentile_rows(values, percentiles).astype(np.float32)

        return cls(span(rot), span(trans), span(np.asarray(expression)),
                   span(np.asarray(gaze)), len(rot), np.asarray(neutral.rotation),
                   np.asarray(neutral.translation))

    def spread(self, key: str) -> np.ndarray:
        """high - low of group `key` (rotation, translation, expression, gaze)."""
        value = getattr(self, key)
        return value[1] - value[0]

    def widened(self, fraction: float = WIDEN) -> Ranges:
        """The ranges with each end moved out by `fraction` of the spread."""
        out = {}
        for key in _GROUPS:
            value = getattr(self, key)
            pad = fraction * (value[1] - value[0])
            out[key] = np.stack([value[0] - pad, value[1] + pad])
        return Ranges(**out, frames=self.frames, neutral_rotation=self.neutral_rotation,
                      neutral_translation=self.neutral_translation)

    def matches(self, neutral: Neutral, tolerance: float = 1e-4) -> bool:
        """Whether these ranges were taken around `neutral`'s pose."""
        return bool(np.allclose(self.neutral_rotation, neutral.rotation, atol=tolerance)
                    and np.allclose(self.neutral_translation, neutral.translation,
                                    atol=tolerance))

    def save(self, path: str | Path) -> Path:
        """Write `ranges.npz` (aside, then renamed)."""
        return save_npz(path, {"format": np.asarray(RANGES_FORMAT),
                               "percentiles": np.asarray(PERCENTILES, np.float32),
                               "frames": np.asarray(self.frames),
                               **{k: getattr(self, k) for k in _GROUPS},
                               "neutral_rotation": self.neutral_rotation,
                               "neutral_translation": self.neutral_translation})

    @classmethod
    def load(cls, path: str | Path) -> Ranges:
        """Read a file written by `save`; RangesError names a missing key or bad shape."""
        path = Path(path)
        if not path.is_file():
            raise RangesError(f"{path}: no such ranges file")
        try:
            arrays = read_npz(path)
        except ValueError as err:
            raise RangesError(f"{path}: not a ranges .npz file ({err})") from err
        keys = (*_GROUPS, "frames", "neutral_rotation", "neutral_translation", "format")
        for key in keys:
            if key not in arrays:
                raise RangesError(f"{path}: missing key '{key}'")
        if int(arrays["format"]) != RANGES_FORMAT:
            raise RangesError(f"{path}: format {int(arrays['format'])}, this dvp reads "
                              f"format {RANGES_FORMAT}")
        try:
            return cls(**{k: arrays[k] for k in keys if k != "format"})
        except (RangesError, TypeError, ValueError) as err:
            raise RangesError(f"{path}: {err}") from err


def percentile_rows(values: np.ndarray, q: tuple[float, ...]) -> np.ndarray:
    """np.percentile(values, q, axis=0) (linear interpolation) by one sort along the rows:
    several times faster than np.percentile for many columns (the live spread estimate
    recomputes it once a second)."""
    ordered = np.sort(np.asarray(values, np.float64), axis=0)
    n = len(ordered)
    pos = np.asarray(q, np.float64) / 100.0 * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = (pos - lo).reshape((-1,) + (1,) * (ordered.ndim - 1))
    return ordered[lo] * (1.0 - frac) + ordered[hi] * frac


def soft_limit(x: np.ndarray, low: np.ndarray, high: np.ndarray,
               knee: float = 0.8) -> np.ndarray:
    """Values `x` (changes from a neutral at 0) bent smoothly into [low, high] (low <= 0 <=
    high, broadcast against x): the identity on [knee * low, knee * high], beyond it
    `k + m tanh((x - k) / m)` with k = knee * high, m = (1 - knee) * high (mirrored below).
    Monotonic, continuous with a continuous slope, 0 -> 0; a side of zero width gives 0."""
    x = np.asarray(x, np.float64)
    low = np.minimum(np.asarray(low, np.float64), 0.0)
    high = np.maximum(np.asarray(high, np.float64), 0.0)
    knee = float(np.clip(knee, 0.0, 1.0 - 1e-6))

    def bend(v: np.ndarray, top: np.ndarray) -> np.ndarray:  # for v >= 0, top >= 0
        k, m = knee * top, (1.0 - knee) * top
        safe = np.where(m > 0, m, 1.0)
        bent = np.where(m > 0, k + m * np.tanh((v - k) / safe), 0.0)
        return np.where(v <= k, v, bent)

    pos = bend(np.maximum(x, 0.0), np.broadcast_to(high, x.shape))
    neg = -bend(np.maximum(-x, 0.0), np.broadcast_to(-low, x.shape))
    return np.where(x >= 0, pos, neg)


def range_scale(target_spread: np.ndarray, source_spread: np.ndarray | None) -> np.ndarray:
    """Per-axis scale min(1, target / source) of two spreads (1 where the source's is
    unknown or zero): a source that moves more than the target is compressed, never the
    other way round (that would turn a small nod, or noise, into a large one)."""
    target_spread = np.asarray(target_spread, np.float64)
    if source_spread is None:
        return np.ones_like(target_spread)
    source_spread = np.asarray(source_spread, np.float64)
    ratio = target_spread / np.where(source_spread > 1e-9, source_spread, 1.0)
    return np.where(source_spread > 1e-9, np.minimum(1.0, ratio), 1.0)


@dataclass(frozen=True)
class RangeMap:
    """Fits a source's changes from its neutral into a target's ranges (module doc).

    target: the target's Ranges (around the target's neutral); source: the source's spread
    (Ranges around the source's neutral), or None (no scaling, the soft limit only);
    narrow: expression coefficients whose target spread is below it are adapted; knee: the
    soft limit's knee. `scales` may replace the computed per-axis scales (the live
    estimate, `SpreadEstimate`): a dict with keys rotation (3,), translation (3,),
    expression (E,), gaze (2, 2), translation's in source cm (the depth ratio is applied
    in `translation`).
    """

    target: Ranges
    source: Ranges | None = None
    narrow: float = 0.8
    knee: float = 0.8
    scales: dict[str, np.ndarray] | None = None

    def scale(self, key: str) -> np.ndarray:
        """The per-axis scale of group `key` (translation: before the depth ratio)."""
        if self.scales is not None and key in self.scales:
            return np.asarray(self.scales[key], np.float64)
        return range_scale(self.target.spread(key),
                           None if self.source is None else self.source.spread(key))

    def rotation(self, change: np.ndarray) -> np.ndarray:
        """Source rotation changes (T, 3) (axis-angle, head frame) -> the target's."""
        lo, hi = self.target.rotation
        return soft_limit(self.scale("rotation") * change, lo, hi, self.knee).astype(np.float32)

    def translation(self, change: np.ndarray, depth_ratio: float) -> np.ndarray:
        """Source translation changes (T, 3), already times the depth ratio (target cm) ->
        the target's. The source's spread is in source cm: scaled by `depth_ratio` here."""
        if self.scales is not None and "translation" in self.scales:
            scale = np.asarray(self.scales["translation"], np.float64)
        else:
            src = None if self.source is None else self.source.spread("translation") \
                * depth_ratio
            scale = range_scale(self.target.spread("translation"), src)
        lo, hi = self.target.translation
        return soft_limit(scale * change, lo, hi, self.knee).astype(np.float32)

    def expression(self, change: np.ndarray, neutral: np.ndarray) -> np.ndarray:
        """Source expression changes (T, E) -> the target's changes from its neutral
        expression `neutral` (E,); coefficients with a wide target range pass unchanged."""
        lo, hi = self.target.expression
        narrow = (hi - lo) < self.narrow
        limited = soft_limit(self.scale("expression") * change, lo - neutral, hi - neutral,
                             self.knee)
        return np.where(narrow[None], limited, change).astype(np.float32)

    def gaze(self, change: np.ndarray, neutral: np.ndarray) -> np.ndarray:
        """Source gaze changes (T, 2, 2) -> the target's changes from its neutral gaze
        `neutral` (2, 2)."""
        lo, hi = self.target.gaze
        return soft_limit(self.scale("gaze") * change, lo - neutral, hi - neutral,
                          self.knee).astype(np.float32)


def inside(params: FaceParams, neutral: Neutral, ranges: Ranges,
           widen: float = WIDEN) -> np.ndarray:
    """(T,) bool: the frame's head pose (3 rotation and 3 translation axes, relative to
    `neutral`) lies inside `ranges` widened by `widen` of each axis's spread on each side.
    Frames whose values are not finite are outside."""
    wide = ranges.widened(widen)
    rot, trans = relative_pose(params, neutral)
    ok = np.all((rot >= wide.rotation[0]) & (rot <= wide.rotation[1]), axis=1)
    ok &= np.all((trans >= wide.translation[0]) & (trans <= wide.translation[1]), axis=1)
    return ok & np.all(np.isfinite(rot), axis=1) & np.all(np.isfinite(trans), axis=1)


class SpreadEstimate:
    """A live source's spread, estimated as it goes (TransferConfig `spread_*`).

    `add(source)` records each valid frame (absolute values; a one-frame FaceParams) in a
    ring of `capacity` frames; `scales(target, neutral, depth_ratio, t)` gives the per-axis
    scales for `RangeMap.scales`: 1 until `min_seconds` of frames are seen; then,
    recomputed once per second, min(1, target spread / source spread) with the source's
    spread the [1st, 99th] percentile over the last `window_seconds` around the current
    neutral; the scales in use move toward the recomputed ones exponentially with time
    constant `smoothing_seconds`, so they never jump. `reset()` forgets the frames (a new
    neutral keeps them: they are absolute).
    """

    def __init__(self, window_seconds: float = 60.0, min_seconds: float = 5.0,
                 smoothing_seconds: float = 2.0, capacity: int = 3600) -> None:
        self.window = float(window_seconds)
        self.min_seconds = float(min_seconds)
        self.smoothing = max(1e-3, float(smoothing_seconds))
        self.capacity = int(capacity)
        self._arrays: dict[str, np.ndarray] | None = None
        self._count = 0  # frames written so far (the ring's head is _count % capacity)
        self.reset()

    def reset(self) -> None:
        self._arrays, self._count = None, 0
        self._goal: dict[str, np.ndarray] | None = None
        self._current: dict[str, np.ndarray] | None = None
        self._computed_at: float | None = None
        self._last_t: float | None = None

    def add(self, source: FaceParams) -> None:
        if not source.frames or not bool(source.valid[-1]):
            return
        values = {"rotation": source.rotation[-1], "translation": source.translation[-1],
                  "expression": source.expression[-1], "gaze": source.gaze[-1],
                  "timestamps": np.asarray(source.timestamps[-1])}
        if self._arrays is None:
            self._arrays = {k: np.zeros((self.capacity,) + v.shape, np.float64)
                            for k, v in values.items()}
        slot = self._count % self.capacity
        for key, value in values.items():
            self._arrays[key][slot] = value
        self._count += 1

    def _recent(self) -> dict[str, np.ndarray]:
        """The stored frames of the last `window` seconds."""
        if self._arrays is None:
            return {}
        n = min(self._count, self.capacity)
        times = self._arrays["timestamps"][:n]
        newest = self._arrays["timestamps"][(self._count - 1) % self.capacity]
        keep = times >= newest - self.window
        return {k: v[:n][keep] for k, v in self._arrays.items()}

    def seen_seconds(self) -> float:
        recent = self._recent()
        if not recent or len(recent["timestamps"]) < 2:
            return 0.0
        return float(np.ptp(recent["timestamps"]))

    def scales(self, target: Ranges, neutral: Neutral, depth_ratio: float,
               t: float) -> dict[str, np.ndarray]:
        """Per-axis scales at time `t` (seconds) for `RangeMap(scales=...)`."""
        ones = {k: np.ones(target.spread(k).shape) for k in _GROUPS}
        if self._computed_at is None or t - self._computed_at >= 1.0:
            recent = self._recent()
            if recent and len(recent["timestamps"]) >= 2 and \
                    float(np.ptp(recent["timestamps"])) >= self.min_seconds:
                spread = Ranges.from_arrays(recent["rotation"], recent["translation"],
                                            recent["expression"], recent["gaze"], neutral)
                goal = {k: range_scale(target.spread(k), spread.spread(k)) for k in _GROUPS
                        if k != "translation"}
                goal["translation"] = range_scale(target.spread("translation"),
                                                  spread.spread("translation") * depth_ratio)
                self._goal, self._computed_at = goal, t
        goal = self._goal or ones
        if self._current is None:
            self._current = dict(goal)
        else:
            dt = 0.0 if self._last_t is None else max(0.0, t - self._last_t)
            w = 1.0 - float(np.exp(-dt / self.smoothing))
            self._current = {k: (1 - w) * self._current[k] + w * goal[k] for k in goal}
        self._last_t = t
        return self._current


def concat_frames(frames: list[FaceParams]) -> FaceParams:
    """One FaceParams of several (same identity, camera and names), frames in order."""
    from dataclasses import replace

    keys = ("rotation", "translation", "expression", "gaze", "sh", "valid", "timestamps")
    return replace(frames[0], **{k: np.concatenate([getattr(f, k) for f in frames])
                                 for k in keys})
