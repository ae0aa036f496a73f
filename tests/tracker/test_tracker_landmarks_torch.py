"""The torch landmark backend: MediaPipe's face models in torch, its ROI rules, parity with
MediaPipe itself on real footage, batched streams, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tracker_testdata import MEDIA, SMALL

from tracker import face_roi
from tracker.config import TrackerConfig
from tracker.errors import DvpError
from tracker.face_detection import ssd_anchors, weighted_nms
from tracker.landmarks import (
    FrameError,
    LandmarkDetector,
    Landmarks,
    compare_landmarks,
    make_landmark_detector,
)
from tracker.landmarks_torch import (
    LEFT_EYE,
    LIPS,
    RIGHT_EYE,
    TorchLandmarks,
    TorchLandmarkSource,
    landmarks_in_chunks,
)
from tracker.mediapipe_models import LANDMARK_FILE, model_path
from tracker.tflite_graph import (
    ModelFileError,
    TFLiteGraph,
    TFLiteNet,
    TFLiteOp,
    TFLiteTensor,
    read_tflite,
)

CLIPS = ("franck_talking_200s.webm", "webcam_driver_53s.mp4", "megamind.avi")
FRAMES = 10  # per clip: CI stays quick


def _clip(name: str, count: int = FRAMES) -> tuple[list[np.ndarray], list[float]]:
    path = MEDIA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    from streamer.video.io import read_frames

    frames, times = [], []
    for frame, t in read_frames(path, max_frames=count):
        frames.append(frame)
        times.append(t)
    return frames, times


@pytest.fixture(scope="module")
def torch_landmarks() -> TorchLandmarks:
    return TorchLandmarks("cpu")


# ---- the model files as torch modules --------------------------------------------------
def test_refinement_tables_are_the_models_own() -> None:
    """The lips / eye point lists of MediaPipe's refinement graph are the subsets the
    attention model crops around (its Landmarks2TransformMatrix operators), in order."""
    graph = read_tflite(model_path(LANDMARK_FILE))
    subsets = [tuple(op.options["subset_idxs"]) for op in graph.ops
               if op.kind == "CUSTOM:Landmarks2TransformMatrix"]
    assert subsets == [LIPS, LEFT_EYE, RIGHT_EYE]
    assert len(set(LIPS)) == 80 and len(set(LEFT_EYE)) == 71 and len(set(RIGHT_EYE)) == 71


def test_unsupported_operator_is_named() -> None:
    tensors = [TFLiteTensor(name, (1, 4), np.dtype(np.float32)) for name in ("x", "y")]
    graph = TFLiteGraph(tensors, {}, [TFLiteOp("SOFTMAX", (0,), (1,), {})], (0,), (1,))
    with pytest.raises(ModelFileError) as err:
        TFLiteNet(graph, name="toy.tflite")
    assert str(err.value) == "toy.tflite: operator SOFTMAX (version 1) is not supported"


def test_model_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.tflite"
    bad.write_bytes(b"this is not a model file")
    with pytest.raises(ModelFileError) as err:
        read_tflite(bad)
    assert str(err.value) == f"{bad} is not a TensorFlow Lite model (no TFL3 identifier)"
    with pytest.raises(ModelFileError, match="cannot read the model file .*missing.tflite"):
        read_tflite(tmp_path / "missing.tflite")


def test_stages_make_no_host_tensors_and_no_syncs() -> None:
    """What a CUDA graph replays (crop, networks, refinement) makes no tensor from host data
    and reads no value back to the host: checked op by op on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bad: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if any(k in str(func) for k in ("lift_fresh", "_local_scalar_dense", "nonzero")):
                self.bad.append(str(func))
            return func(*args, **(kwargs or {}))

    det = TorchLandmarks("cpu")
    frames = torch.zeros(2, 60, 80, 3, dtype=torch.uint8)
    rects = np.asarray([[40, 30, 50, 50, 0.3], [30, 20, 40, 40, -0.2]])
    maps = torch.from_numpy(face_roi.sampling_maps(rects, 192))
    small = torch.from_numpy(face_roi.sampling_maps(rects, 128))
    index = torch.tensor([1, 0])
    with torch.no_grad(), Spy() as spy:
        det._stage(frames, maps, index)
        det.detector._run(frames, small)
    assert spy.bad == []


