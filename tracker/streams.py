"""The offline fit of a whole video as several streams stepped together, one batch per step.

A video's frames are fitted one after another (each warm-started from the previous one), so
one stream runs at the speed of one small fit per frame. `track_streams` cuts the frames
into chunks (`starts`: each chunk's first frame; the landmark chunks of
streamer.jobs.landmarks, which were tracked from their own starts too), calibrates identity
and focal length once over keyframes of all frames (as `track_landmarks`), and then steps
every chunk at once: at step k, frame k of each chunk, as one batch through the same fitter
(`LandmarkFitter.fit` and `fit_gaze` are per frame, batched). Each chunk is its own
`FaceTracker` (its warm start, cut and restart rules, One-Euro smoothing and lost-face
holding), starting from the regressor at its first frame; within a chunk the results are
those of `FaceTracker.step` on the chunk alone (up to float rounding of batched solves).
One chunk is `track_landmarks`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from tracker.config import TrackerConfig
from tracker.face_model import FaceModel
from tracker.fitting import Camera, FitInfo, FitState, initial_translation
from tracker.landmarks import Landmarks, box_iou
from tracker.params import FaceParams
from tracker.regressor import Regressor
from tracker.tracker import FaceTracker, TrackedFrame, track_landmarks


def track_streams(landmarks: Sequence[Landmarks], timestamps: Sequence[float],
                  model: FaceModel, config: TrackerConfig | None = None,
                  device: torch.device | str = "cpu", regressor: Regressor | None = None,
                  starts: Sequence[int] = (0,), focal: float | None = None,
                  progress: Callable[[int], None] | None = None
                  ) -> tuple[FaceParams, list[TrackedFrame]]:
    """Offline tracking of a whole sequence in chunks starting at `starts` (increasing, the
    first 0), fitted together (module doc). Returns the parameters and per-frame results,
    as `track_landmarks` (which one chunk is). `progress(n)` after each step of n frames."""
    bounds = sorted({int(s) for s in starts} | {len(landmarks)})
    if len(landmarks) != len(timestamps):
        raise ValueError(f"{len(landmarks)} landmark frames but {len(timestamps)} timestamps")
    if not landmarks or bounds[0] != 0 or len(bounds) <= 2:
        return track_landmarks(landmarks, timestamps, model, config, device, regressor,
                               focal=focal, progress=progress)
    main = FaceTracker(model, config, device, regressor, focal=focal)
    main._set_image_size(landmarks[0].image_size)
    main.calibrate(landmarks)
    main.calibrated = True
    streams = [FaceTracker(model, main.config, main.device, main.regressor,
                           image_size=main.image_size, focal=main.focal,
                           identity=main.identity) for _ in bounds[:-1]]
    chunks = list(itertools.pairwise(bounds))
    frames: list[TrackedFrame | None] = [None] * len(landmarks)
    for k in range(max(b - a for a, b in chunks)):
        index = [a + k for a, b in chunks if a + k < b]
        owners = [streams[s] for s, (a, b) in enumerate(chunks) if a + k < b]
        done = step_streams(owners, [landmarks[i] for i in index],
                            [float(timestamps[i]) for i in index])
        for i, frame in zip(index, done):
            frames[i] = frame
        if progress is not None:
            progress(len(index))
    out = [f for f in frames if f is not None]
    return main.to_params(out), out


def step_streams(trackers: list[FaceTracker], landmarks: list[Landmarks],
                 timestamps: list[float]) -> list[TrackedFrame]:
    """One frame of each of several calibrated trackers (same model, config, device,
    identity and camera), fitted as one batch: what `FaceTracker.step` does per tracker."""
    results: list[TrackedFrame | None] = [None] * len(trackers)
    active = []
    for j, (tr, lm, t) in enumerate(zip(trackers, landmarks, timestamps)):
        if tr.image_size != tuple(lm.image_size):
            tr._set_image_size(lm.image_size)
        if not lm.found or not np.all(np.isfinite(lm.points)):
            tr.reset()
            results[j] = tr._invalid(t)
        else:
            active.append(j)
    if active:
        _fit_active(trackers, landmarks, timestamps, active, results)
    return [r for r in results if r is not None]


def _fit_active(trackers: list[FaceTracker], landmarks: list[Landmarks],
                timestamps: list[float], active: list[int],
                results: list[TrackedFrame | None]) -> None:
    first = trackers[active[0]]
    cfg, fitter, dev, identity = first.config, first.fitter, first.device, first._identity
    n = len(active)
    obs = torch.as_tensor(np.stack([landmarks[j].points for j in active]), device=dev)
    cam = Camera.make(first.focal, first.principal_point, n, dev)
    boxes = [landmarks[j].box for j in active]
    cold = [trackers[j]._prev is None or trackers[j]._prev_box is None
            or box_iou(trackers[j]._prev_box, boxes[a]) < cfg.cut_iou
            for a, j in enumerate(active)]
    dt = fitter.dtype
    rot = torch.zeros(n, 3, 3, device=dev, dtype=dt)
    trans = torch.zeros(n, 3, device=dev, dtype=dt)
    expr = torch.zeros(n, len(fitter.lm.expression_names), device=dev, dtype=dt)
    gaze = torch.zeros(n, 2, 2, device=dev, dtype=dt)
    residual_px = torch.zeros(n, device=dev)
    iterations = [0] * n
    held = torch.zeros(n, 2, 2, device=dev, dtype=dt)

    def put(rows: list[int], state: FitState, info_rows: torch.Tensor, its: int) -> None:
        idx = torch.as_tensor(rows, device=dev)
        rot.index_copy_(0, idx, state.rotation.to(rot.dtype))
        trans.index_copy_(0, idx, state.translation.to(trans.dtype))
        expr.index_copy_(0, idx, state.expression.to(expr.dtype))
        gaze.index_copy_(0, idx, state.gaze.to(gaze.dtype))
        residual_px.index_copy_(0, idx, info_rows.to(residual_px.dtype))
        for r in rows:
            iterations[r] = its

    warm = [a for a in range(n) if not cold[a]]
    restart: list[int] = []
    warm_cost = torch.zeros(0, device=dev)
    if warm:
        prev = _cat([trackers[active[a]]._prev for a in warm])  # type: ignore[misc]
        wi = torch.as_tensor(warm, device=dev)
        state, info = fitter.fit(obs[wi], prev, identity, Camera.make(first.focal, first.principal_point, len(warm), dev),
                                 cfg.iterations_warm, previous=prev)
        put(warm, state, info.residual_px, info.iterations)
        held.index_copy_(0, wi, prev.gaze.to(held.dtype))
        ok = (info.residual <= cfg.restart_residual).tolist()
        restart = [a for a, good in zip(warm, ok) if not good]
        warm_cost = info.cost
    redo = [a for a in range(n) if cold[a]] + restart
    if redo:
        ri = torch.as_tensor(redo, device=dev)
        state, info = _cold(first, obs[ri], Camera.make(first.focal, first.principal_point, len(redo), dev))
        cost = info.cost.tolist()
        take = [a for a in range(n) if cold[a]]
        take_rows = [r for r, a in enumerate(redo) if cold[a]]
        for r, a in enumerate(redo):
            if not cold[a]:  # a restart: the cold fit only where it is better
                w_cost = float(warm_cost[warm.index(a)])
                if cost[r] < w_cost:
                    cold[a] = True
                    take.append(a)
                    take_rows.append(r)
        if take:
            tr_ = torch.as_tensor(take_rows, device=dev)
            put(take, _rows(state, tr_), info.residual_px[tr_], info.iterations)
    cold_t = torch.as_tensor(cold, device=dev)
    state = FitState(rot, trans, expr, gaze)
    held = torch.where(cold_t[:, None, None], gaze, held)  # cold: no previous gaze to hold
    state.gaze = fitter.fit_gaze(obs, state, identity, cam, previous=held)
    state = fitter.with_gaze(state)
    values = torch.cat([state.rotation.reshape(n, 9), state.translation, state.expression,
                        state.gaze.reshape(n, 4)], 1)
    host = values.detach().cpu().numpy().astype(np.float64)  # one transfer
    res = residual_px.cpu().numpy()
    for a, j in enumerate(active):
        tr = trackers[j]
        if not np.all(np.isfinite(host[a])):
            tr.reset()
            results[j] = tr._invalid(timestamps[j])
            continue
        tr._prev = _rows(state, torch.as_tensor([a], device=dev))
        tr._prev_box = boxes[a]
        results[j] = tr._output(host[a], timestamps[j], float(res[a]), iterations[a], cold[a])


def _cold(tracker: FaceTracker, obs: torch.Tensor, cam: Camera) -> tuple[FitState, FitInfo]:
    """`FaceTracker._cold` for a batch: the regressor's guess, refined (iterations_cold)."""
    guess = tracker.regressor.predict(obs, cam.focal, cam.principal)
    b = obs.shape[0]
    pts = tracker.fitter.lm.points(tracker._identity[None].expand(b, -1), guess.expression,
                                   shape=tracker._shape())[:, :468]
    init = FitState(guess.rotation, initial_translation(pts, guess.rotation, obs[:, :468],
                                                        cam),
                    guess.expression, torch.zeros(b, 2, 2, device=obs.device))
    return tracker.fitter.fit(obs, init, tracker._identity, cam,
                              tracker.config.iterations_cold, damping=1e-2)


def _cat(states: list[FitState]) -> FitState:
    return FitState(torch.cat([s.rotation for s in states]),
                    torch.cat([s.translation for s in states]),
                    torch.cat([s.expression for s in states]),
                    torch.cat([s.gaze for s in states]))


def _rows(state: FitState, rows: torch.Tensor) -> FitState:
    return FitState(state.rotation[rows], state.translation[rows], state.expression[rows],
                    state.gaze[rows])
