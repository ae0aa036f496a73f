"""The avatar feed: each frame's face parameters to a VMC-protocol receiver (OSC over UDP).

VMC ("Virtual Motion Capture" protocol, the convention VR/VTuber avatar software listens to)
carries, per frame, in OSC messages (see `streamer.vmc.osc`):

- `/VMC/Ext/Blend/Val (s)name (f)value` for each of ARKit's 52 blendshapes, spelt as Apple
  spells them (`eyeBlinkLeft`, `jawOpen`, ...), then `/VMC/Ext/Blend/Apply`;
- `/VMC/Ext/Bone/Pos (s)"Head" (f)px py pz (f)qx qy qz qw`: the head's position (metres) and
  rotation (quaternion) relative to the neutral pose, in Unity's left-handed axes;
- `/VMC/Ext/Root/Pos (s)"root"` at the origin, `/VMC/Ext/OK (i)loaded (i)calibration state
  (i)calibration mode (i)tracking status` and `/VMC/Ext/T (f)seconds`.

Blendshapes (DESIGN.md): ICT's `_L`/`_R` become ARKit's `Left`/`Right` (both the subject's
side); ARKit's `browInnerUp` and `cheekPuff` are the mean of ICT's left and right; ARKit's
`tongueOut` is 0 (ICT has none).

Axes: the tracker's camera is OpenCV's (x right in the image, y down, z away from the camera)
and a face at rotation 0 looks at the camera, so the subject's left is +x, up is -y and the
face's forward is -z. A Unity avatar faces +z with its left at -x and up at +y. Mapping the
subject's anatomy onto the avatar's (subject's left -> avatar's left: the avatar moves like
the user's mirror image, as avatar software expects) is M = diag(-1, -1, -1): so a head
rotation R (relative to the neutral, in camera axes) becomes M R M^-1 = R, the same matrix,
and the quaternion is R's by the usual formula (Unity's Quaternion <-> matrix formulas are
the standard ones; handedness only changes how the numbers look on screen); a head offset d
(cm, camera axes) becomes -d / 100 metres.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from streamer.vmc import osc
from tracker.errors import DvpError
from tracker.rotation import axis_angle_to_matrix_np

log = logging.getLogger(__name__)

#: ARKit's 52 blendshape names (ARFaceAnchor.BlendShapeLocation raw values).
ARKIT_NAMES: tuple[str, ...] = (
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
    "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft", "eyeLookDownRight", "eyeLookInLeft",
    "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight",
    "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight",
    "jawForward", "jawLeft", "jawOpen", "jawRight",
    "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthFunnel", "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft",
    "mouthPressRight", "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper",
    "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft", "mouthSmileRight",
    "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    "noseSneerLeft", "noseSneerRight", "tongueOut",
)
#: ARKit names that are the mean of ICT's `_L` and `_R`, and the one ICT does not have.
_MEAN_OF_SIDES = ("browInnerUp", "cheekPuff")
_ZERO = ("tongueOut",)
#: VMC's "calibrated" calibration state.
_CALIBRATED = 3


class VmcError(DvpError):
    """A bad `--vmc HOST:PORT` or a receiver address that cannot be used."""


def arkit_name(ict_name: str) -> str:
    """ARKit's spelling of one ICT expression name ('eyeBlink_L' -> 'eyeBlinkLeft')."""
    if ict_name.endswith("_L"):
        return ict_name[:-2] + "Left"
    if ict_name.endswith("_R"):
        return ict_name[:-2] + "Right"
    return ict_name


