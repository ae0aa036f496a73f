"""Face parameters: the per-frame description of a face that every later stage believes.

`FaceParams` is DESIGN.md's contract: arrays with a leading time axis T, saved as `.npz`.
Units: translation in cm (model units), focal length and principal point in pixels,
rotation as axis-angle (radians) in the OpenCV camera frame, gaze yaw/pitch in radians.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from tracker.errors import DvpError
from tracker.files import read_npz, save_npz

N_IDENTITY = 100
N_EXPRESSION = 53


class ParamsError(DvpError):
    """A parameters file or array that does not match the FaceParams contract."""


# key -> (shape with 'T' for the time axis, dtype kind)
_SCHEMA: dict[str, tuple[tuple[int | str, ...], str]] = {
    "identity": ((N_IDENTITY,), "float32"),
    "expression": (("T", N_EXPRESSION), "float32"),
    "expression_names": ((N_EXPRESSION,), "str"),
    "rotation": (("T", 3), "float32"),
    "translation": (("T", 3), "float32"),
    "sh": (("T", 9, 3), "float32"),
    "gaze": (("T", 2, 2), "float32"),
    "focal": ((1,), "float32"),
    "principal_point": ((2,), "float32"),
    "image_size": ((2,), "int"),
    "valid": (("T",), "bool"),
    "timestamps": (("T",), "float32"),
}


@dataclass(frozen=True)
class FaceParams:
    """Face parameters of T frames (all numpy, on the CPU).

    identity (100,) f32: coefficients of ICT's identity modes, prior N(0, 1).
    expression (T, 53) f32 in [0, 1], names in `expression_names` (ICT's order and spelling).
    rotation (T, 3) f32 axis-angle; translation (T, 3) f32 cm: camera = R @ X + t.
    sh (T, 9, 3) f32: spherical-harmonics lighting per RGB channel.
    gaze (T, 2, 2) f32: per eye (0 = subject's left) yaw, pitch in radians.
    focal (1,) f32 px; principal_point (2,) f32 px (cx, cy); image_size (2,) int (h, w).
    valid (T,) bool: a face was found and fitted; timestamps (T,) f32 seconds.
    """

    identity: np.ndarray
    expression: np.ndarray
    expression_names: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    sh: np.ndarray
    gaze: np.ndarray
    focal: np.ndarray
    principal_point: np.ndarray
    image_size: np.ndarray
    valid: np.ndarray
    timestamps: np.ndarray

    def __post_init__(self) -> None:
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in check_arrays(arrays).items():
            object.__setattr__(self, key, value)

    @property
    def frames(self) -> int:
        """Number of frames T."""
        return int(self.expression.shape[0])

    def select(self, index: np.ndarray | slice | list[int]) -> FaceParams:
        """The frames at `index` (identity, camera and names kept)."""
        per_frame = {k: getattr(self, k)[index] for k, (shape, _) in _SCHEMA.items()
                     if shape and shape[0] == "T"}
        return replace(self, **per_frame)

    @staticmethod
    def concat(parts: list[FaceParams]) -> FaceParams:
        """The frames of `parts` one after another (identity, camera and names: the first's)."""
        if not parts:
            raise ParamsError("cannot concatenate no parameters")
        per_frame = {k: np.concatenate([getattr(p, k) for p in parts])
                     for k, (shape, _) in _SCHEMA.items() if shape and shape[0] == "T"}
        return replace(parts[0], **per_frame)

    def save(self, path: str | Path) -> Path:
        """Write `.npz` atomically (aside, then renamed); returns the path."""
        return save_npz(path, {f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> FaceParams:
        """Read a `.npz` written by `save`; a missing key or wrong shape raises ParamsError."""
        path = Path(path)
        if not path.is_file():
            raise ParamsError(f"{path}: no such parameters file")
        try:
            arrays = read_npz(path)
        except ValueError as err:
            raise ParamsError(f"{path}: not a parameters .npz file ({err})") from err
        missing = [k for k in _SCHEMA if k not in arrays]
        if missing:
            raise ParamsError(f"{path}: missing key '{missing[0]}'")
        try:
            return cls(**{k: arrays[k] for k in _SCHEMA})
        except ParamsError as err:
            raise ParamsError(f"{path}: {err}") from err

    @classmethod
    def empty(
        cls,
        frames: int,
        names: list[str] | np.ndarray,
        image_size: tuple[int, int],
        focal: float,
        timestamps: np.ndarray | None = None,
    ) -> FaceParams:
        """Neutral parameters for `frames` frames: mean identity, zero pose at 50 cm depth,
        ambient white light, `valid=False`, principal point at the image centre."""
        h, w = image_size
        sh = np.zeros((frames, 9, 3), np.float32)
        sh[:, 0, :] = 1.0 / 0.886227  # irradiance 1 from the constant band
        translation = np.zeros((frames, 3), np.float32)
        translation[:, 2] = 50.0
        return cls(
            identity=np.zeros(N_IDENTITY, np.float32),
            expression=np.zeros((frames, N_EXPRESSION), np.float32),
            expression_names=np.asarray(names, dtype=str),
            rotation=np.zeros((frames, 3), np.float32),
            translation=translation,
            sh=sh,
            gaze=np.zeros((frames, 2, 2), np.float32),
            focal=np.asarray([focal], np.float32),
            principal_point=np.asarray([w / 2.0, h / 2.0], np.float32),
            image_size=np.asarray([h, w], np.int64),
            valid=np.zeros(frames, bool),
            timestamps=(np.arange(frames, dtype=np.float32) / 30.0 if timestamps is None
                        else np.asarray(timestamps, np.float32)),
        )


def check_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check keys, shapes and dtypes against the contract; return them cast to its dtypes.

    Raises ParamsError naming the first missing key, wrong shape or non-finite value.
    """
    frames: int | None = None
    out: dict[str, np.ndarray] = {}
    for key, (shape, kind) in _SCHEMA.items():
        if key not in arrays or arrays[key] is None:
            raise ParamsError(f"missing key '{key}'")
        value = np.asarray(arrays[key])
        if len(shape) != value.ndim:
            raise ParamsError(f"key '{key}' has shape {value.shape}, expected {_show(shape)}")
        for want, got in zip(shape, value.shape):
            if want == "T":
                frames = got if frames is None else frames
                if got != frames:
                    raise ParamsError(
                        f"key '{key}' has {got} frames, expected {frames} like the others")
            elif want != got:
                raise ParamsError(f"key '{key}' has shape {value.shape}, expected {_show(shape)}")
        if kind == "str":
            value = value.astype(str)
        elif kind == "bool":
            value = value.astype(bool)
        elif kind == "int":
            value = value.astype(np.int64)
        else:
            if not np.issubdtype(value.dtype, np.number):
                raise ParamsError(f"key '{key}' has dtype {value.dtype}, expected {kind}")
            value = value.astype(np.float32)
            if not np.all(np.isfinite(value)):
                raise ParamsError(f"key '{key}' holds NaN or infinite values")
        out[key] = value
    return out


def _show(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