# ---- MediaPipe's rules -------------------------------------------------------------------
def test_ssd_anchors_of_the_short_range_detector() -> None:
    a = ssd_anchors()
    assert a.shape == (896, 2)
    np.testing.assert_allclose(a[:2], [[1 / 32, 1 / 32]] * 2)  # 16x16 cells, 2 anchors
    np.testing.assert_allclose(a[512:518], [[1 / 16, 1 / 16]] * 6)  # 8x8 cells, 6 anchors
    np.testing.assert_allclose(a[-1], [15 / 16, 15 / 16])


def test_weighted_nms_merges_overlaps_by_score() -> None:
    boxes = np.asarray([[0.0, 0.0, 1.0, 1.0], [0.1, 0.0, 1.1, 1.0], [3.0, 3.0, 4.0, 4.0]],
                       np.float32)
    kp = np.zeros((3, 6, 2), np.float32)
    kp[1] += 1.0
    scores = np.asarray([0.6, 0.9, 0.7], np.float32)
    b, k, s = weighted_nms(boxes, kp, scores)
    np.testing.assert_allclose(s, [0.9, 0.7])  # best first, the cluster keeps its best score
    np.testing.assert_allclose(b[0], [0.06, 0.0, 1.06, 1.0], atol=1e-6)  # 0.6/1.5, 0.9/1.5
    np.testing.assert_allclose(k[0], np.full((6, 2), 0.6), atol=1e-6)
    np.testing.assert_allclose(b[1], boxes[2])


def test_roi_from_landmarks_rotation_and_size() -> None:
    """The ROI squares the landmarks' box on its long side, scales it 1.5 and turns it so
    that the line from point 33 to point 263 is level."""
    pts = np.zeros((1, 478, 2))
    pts[0, :, 0] = np.linspace(100, 200, 478)
    pts[0, :, 1] = np.linspace(50, 110, 478)
    pts[0, 33] = [120, 80]
    pts[0, 263] = [180, 80 + 60 * np.tan(np.radians(10))]  # eye line 10 deg clockwise
    r = face_roi.rects_from_landmarks(pts)[0]
    np.testing.assert_allclose(r[:4], [150, 80, 150, 150])
    assert np.degrees(r[4]) == pytest.approx(10.0)


def test_warp_matches_opencv() -> None:
    """The crop is OpenCV's warpPerspective (bilinear, fixed point) of the ROI's corners,
    as MediaPipe's ImageToTensorCalculator makes it, with either border."""
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    size = 48
    for _ in range(4):
        side = rng.uniform(30, 160)
        rect = np.asarray([[rng.uniform(20, 100), rng.uniform(20, 70), side, side,
                            rng.uniform(-3, 3)]])
        box = cv2.RotatedRect((float(rect[0, 0]), float(rect[0, 1])), (side, side),
                              float(np.float32(rect[0, 4]) * np.float32(180) / np.pi))
        corners = np.float32([[0, size], [0, 0], [size, 0], [size, size]])
        m = cv2.getPerspectiveTransform(cv2.boxPoints(box), corners)
        maps = torch.from_numpy(face_roi.sampling_maps(rect, size))
        for border, zero in ((cv2.BORDER_REPLICATE, False), (cv2.BORDER_CONSTANT, True)):
            ref = cv2.warpPerspective(img, m, (size, size), flags=cv2.INTER_LINEAR,
                                      borderMode=border).astype(np.float32)
            ours = face_roi.warp(torch.from_numpy(img)[None], maps, size, zero, (0.0, 255.0))
            diff = np.abs(ours[0].permute(1, 2, 0).numpy() - ref)
            assert (diff > 1.01).mean() < 0.002 and diff.max() <= 8


