"""One-Euro filtering of face parameters (Casiez, Roussel and Vogel, CHI 2012).

A first-order low-pass whose cutoff rises with the signal's speed: still faces lose their
jitter, moving ones their lag. The lag of an exponential smoother with cutoff fc is
1 / (2 pi fc) seconds for slow signals, so `min_cutoff` >= fps / (2 pi) Hz (4.8 Hz at 30 fps)
keeps the added lag at rest within one frame; the default, 5 Hz, adds 32 ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tracker.rotation import nearest_equivalent

#: Scales that make the parameter groups' speeds comparable for one `beta`: a speed of one
#: unit per second is 1 rad/s of head rotation, 20 cm/s of translation, 4 coefficients/s of
#: expression, 3 rad/s of gaze (each group's jitter, filtered, stays well below one unit).
GROUP_SCALES = {"rotation": 1.0, "translation": 20.0, "expression": 4.0, "gaze": 3.0}


def _alpha(dt: float, cutoff: np.ndarray | float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * math.pi * np.maximum(cutoff, 1e-6))
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One-Euro filter over arrays of a fixed shape; `filter(x, t)` per sample.

    min_cutoff (Hz): cutoff at rest; beta: cutoff increase per unit/s of (filtered) speed,
    speeds divided by `scale`; d_cutoff (Hz): cutoff of the speed estimate.
    """

    def __init__(self, min_cutoff: float = 5.0, beta: float = 20.0, d_cutoff: float = 1.0,
                 scale: float = 1.0) -> None:
        if min_cutoff <= 0 or d_cutoff <= 0 or beta < 0 or scale <= 0:
            raise ValueError("One-Euro filter: min_cutoff and d_cutoff must be > 0, "
                             "beta >= 0, scale > 0")
        self.min_cutoff = float(min_cutoff)
        self.beta = float(beta)
        self.d_cutoff = float(d_cutoff)
        self.scale = float(scale)
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next sample passes unchanged."""
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t: float | None = None

    def filter(self, x: np.ndarray, t: float) -> np.ndarray:
        """The filtered value of sample x at time t (seconds, increasing)."""
        x = np.asarray(x, np.float64)
        if self._x is None or self._t is None or self._dx is None or self._x.shape != x.shape:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), float(t)
            return x.astype(np.float32)
        dt = float(t) - self._t
        if not dt > 0:  # repeated or backward timestamp: nothing to integrate over
            return self._x.astype(np.float32)
        dx = (x - self._x) / dt
        self._dx = self._dx + _alpha(dt, self.d_cutoff) * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx) / self.scale
        self._x = self._x + _alpha(dt, cutoff) * (x - self._x)
        self._t = float(t)
        return self._x.astype(np.float32)

    __call__ = filter


@dataclass
class SmoothingSettings:
    """One-Euro settings shared by the parameter groups (see TrackerConfig)."""

    min_cutoff: float = 5.0
    beta: float = 20.0
    d_cutoff: float = 1.0


class ParamSmoother:
    """One-Euro filters for rotation (axis-angle), translation, expression and gaze.

    `smooth(rotation, translation, expression, gaze, t)` returns the filtered four; `reset()`
    when the track is lost so that the next face does not blend with the last one.
    """

    def __init__(self, settings: SmoothingSettings | None = None) -> None:
        s = settings or SmoothingSettings()
        self.filters = {name: OneEuroFilter(s.min_cutoff, s.beta, s.d_cutoff, scale)
                        for name, scale in GROUP_SCALES.items()}
        self._last_rotation: np.ndarray | None = None

    def reset(self) -> None:
        for f in self.filters.values():
            f.reset()
        self._last_rotation = None

    def smooth(self, rotation: np.ndarray, translation: np.ndarray, expression: np.ndarray,
               gaze: np.ndarray, t: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rotation = np.asarray(rotation, np.float64)
        if self._last_rotation is not None:
            rotation = nearest_equivalent(rotation, self._last_rotation)
        self._last_rotation = rotation
        return (self.filters["rotation"](rotation, t),
                self.filters["translation"](translation, t),
                np.clip(self.filters["expression"](expression, t), 0.0, 1.0),
                self.filters["gaze"](gaze, t))