def ict_to_arkit(expression: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """ARKit's 52 blendshapes (in ARKIT_NAMES order) from ICT coefficients `(53,)` and names.

    Values are clipped to [0, 1]. Raises ValueError when a name ARKit needs is missing.
    """
    values = {arkit_name(str(n)): float(v)
              for n, v in zip(names, np.asarray(expression, np.float64))}
    out: dict[str, float] = {}
    for name in ARKIT_NAMES:
        if name in _ZERO:
            value = 0.0
        elif name in _MEAN_OF_SIDES:
            left, right = values.get(name + "Left"), values.get(name + "Right")
            if left is None or right is None:
                raise ValueError(f"expression names lack {name}_L/{name}_R for ARKit {name}")
            value = 0.5 * (left + right)
        elif name in values:
            value = values[name]
        else:
            raise ValueError(f"expression names lack the ICT name of ARKit {name}")
        out[name] = min(1.0, max(0.0, value))
    return out


def quaternion_xyzw(matrix: np.ndarray) -> np.ndarray:
    """Rotation matrix `(3, 3)` -> unit quaternion `(4,)` (x, y, z, w) with w >= 0."""
    m = np.asarray(matrix, np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4, (m[1, 0] - m[0, 1]) / s]
    quat = np.asarray(q) / np.linalg.norm(q)
    return -quat if quat[3] < 0 else quat


def relative_head_pose(rotation: np.ndarray, translation: np.ndarray,
                       neutral_rotation: np.ndarray, neutral_translation: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Head pose relative to the neutral, in camera (OpenCV) axes.

    rotation, neutral_rotation: axis-angle `(3,)`; translations `(3,)` cm. Returns the
    rotation matrix R R0^T `(3, 3)` and the offset t - t0 `(3,)` cm.
    """
    r_rel = axis_angle_to_matrix_np(rotation) @ axis_angle_to_matrix_np(neutral_rotation).T
    return r_rel, np.asarray(translation, np.float64) - np.asarray(neutral_translation, np.float64)


def unity_head_pose(rotation_rel: np.ndarray, offset_cm: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Relative head pose in OpenCV axes -> (position metres `(3,)`, quaternion xyzw `(4,)`)
    in Unity's left-handed axes for an avatar facing +z (see the module docstring)."""
    flip = -np.eye(3)
    r_unity = flip @ np.asarray(rotation_rel, np.float64) @ flip.T
    return flip @ np.asarray(offset_cm, np.float64) / 100.0, quaternion_xyzw(r_unity)


def vmc_messages(blendshapes: Mapping[str, float], position: np.ndarray,
                 quaternion: np.ndarray, seconds: float, tracking: bool) -> list[bytes]:
    """The OSC messages of one VMC frame, in the order a receiver applies them."""
    msgs = [osc.encode_message("/VMC/Ext/OK", 1, _CALIBRATED, 0, 1 if tracking else 0),
            osc.encode_message("/VMC/Ext/T", float(seconds)),
            osc.encode_message("/VMC/Ext/Root/Pos", "root", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)]
    px, py, pz = (float(v) for v in position)
    qx, qy, qz, qw = (float(v) for v in quaternion)
    msgs.append(osc.encode_message("/VMC/Ext/Bone/Pos", "Head", px, py, pz, qx, qy, qz, qw))
    msgs += [osc.encode_message("/VMC/Ext/Blend/Val", name, float(value))
             for name, value in blendshapes.items()]
    msgs.append(osc.encode_message("/VMC/Ext/Blend/Apply"))
    return msgs


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); VmcError naming the problem otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise VmcError(f"--vmc expects HOST:PORT (e.g. 127.0.0.1:39539), got {text!r}")
    return host.strip("[]"), int(port)


class VmcSender:
    """Sends VMC frames to one receiver over UDP (fire and forget; never blocks).

    `send(expression, names, rotation_rel, offset_cm, tracking)` sends one frame. Safe to
    call from one thread at a time (each live session's worker owns its sender).
    """

    def __init__(self, host: str, port: int) -> None:
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except socket.gaierror as err:
            raise VmcError(f"VMC receiver {host}:{port} cannot be resolved: {err}") from err
        self.address = info[4]
        self._sock = socket.socket(info[0], socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._start = time.monotonic()
        self.sent = 0

    def send(self, expression: np.ndarray, names: Sequence[str], rotation_rel: np.ndarray,
             offset_cm: np.ndarray, tracking: bool = True) -> None:
        """One frame: blendshapes from ICT `expression (53,)`, head pose relative to the
        neutral (`rotation_rel (3, 3)` and `offset_cm (3,)` in OpenCV axes)."""
        position, quaternion = unity_head_pose(rotation_rel, offset_cm)
        msgs = vmc_messages(ict_to_arkit(expression, names), position, quaternion,
                            time.monotonic() - self._start, tracking)
        for packet in osc.pack_bundles(msgs):
            try:
                self._sock.sendto(packet, self.address)
            except (BlockingIOError, ConnectionRefusedError):
                pass  # a full buffer or no receiver (yet): drop the frame, as UDP would
            except OSError as err:
                log.warning("VMC send to %s failed: %s", self.address, err)
        self.sent += 1

    def send_params(self, params: Any, neutral: Any, tracking: bool = True) -> None:
        """One frame from one-frame FaceParams `params` and the pose they are relative to
        (`neutral`, one-frame FaceParams: the target at rest)."""
        rot, offset = relative_head_pose(params.rotation[0], params.translation[0],
                                         neutral.rotation[0], neutral.translation[0])
        self.send(params.expression[0], [str(n) for n in params.expression_names], rot, offset,
                  tracking)

    def close(self) -> None:
        self._sock.close()
