"""CUDA parity of the fit (run with `pytest -m gpu` on the lent machine)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tracker.fitting import Camera, FitState, LandmarkFitter
from tracker.rotation import axis_angle_to_matrix

pytestmark = pytest.mark.gpu


def _inputs(seq, device, idx):  # type: ignore[no-untyped-def]
    h, w = seq.image_size
    cam = Camera.make(seq.focal, np.asarray([w / 2, h / 2], np.float32), len(idx), device)
    state = FitState(axis_angle_to_matrix(torch.as_tensor(seq.rotation[idx])),
                     torch.as_tensor(seq.translation[idx]) + 0.5,
                     torch.as_tensor(seq.expression[idx]), torch.as_tensor(seq.gaze[idx]))
    return (torch.as_tensor(seq.noisy[idx], device=device), state.to(device),
            torch.as_tensor(seq.identity, device=device), cam)


def test_cuda_fit_matches_cpu(landmark_model, tracker_config, sequence) -> None:  # type: ignore[no-untyped-def]
    idx = [0, 5, 17, 30]
    out = {}
    for dev in ("cpu", "cuda"):
        fitter = LandmarkFitter(landmark_model, tracker_config, dev)
        obs, init, ident, cam = _inputs(sequence, dev, idx)
        state, info = fitter.fit(obs, init, ident, cam, 6, previous=init)
        gaze = fitter.fit_gaze(obs, state, ident, cam)
        out[dev] = (state.to("cpu"), info.cost.cpu(), gaze.cpu())
    torch.testing.assert_close(out["cuda"][0].translation, out["cpu"][0].translation,
                               atol=2e-3, rtol=0)
    torch.testing.assert_close(out["cuda"][0].expression, out["cpu"][0].expression,
                               atol=5e-3, rtol=0)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(out["cuda"][2], out["cpu"][2], atol=1e-3, rtol=0)


def test_cuda_graph_replay_matches_eager(landmark_model, tracker_config, sequence) -> None:  # type: ignore[no-untyped-def]
    from tracker.graphs import GraphedWarmFit

    fitter = LandmarkFitter(landmark_model, tracker_config, "cuda")
    graphed = GraphedWarmFit(fitter, 1, tracker_config.iterations_warm)
    for i in (3, 11, 29):
        obs, prev, ident, cam = _inputs(sequence, "cuda", [i])
        eager, info = fitter.fit(obs, prev, ident, cam, tracker_config.iterations_warm,
                                 previous=prev)
        eager = fitter.with_gaze(replace(eager, gaze=fitter.fit_gaze(obs, eager, ident, cam,
                                                                     previous=prev.gaze)))
        replay, rinfo = graphed(obs, prev, ident, cam)
        torch.testing.assert_close(replay.translation, eager.translation, atol=1e-4, rtol=0)
        torch.testing.assert_close(replay.expression, eager.expression, atol=1e-4, rtol=0)
        torch.testing.assert_close(replay.gaze, eager.gaze, atol=1e-5, rtol=0)
        torch.testing.assert_close(rinfo.cost, info.cost, rtol=1e-5, atol=1e-3)


def test_tracker_on_cuda(face_model, regressor, tracker_config, sequence) -> None:  # type: ignore[no-untyped-def]
    from tracker.tracker import track_landmarks

    cpu, _ = track_landmarks(sequence.landmarks()[:20], sequence.timestamps[:20], face_model,
                             tracker_config, "cpu", regressor)
    gpu, frames = track_landmarks(sequence.landmarks()[:20], sequence.timestamps[:20],
                                  face_model, tracker_config, "cuda", regressor)
    assert gpu.valid.all() and not any(f.cold for f in frames[1:])
    np.testing.assert_allclose(gpu.rotation, cpu.rotation, atol=2e-3)
    np.testing.assert_allclose(gpu.translation, cpu.translation, atol=0.05)


def test_a_fit_graph_captured_beforehand_tracks_as_a_lazy_one(  # type: ignore[no-untyped-def]
        face_model, regressor, tracker_config, sequence) -> None:
    """The live engine captures each session's warm-fit graph before sessions run
    (FaceTracker.use_fit_graph); tracking with it equals tracking with the graph the
    tracker captures itself at its first warm frame."""
    from tracker.fitting import LandmarkFitter
    from tracker.graphs import GraphedWarmFit
    from tracker.tracker import FaceTracker

    landmarks, times = sequence.landmarks()[:12], sequence.timestamps[:12]
    lazy = FaceTracker(face_model, tracker_config, "cuda", regressor,
                       focal=sequence.focal, identity=sequence.identity)
    ahead = FaceTracker(face_model, tracker_config, "cuda", regressor,
                        focal=sequence.focal, identity=sequence.identity)
    graph = GraphedWarmFit(LandmarkFitter(face_model, tracker_config, "cuda"), 1,
                           tracker_config.iterations_warm)
    ahead.use_fit_graph(graph)
    a = [lazy.step(lm, float(t)) for lm, t in zip(landmarks, times)]
    b = [ahead.step(lm, float(t)) for lm, t in zip(landmarks, times)]
    assert ahead._graph is graph and lazy._graph is not None and lazy._graph is not graph
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.rotation, y.rotation, atol=1e-5)
        np.testing.assert_allclose(x.expression, y.expression, atol=1e-5)
    wrong = GraphedWarmFit(LandmarkFitter(face_model, tracker_config, "cuda"), 2,
                           tracker_config.iterations_warm)
    with pytest.raises(ValueError, match="the fit graph replays 2 frame"):
        ahead.use_fit_graph(wrong)