# ---- parity with MediaPipe ---------------------------------------------------------------
@pytest.mark.parametrize("clip", CLIPS)
def test_parity_with_mediapipe_on_footage(clip: str, torch_landmarks: TorchLandmarks,
                                          face_model, regressor) -> None:  # type: ignore[no-untyped-def]
    """Same frames, same faces; points within 1 % (mean) and 3 % (p95) of the inter-ocular
    distance; the tracker's fit from either within 0.5 deg and 1 mm (mean, same camera and
    identity)."""
    from tracker.rotation import angle_between_deg
    from tracker.tracker import track_landmarks

    frames, times = _clip(clip)
    torch_landmarks.reset()
    with LandmarkDetector(stream=True) as mp:
        ref = [mp(f) for f in frames]
    ours = torch_landmarks.detect_batch  # one stream, frame by frame
    cand = [ours([f], ["clip"])[0] for f in frames]
    torch_landmarks.forget("clip")
    agree = compare_landmarks(ref, cand)
    print(clip, agree.as_dict())
    assert agree.found_differ == 0 and agree.found_reference >= len(frames) - 1
    assert agree.mean <= 0.01 and agree.p95 <= 0.03
    cfg = TrackerConfig(**SMALL)
    pa, _ = track_landmarks(ref, times, face_model, cfg, regressor=regressor)
    pb, _ = track_landmarks(cand, times, face_model, cfg, regressor=regressor,
                            focal=float(pa.focal[0]), identity=pa.identity)
    valid = pa.valid & pb.valid
    degrees = angle_between_deg(pa.rotation[valid], pb.rotation[valid])
    mm = np.linalg.norm(pa.translation[valid] - pb.translation[valid], axis=1) * 10.0
    print(clip, f"fit: {degrees.mean():.3f} deg, {mm.mean():.3f} mm")
    assert degrees.mean() <= 0.5 and mm.mean() <= 1.0


def test_no_face_then_a_face(torch_landmarks: TorchLandmarks) -> None:
    frames, _ = _clip("franck_talking_200s.webm", 1)
    blank = np.zeros_like(frames[0])
    out = torch_landmarks.detect_batch([blank], ["s"])[0]
    assert not out.found and out.presence == 0.0 and not out.points.any()
    assert out.image_size == blank.shape[:2]
    face = torch_landmarks.detect_batch([frames[0]], ["s"])[0]
    assert face.found and face.points.shape == (478, 2) and face.points.dtype == np.float32
    torch_landmarks.forget("s")


def test_image_mode_matches_mediapipe_image_mode(astronaut: np.ndarray) -> None:
    """stream=False: a detection on every frame, as MediaPipe's static image mode."""
    from tracker.landmarks import detect_image

    ref = detect_image(astronaut)
    ours = TorchLandmarks("cpu", stream=False)
    got = [ours.detect_batch([astronaut], [0])[0] for _ in range(2)]
    agree = compare_landmarks([ref, ref], got)
    assert agree.found_differ == 0 and agree.mean <= 0.01 and agree.p95 <= 0.03
    np.testing.assert_array_equal(got[0].points, got[1].points)  # nothing carried over


def test_a_face_that_jumps_is_found_on_the_same_frame(astronaut: np.ndarray) -> None:
    """The followed face leaves its ROI (a cut): as MediaPipe, which detects on every frame
    while it follows fewer than max_faces faces, the face is found again on that frame."""
    face = astronaut[40:240, 140:320]
    left = np.full((300, 720, 3), 40, np.uint8)
    left[50:250, 20:200] = face
    right = np.full_like(left, 40)
    right[50:250, 520:700] = face
    ours = TorchLandmarks("cpu")
    with LandmarkDetector(stream=True) as mp:
        for frame in (left, right):
            ref, got = mp(frame), ours.detect_batch([frame], [0])[0]
            assert ref.found and got.found
            np.testing.assert_allclose(got.box, ref.box, atol=2.0)
    assert got.box[0] > 500


# ---- many streams ----------------------------------------------------------------------------
def test_a_batch_of_streams_equals_each_stream_alone(torch_landmarks: TorchLandmarks) -> None:
    """Streams of different sizes in one call follow their own faces: the same points as
    when each runs alone; a uint8 tensor batch gives what the arrays give."""
    a, _ = _clip("franck_talking_200s.webm", 4)
    b, _ = _clip("webcam_driver_53s.mp4", 4)
    together = [torch_landmarks.detect_batch([fa, fb], ["a", "b"]) for fa, fb in zip(a, b)]
    alone_a = TorchLandmarks("cpu")
    alone_b = TorchLandmarks("cpu")
    for i in range(4):
        ra = alone_a.detect_batch([a[i]], [0])[0]
        rb = alone_b.detect_batch([b[i]], [0])[0]
        np.testing.assert_allclose(together[i][0].points, ra.points, atol=0.05)
        np.testing.assert_allclose(together[i][1].points, rb.points, atol=0.05)
    torch_landmarks.forget("a")
    torch_landmarks.forget("b")
    pair = torch.from_numpy(np.stack([a[0], a[1]]))
    from_tensor = torch_landmarks.detect_batch(pair, ["x", "y"])
    from_arrays = TorchLandmarks("cpu").detect_batch([a[0], a[1]], ["x", "y"])
    for t, n in zip(from_tensor, from_arrays):
        np.testing.assert_allclose(t.points, n.points, atol=0.05)
    torch_landmarks.forget("x")
    torch_landmarks.forget("y")


