"""What a user steers while driving a target: the transfer mode and the editing sliders.

`Controls` is immutable; a session replaces it whole (an atomic reference swap), so the
worker thread always reads one consistent set. `Controls.updated(message)` applies the
fields of a signalling `control` message (see docs/protocol.md) and raises ControlError
naming the first bad field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tracker.errors import DvpError

#: DESIGN.md's transfer modes.
MODES = ("full", "face", "gaze", "dub", "edit")
#: Slider ranges: head rotation offsets (degrees), head translation offsets (cm), gains,
#: gaze offsets (degrees).
MAX_ROTATION_DEG = 45.0
MAX_TRANSLATION_CM = 20.0
MAX_GAIN = 3.0
MAX_GAZE_DEG = 30.0


class ControlError(DvpError):
    """A control message with an unknown field or a value out of range."""


@dataclass(frozen=True)
class Controls:
    """The mode and the hand edits of one session.

    mode: one of MODES. The edits act in mode `edit` (tracker.transfer's `Edit`, see
    streamer.live.stages.edit_of): head_rotation_deg: (pitch, yaw, roll) degrees, the offset
    R_z(roll) R_y(yaw) R_x(pitch) in the head frame; head_translation_cm: (x, y, z) offsets,
    cm, camera axes; expression_gain: one factor on the source's expression change (eyeLook
    coefficients excepted: they follow gaze); expression_gains: per-coefficient factors by
    ICT name, on top of it; gaze_offset_deg: (yaw, pitch) added to both eyes, degrees.
    """

    mode: str = "full"
    head_rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    head_translation_cm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    expression_gain: float = 1.0
    expression_gains: Mapping[str, float] = field(default_factory=dict)
    gaze_offset_deg: tuple[float, float] = (0.0, 0.0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (for the `state` message)."""
        out = asdict(self)
        out["expression_gains"] = dict(self.expression_gains)
        for key in ("head_rotation_deg", "head_translation_cm", "gaze_offset_deg"):
            out[key] = list(out[key])
        return out

    def updated(self, message: Mapping[str, Any],
                expression_names: list[str] | None = None) -> Controls:
        """A copy with the fields present in `message` (a `control` message) changed.

        `neutral` and `type` are ignored here (the session acts on `neutral`); `reset: true`
        starts from the defaults (the mode kept unless given). Raises ControlError.
        """
        base = Controls(mode=self.mode) if message.get("reset") is True else self
        changes: dict[str, Any] = {}
        for key, value in message.items():
            if key in ("type", "neutral", "reset"):
                continue
            if key == "mode":
                if value not in MODES:
                    raise ControlError(f"control 'mode' must be one of {', '.join(MODES)}, "
                                       f"got {value!r}")
                changes["mode"] = value
            elif key == "head_rotation_deg":
                changes[key] = _vector(key, value, 3, MAX_ROTATION_DEG)
            elif key == "head_translation_cm":
                changes[key] = _vector(key, value, 3, MAX_TRANSLATION_CM)
            elif key == "gaze_offset_deg":
                changes[key] = _vector(key, value, 2, MAX_GAZE_DEG)
            elif key == "expression_gain":
                changes[key] = _number(key, value, 0.0, MAX_GAIN)
            elif key == "expression_gains":
                if not isinstance(value, Mapping):
                    raise ControlError("control 'expression_gains' must be an object "
                                       "{name: gain}")
                gains = dict(base.expression_gains)
                for name, gain in value.items():
                    if expression_names is not None and name not in expression_names:
                        raise ControlError(f"control 'expression_gains' names an unknown "
                                           f"expression {name!r}")
                    gains[str(name)] = _number(f"expression_gains.{name}", gain, 0.0, MAX_GAIN)
                changes[key] = gains
            else:
                raise ControlError(f"unknown control field {key!r}")
        return replace(base, **changes)


def _number(key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ControlError(f"control '{key}' must be a number, got {value!r}")
    if not low <= value <= high:
        raise ControlError(f"control '{key}' must lie in [{low:g}, {high:g}], got {value}")
    return float(value)


def _vector(key: str, value: Any, n: int, limit: float) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ControlError(f"control '{key}' must be a list of {n} numbers, got {value!r}")
    return tuple(_number(key, v, -limit, limit) for v in value)
