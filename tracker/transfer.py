"""Transfer of a source actor's motion onto a target actor, relative to each one's neutral.

The source's change from its neutral is applied to the target's neutral, so that two faces
with different resting poses and expressions (one smiles a little at rest, one holds the
head tilted) map rest to rest:

- rotation: R = R_tn (R_sn^T R_s), the source's rotation from its neutral in its head frame;
- translation: t = t_tn + (t_s - t_sn) * z_tn / z_sn, the source's move scaled by the two
  depths, so it covers the same angle in the target's camera;
- expression: e = clip(e_tn + (e_s - e_sn), 0, 1), coefficient by coefficient;
- gaze: g = g_tn + (g_s - g_sn); the eyeLook coefficients are then recomputed from it.

With a `RangeMap` (tracker/ranges.py; the `adapt` setting of `transfer.range`) each change
is first fitted into the target's observed range: scaled per axis from the source's spread
to the target's and softly limited at the target's extremes.

The source's neutral: `Neutral.from_rest(params)` takes the median over its resting frames
(`rest_scores`: stable, frontal, closed mouth, eyes open), not just the first frame.

Modes (DESIGN.md), on what comes from the source (the rest is the target frame's own):

- `full`: pose, expression, gaze and blinks;
- `face`: expression only (blinks included, eyeLook excepted); pose and gaze the target's;
- `gaze`: the eyes: gaze and blinks (eyeBlink_L/R); all else the target's;
- `dub`: mouth and jaw only (jaw*, mouth*, cheekPuff*); the target's own blinks, gaze, pose;
- `edit`: `full` with the hand-set gains and offsets of an `Edit` (gain 0 keeps the
  neutral, offsets add to it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tracker.config import TransferConfig
from tracker.errors import DvpError
from tracker.face_model import EYELOOK_NAMES, gaze_to_eyelook
from tracker.files import read_npz, save_npz
from tracker.params import FaceParams
from tracker.ranges import RangeMap
from tracker.rotation import axis_angle_to_matrix_np, matrix_to_axis_angle

MODES = ("full", "face", "gaze", "dub", "edit")
NEUTRAL_FORMAT = 1


class TransferError(DvpError):
    """A transfer request or neutral file that cannot be used (message says why)."""


@dataclass(frozen=True)
class Neutral:
    """An actor's reference (resting) face: the target directory's `neutral.npz`.

    rotation (3,) float32 axis-angle radians; translation (3,) float32 cm; expression
    (53,) float32 in [0, 1] (eyeLook columns = gaze_to_eyelook(gaze)); gaze (2, 2) float32
    yaw, pitch radians per eye (0 = subject's left).
    """

    rotation: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    gaze: np.ndarray

    def __post_init__(self) -> None:
        for key, shape in (("rotation", (3,)), ("translation", (3,)), ("gaze", (2, 2))):
            value = np.asarray(getattr(self, key), np.float32)
            if value.shape != shape:
                raise TransferError(f"neutral '{key}' has shape {value.shape}, expected {shape}")
            if not np.all(np.isfinite(value)):
                raise TransferError(f"neutral '{key}' holds NaN or infinite values")
            object.__setattr__(self, key, value)
        expr = np.asarray(self.expression, np.float32)
        if expr.ndim != 1:
            raise TransferError(f"neutral 'expression' has shape {expr.shape}, expected (53,)")
        if not np.all(np.isfinite(expr)):
            raise TransferError("neutral 'expression' holds NaN or infinite values")
        object.__setattr__(self, "expression", np.clip(expr, 0.0, 1.0))

    @classmethod
    def zero(cls, n_expression: int = 53, depth: float = 50.0) -> Neutral:
        """Upright, looking into the camera at `depth` cm, no expression."""
        return cls(np.zeros(3), np.asarray([0.0, 0.0, depth]), np.zeros(n_expression),
                   np.zeros((2, 2)))

    @classmethod
    def from_params(cls, params: FaceParams, percentile: float = 10.0) -> Neutral:
        """Estimate a neutral from a tracked sequence's valid frames: the median pose and
        gaze, and per coefficient the `percentile`-th percentile of the expression (a
        resting face is the low end of what the actor does; a coefficient held all along,
        say a slight smile, stays in)."""
        valid = np.asarray(params.valid, bool)
        if not valid.any():
            raise TransferError("cannot estimate a neutral: no frame has a face (valid)")
        rot = _median_rotation(params.rotation[valid])
        gaze = np.median(params.gaze[valid], axis=0)
        expr = np.percentile(params.expression[valid], percentile, axis=0)
        names = [str(n) for n in params.expression_names]
        expr = _set_eyelook(expr[None], gaze[None], names)[0]
        return cls(rot, np.median(params.translation[valid], axis=0), expr, gaze)

    @classmethod
    def from_rest(cls, params: FaceParams, config: TransferConfig | None = None,
                  min_frames: int = 5) -> Neutral:
        """The neutral of an actor's resting frames: those whose `rest_scores` are at most 1
        (stable, frontal, closed mouth, eyes open); when fewer than `min_frames` are, the
        `min_frames` frames nearest to rest. Median pose, gaze and expression over them.
        Raises TransferError when no frame is valid."""
        chosen = rest_frames(params, config, min_frames)
        return cls.from_params(params.select(chosen), percentile=50.0)

    def save(self, path: str | Path) -> Path:
        """Write `.npz` (aside, then renamed)."""
        return save_npz(path, {"format": np.asarray(NEUTRAL_FORMAT), "rotation": self.rotation,
                               "translation": self.translation, "expression": self.expression,
                               "gaze": self.gaze})

    @classmethod
    def load(cls, path: str | Path) -> Neutral:
        """Read a neutral written by `save`; TransferError names a missing key or shape."""
        path = Path(path)
        if not path.is_file():
            raise TransferError(f"{path}: no such neutral file")
        try:
            arrays = read_npz(path)
        except ValueError as err:
            raise TransferError(f"{path}: not a neutral .npz file ({err})") from err
        for key in ("rotation", "translation", "expression", "gaze"):
            if key not in arrays:
                raise TransferError(f"{path}: missing key '{key}'")
        try:
            return cls(arrays["rotation"], arrays["translation"], arrays["expression"],
                       arrays["gaze"])
        except TransferError as err:
            raise TransferError(f"{path}: {err}") from err


@dataclass(frozen=True)
class Edit:
    """Hand-set gains and offsets of mode `edit` (the live page's sliders).

    Gains scale the source's change from its neutral (1 = as is, 0 = hold the target's
    neutral, 2 = exaggerate); offsets are added after: rotation_offset (3,) axis-angle in
    the head frame, radians; translation_offset (3,) cm; expression_gain / expression_offset
    scalars or (53,) per coefficient; gaze_offset (2,) yaw, pitch radians for both eyes.
    """

    rotation_gain: float = 1.0
    rotation_offset: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    translation_gain: float = 1.0
    translation_offset: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    expression_gain: float | np.ndarray = 1.0
    expression_offset: float | np.ndarray = 0.0
    gaze_gain: float = 1.0
    gaze_offset: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))


def rest_scores(params: FaceParams, config: TransferConfig | None = None) -> np.ndarray:
    """(T,) float64: how far each frame is from a resting face, as the largest ratio of a
    measure to its threshold (TransferConfig `neutral_*`): the angle between the face's
    direction and the line to the camera, jawOpen, the larger eyeBlink, and the speeds of
    head rotation, translation and the fastest expression coefficient (from the valid
    neighbouring frames, the larger of before and after). At most 1: a resting frame.
    Invalid frames, and valid frames with no valid neighbour (their speed is unknown),
    score infinity."""
    cfg = config or TransferConfig()
    t_frames = params.frames
    valid = np.asarray(params.valid, bool)
    names = [str(n) for n in params.expression_names]
    r = axis_angle_to_matrix_np(params.rotation)  # T,3,3
    facing = -r[:, :, 2]  # the face looks along -z of its model frame
    to_camera = -params.translation / np.maximum(
        np.linalg.norm(params.translation, axis=1, keepdims=True), 1e-6)
    frontal = np.degrees(np.arccos(np.clip(np.sum(facing * to_camera, axis=1), -1.0, 1.0)))
    jaw = params.expression[:, names.index("jawOpen")]
    blink = np.max(params.expression[:, [names.index("eyeBlink_L"),
                                         names.index("eyeBlink_R")]], axis=1)
    # speeds between consecutive frames that both have a face
    speed = np.full((t_frames, 3), np.inf)
    if t_frames > 1:
        dt = np.diff(params.timestamps.astype(np.float64))
        dt = np.where(dt > 1e-6, dt, 1.0 / 30.0)
        turn = matrix_to_axis_angle(np.swapaxes(r[:-1], 1, 2) @ r[1:])
        pair = np.stack([np.degrees(np.linalg.norm(turn, axis=1)) / dt,
                         np.linalg.norm(np.diff(params.translation, axis=0), axis=1) / dt,
                         np.max(np.abs(np.diff(params.expression, axis=0)), axis=1) / dt], 1)
        pair[~(valid[:-1] & valid[1:])] = np.inf
        before = np.concatenate([np.full((1, 3), np.inf), pair])
        after = np.concatenate([pair, np.full((1, 3), np.inf)])
        known_b, known_a = np.isfinite(before), np.isfinite(after)
        speed = np.where(known_b & known_a, np.maximum(before, after),
                         np.where(known_b, before, after))
    ratios = np.stack([frontal / cfg.neutral_frontal_deg, jaw / cfg.neutral_jaw_open,
                       blink / cfg.neutral_blink,
                       speed[:, 0] / cfg.neutral_rotation_speed_dps,
                       speed[:, 1] / cfg.neutral_translation_speed_cms,
                       speed[:, 2] / cfg.neutral_expression_speed], 1)
    score = np.max(ratios, axis=1)
    return np.where(valid & np.isfinite(score), score, np.inf)


def rest_frames(params: FaceParams, config: TransferConfig | None = None,
                min_frames: int = 5) -> np.ndarray:
    """Indices of the resting frames (`rest_scores` <= 1), or of the `min_frames` frames
    with the lowest scores when fewer rest (valid frames only). TransferError when no frame
    is valid."""
    score = rest_scores(params, config)
    valid = np.asarray(params.valid, bool)
    if not valid.any():
        raise TransferError("cannot estimate a neutral: no frame has a face (valid)")
    chosen = np.nonzero(score <= 1.0)[0]
    if len(chosen) < min_frames:
        ranked = np.argsort(np.where(valid, score, np.inf), kind="stable")
        chosen = np.sort(ranked[:min(min_frames, int(valid.sum()))])
    return chosen


def mode_mask(mode: str, names: list[str]) -> dict[str, object]:
    """What mode `mode` takes from the source: {'pose': bool, 'gaze': bool,
    'expression': bool mask (53,) over the non-eyeLook coefficients}."""
    if mode not in MODES:
        raise TransferError(f"unknown transfer mode '{mode}': use one of {', '.join(MODES)}")
    eyelook = np.isin(names, EYELOOK_NAMES)
    blinks = np.isin(names, ["eyeBlink_L", "eyeBlink_R"])
    mouth = np.asarray([n.startswith(("jaw", "mouth", "cheekPuff")) for n in names])
    expr = {"full": ~eyelook, "edit": ~eyelook, "face": ~eyelook, "gaze": blinks,
            "dub": mouth}[mode]
    return {"pose": mode in ("full", "edit"), "gaze": mode in ("full", "edit", "gaze"),
            "expression": expr}


def transfer(source: FaceParams, source_neutral: Neutral, target: FaceParams,
             target_neutral: Neutral, mode: str = "full", edit: Edit | None = None,
             ranges: RangeMap | None = None) -> FaceParams:
    """The target's parameters driven by the source's motion (see the module doc).

    source: T frames; target: 1 frame (used for every source frame) or T frames (frame by
    frame; e.g. the target video's frames played along). ranges: fit the source's changes
    into the target's ranges first (before an edit's gains and offsets), or None (`raw`).
    The result has the target's
    identity, camera and lighting, the source's timestamps, and valid = source valid and
    target valid; where the source has no face, the target frame is kept as it is.
    """
    names = [str(n) for n in source.expression_names]
    if [str(n) for n in target.expression_names] != names:
        raise TransferError("source and target parameters use different expression names")
    n_exp = len(names)
    for label, neutral in (("source", source_neutral), ("target", target_neutral)):
        if neutral.expression.shape != (n_exp,):
            raise TransferError(f"{label} neutral has {neutral.expression.shape[0]} expression "
                                f"coefficients, expected {n_exp}")
    t_frames = source.frames
    if target.frames == 1 and t_frames != 1:
        target = target.select(np.zeros(t_frames, np.int64))
    elif target.frames != t_frames:
        raise TransferError(f"target has {target.frames} frames; expected 1 or {t_frames} "
                            "(the source's)")
    sel = mode_mask(mode, names)
    ed = edit if (mode == "edit" and edit is not None) else Edit()
    gain_e = np.broadcast_to(np.asarray(ed.expression_gain, np.float32), (n_exp,))
    off_e = np.broadcast_to(np.asarray(ed.expression_offset, np.float32), (n_exp,))

    # changes of the source from its neutral
    r_s = axis_angle_to_matrix_np(source.rotation)
    r_sn = axis_angle_to_matrix_np(source_neutral.rotation[None])[0]
    d_rot = matrix_to_axis_angle(r_sn.T[None] @ r_s)  # head frame
    depth_ratio = target_neutral.translation[2] / max(float(source_neutral.translation[2]),
                                                      1e-3)
    d_trans = depth_ratio * (source.translation - source_neutral.translation)
    d_expr = source.expression - source_neutral.expression
    d_gaze = source.gaze - source_neutral.gaze
    if ranges is not None:
        d_rot = ranges.rotation(d_rot)
        d_trans = ranges.translation(d_trans, depth_ratio)
        d_expr = ranges.expression(d_expr, target_neutral.expression)
        d_gaze = ranges.gaze(d_gaze, target_neutral.gaze)
    d_rot = d_rot * ed.rotation_gain
    r_tn = axis_angle_to_matrix_np(target_neutral.rotation[None])[0]
    rot = r_tn[None] @ axis_angle_to_matrix_np(np.asarray(ed.rotation_offset, np.float32)[None]) \
        @ axis_angle_to_matrix_np(d_rot)
    trans = target_neutral.translation + ed.translation_gain * d_trans + ed.translation_offset
    expr = np.clip(target_neutral.expression + gain_e * d_expr + off_e, 0.0, 1.0)
    gaze = (target_neutral.gaze + ed.gaze_gain * d_gaze
            + np.asarray(ed.gaze_offset, np.float32)[None, None])

    out_rot = matrix_to_axis_angle(rot) if sel["pose"] else target.rotation
    out_trans = trans if sel["pose"] else target.translation
    out_gaze = gaze if sel["gaze"] else target.gaze
    mask = np.asarray(sel["expression"], bool)
    out_expr = np.where(mask[None], expr, target.expression)
    out_expr = _set_eyelook(out_expr, out_gaze, names)
    src_ok = np.asarray(source.valid, bool)
    keep = ~src_ok[:, None]
    return replace(
        target,
        rotation=np.where(keep, target.rotation, out_rot).astype(np.float32),
        translation=np.where(keep, target.translation, out_trans).astype(np.float32),
        expression=np.where(keep, target.expression, out_expr).astype(np.float32),
        gaze=np.where(keep[:, :, None], target.gaze, out_gaze).astype(np.float32),
        valid=src_ok & np.asarray(target.valid, bool),
        timestamps=source.timestamps,
    )


def _median_rotation(rotvecs: np.ndarray) -> np.ndarray:
    """A robust mean rotation: the component-wise median of the axis-angle vectors, refined
    by averaging the rotations near it in its tangent space."""
    centre = np.median(rotvecs, axis=0)
    r_c = axis_angle_to_matrix_np(centre[None])[0]
    local = matrix_to_axis_angle(r_c.T[None] @ axis_angle_to_matrix_np(rotvecs))
    near = np.linalg.norm(local - np.median(local, axis=0), axis=1)
    keep = near <= np.percentile(near, 50) if len(near) > 2 else np.ones(len(near), bool)
    step = np.mean(local[keep], axis=0)
    return matrix_to_axis_angle((r_c @ axis_angle_to_matrix_np(step[None])[0])[None])[0]


def _set_eyelook(expression: np.ndarray, gaze: np.ndarray, names: list[str]) -> np.ndarray:
    """expression [T, 53] with its eyeLook columns = gaze_to_eyelook(gaze [T, 2, 2])."""
    out = np.array(expression, np.float32, copy=True)
    idx = [names.index(n) for n in EYELOOK_NAMES]
    out[:, idx] = gaze_to_eyelook(np.asarray(gaze, np.float32))
    return out