def test_bucketed_static_buffers_equal_eager() -> None:
    """The CUDA-graph path pads each batch into static buffers of a power-of-two size that
    keep earlier rows; run on the CPU without capture ("static"), it gives what the eager
    path gives, for 3 streams (bucket 4) and then 1."""
    a, _ = _clip("franck_talking_200s.webm", 3)
    b, _ = _clip("webcam_driver_53s.mp4", 3)
    padded = TorchLandmarks("cpu", cuda_graphs="static")
    eager = TorchLandmarks("cpu", cuda_graphs=False)
    for i in range(3):
        batch = [a[i], b[i], a[(i + 1) % 3]]
        for p, e in zip(padded.detect_batch(batch, [0, 1, 2]),
                        eager.detect_batch(batch, [0, 1, 2])):
            assert p.found == e.found
            np.testing.assert_allclose(p.points, e.points, atol=0.05)
    p = padded.detect_batch([b[0]], [1])[0]
    e = eager.detect_batch([b[0]], [1])[0]
    np.testing.assert_allclose(p.points, e.points, atol=0.05)
    assert padded.stage.mode == "static" and eager.stage.mode == "eager"


def test_merged_convolutions_give_the_same_landmarks() -> None:
    """fuse (CUDA's default): each depthwise convolution merged into the 1x1 one after it;
    the same landmarks, from fewer layers."""
    frames, _ = _clip("franck_talking_200s.webm", 2)
    fused, plain = TorchLandmarks("cpu", fuse=True), TorchLandmarks("cpu", fuse=False)
    assert len(fused.net.layers) == len(plain.net.layers) - 66
    for f in frames:
        np.testing.assert_allclose(fused.detect_batch([f], [0])[0].points,
                                   plain.detect_batch([f], [0])[0].points, atol=0.01)


def test_a_video_in_chunks_side_by_side() -> None:
    """landmarks_in_chunks: every frame, in order; each chunk tracked from its own start,
    as a fresh stream over that chunk alone would; chunks beyond the buffer run later."""
    frames, _ = _clip("franck_talking_200s.webm", 11)
    ticks: list[int] = []
    one_frame = frames[0].nbytes
    out = landmarks_in_chunks(iter(frames), TorchLandmarks("cpu"), chunk=4, streams=2,
                              buffer_bytes=8 * one_frame, progress=ticks.append)
    assert len(out) == 11 and sum(ticks) == 11
    assert ticks == [2, 2, 2, 2, 1, 1, 1]  # chunks 0-1 side by side, then chunk 2 (3 frames)
    for start in (0, 4, 8):
        alone = TorchLandmarks("cpu")
        for i in range(start, min(start + 4, 11)):
            np.testing.assert_allclose(out[i].points,
                                       alone.detect_batch([frames[i]], [0])[0].points,
                                       atol=0.05)
    with pytest.raises(ValueError) as err:
        landmarks_in_chunks(iter(frames), TorchLandmarks("cpu"), chunk=0)
    assert str(err.value) == "chunk and streams must be at least 1, got 0 and 64"


def test_detect_batch_says_what_is_wrong(torch_landmarks: TorchLandmarks) -> None:
    frame = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError) as err:
        torch_landmarks.detect_batch([frame, frame], ["a"])
    assert str(err.value) == "got 2 frames but 1 stream ids"
    with pytest.raises(ValueError) as err:
        torch_landmarks.detect_batch([frame, frame], ["a", "a"])
    assert str(err.value) == "each stream may send one frame per detect_batch call"
    with pytest.raises(FrameError) as err:
        torch_landmarks.detect_batch(torch.zeros(1, 32, 32, 3), ["a"])
    assert str(err.value) == ("a frame batch tensor must be (B, H, W, 3) uint8 RGB, got "
                              "(1, 32, 32, 3) torch.float32")
    with pytest.raises(FrameError, match="frame must be uint8 RGB, got dtype float64"):
        torch_landmarks.detect_batch([np.zeros((8, 8, 3))], ["a"])
    assert torch_landmarks.detect_batch([], []) == []
    closed = TorchLandmarks("cpu")
    closed.close()
    with pytest.raises(FrameError) as err:
        closed.detect_batch([frame], ["a"])
    assert str(err.value) == "the landmark detector is closed"
    with pytest.raises(ValueError) as err:
        TorchLandmarks("cpu", half=True)
    assert str(err.value) == "float16 landmarks run on CUDA only (half=True on cpu)"


# ---- the backend setting -------------------------------------------------------------------
def test_backend_setting_picks_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    from tracker.choices import forget_choices

    forget_choices()
    caplog.set_level(logging.INFO, logger="tracker.choices")
    auto = make_landmark_detector(TrackerConfig(), torch.device("cpu"))
    assert auto.backend == "mediapipe"  # the faster one on the CPU
    auto.close()
    source = make_landmark_detector(TrackerConfig(landmarks="torch"), torch.device("cpu"))
    assert isinstance(source, TorchLandmarkSource) and source.backend == "torch"
    assert not source.landmarks.half
    source.close()
    messages = [r.getMessage() for r in caplog.records]
    assert ("landmarks: mediapipe (CPU) (auto on the CPU, where MediaPipe is faster than the "
            "torch port)") in messages
    assert "landmarks: torch on cpu, float32 (MediaPipe's face models in torch)" in messages
    with pytest.raises(DvpError) as err:
        make_landmark_detector(TrackerConfig(landmarks="dlib"), torch.device("cpu"))
    assert str(err.value) == "tracker.landmarks must be one of auto, mediapipe, torch, got 'dlib'"


# ---- on the GPU ------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_parity_and_batch() -> None:
    """CUDA (float16 networks, CUDA graphs): parity with MediaPipe on footage, and 64
    streams in one call give each stream's own landmarks."""
    frames, _ = _clip("franck_talking_200s.webm", 40)
    mega, _ = _clip("megamind.avi", 40)
    dev = torch.device("cuda")
    for clip in (frames, mega):
        with LandmarkDetector(stream=True) as mp:
            ref = [mp(f) for f in clip]
        gpu = TorchLandmarks(dev)
        assert gpu.half
        cand = [gpu.detect_batch([f], [0])[0] for f in clip]
        agree = compare_landmarks(ref, cand)
        print("gpu", agree.as_dict())
        assert agree.found_differ == 0 and agree.mean <= 0.01 and agree.p95 <= 0.03
    batch = TorchLandmarks(dev)
    single = TorchLandmarks(dev)
    streams = list(range(64))
    from_batch, alone = [], []
    for i in range(3):
        picks = [frames[(s + i) % len(frames)] for s in streams]
        many = batch.detect_batch(torch.from_numpy(np.stack(picks)).to(dev), streams)
        for s in (0, 17, 63):
            from_batch.append(many[s])
            alone.append(single.detect_batch([picks[s]], [s])[0])
    agree = compare_landmarks(alone, from_batch)  # float16: batch sizes round differently
    print("gpu batch 64 vs alone", agree.as_dict())
    assert agree.found_differ == 0 and agree.mean <= 0.002 and agree.max <= 0.01


def test_landmarks_are_numpy_pixels(torch_landmarks: TorchLandmarks) -> None:
    frames, _ = _clip("webcam_driver_53s.mp4", 1)
    out: Landmarks = torch_landmarks.detect_batch([frames[0]], ["p"])[0]
    torch_landmarks.forget("p")
    h, w = frames[0].shape[:2]
    assert out.image_size == (h, w)
    assert (out.points[:, 0] > 0).all() and (out.points[:, 0] < w).all()
    assert (out.points[:, 1] > 0).all() and (out.points[:, 1] < h).all()


def test_a_stage_that_cannot_compile_runs_uncompiled(caplog: pytest.LogCaptureFixture) -> None:
    from tracker.mediapipe_models import GraphRunner

    def stage(x: torch.Tensor) -> torch.Tensor:  # no single graph: fullgraph fails
        y = x * 2.0
        torch._dynamo.graph_break()
        return y * 3.0

    caplog.set_level(logging.WARNING, logger="tracker.mediapipe_models")
    runner = GraphRunner(stage, torch.device("cpu"), "eager", lambda key: [], "toy",
                         compile=True)
    x = torch.ones(3, 2)
    np.testing.assert_allclose(runner((3,), [x], 2).numpy(), np.full((2, 2), 6.0))
    np.testing.assert_allclose(runner((3,), [x], 3).numpy(), np.full((3, 2), 6.0))  # no retry
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("toy: torch.compile failed (")
    with pytest.raises(ValueError) as err:
        GraphRunner(stage, torch.device("cpu"), "fast", lambda key: [])
    assert str(err.value) == "GraphRunner mode must be graph, static or eager, got 'fast'"
