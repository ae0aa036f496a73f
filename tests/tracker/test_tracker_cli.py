"""`dvp track VIDEO -o PARAMS.npz [--overlay OUT.mp4]` and its bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tracker_testdata import MEGAMIND, SMALL

from streamer.cli.main import main
from tracker.params import FaceParams

#: The tests' small regressor (the one the session trained), whatever configs/ say.
SETS = [a for k, v in SMALL.items() for a in ("--set", f"tracker.{k}={v}")]


@pytest.fixture(scope="module")
def face_video(tmp_path_factory, astronaut, dvp_home) -> Path:  # type: ignore[no-untyped-def]
    """10 frames 256x256 at 10 fps: the astronaut's face drifting, frames 4-5 black."""
    from streamer.video.io import VideoWriter

    path = tmp_path_factory.mktemp("video") / "face.mp4"
    with VideoWriter(path, fps=10.0) as writer:
        for i in range(10):
            frame = np.zeros((256, 256, 3), np.uint8)
            if i not in (4, 5):
                frame[:] = astronaut[10 + 2 * i:266 + 2 * i, 100:356]
            writer.write(frame, i / 10.0)
    return path


def test_track_writes_params_and_overlay(face_video: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out, overlay = tmp_path / "p.npz", tmp_path / "overlay.mp4"
    code = main(["track", str(face_video), "-o", str(out), "--overlay", str(overlay),
                 "--device", "cpu", *SETS])
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out.split()
    assert printed == [str(out), str(overlay)]
    assert (f"dvp: warning: {face_video}: a face was found in 8 of 10 frames (saved with "
            "valid = False); --strict makes this an error") in captured.err
    params = FaceParams.load(out)
    assert params.frames == 10
    np.testing.assert_array_equal(params.valid, [i not in (4, 5) for i in range(10)])
    np.testing.assert_allclose(params.timestamps, np.arange(10) / 10.0, atol=1e-3)
    assert tuple(params.image_size) == (256, 256)
    from streamer.video.io import probe

    info = probe(overlay)
    assert (info.width, info.height, info.frame_count) == (256, 256, 10)


def test_track_strict_refuses_frames_without_a_face(face_video: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.npz"
    assert main(["track", str(face_video), "-o", str(out), "--strict", "--max-frames", "6",
                 "--device", "cpu", *SETS]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"dvp: error: {face_video}: a face was found in 4 of 6 frames (--strict: nothing "
        "written)")
    assert not out.exists()


def test_track_real_clip(tmp_path: Path) -> None:
    if not MEGAMIND.is_file():
        pytest.skip(f"{MEGAMIND} not present")
    out = tmp_path / "mm.npz"
    assert main(["track", str(MEGAMIND), "-o", str(out), "--max-frames", "12",
                 "--device", "cpu", *SETS]) == 0
    params = FaceParams.load(out)
    assert params.frames == 12 and not params.valid[0] and params.valid[1:].all()


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.mp4", None, "video file not found: {path}"),
    ("empty.mp4", b"", "{path} is empty (0 bytes)"),
    ("notes.mp4", b"these are not frames\n" * 20, "cannot open {path} as a video: "),
])
def test_bad_videos_fail_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "p.npz"
    assert main(["track", str(path), "-o", str(out), "--device", "cpu", *SETS]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dvp: error: " + message.format(path=path))
    assert not out.exists()  # nothing half-written
    assert list(tmp_path.iterdir()) == ([path] if content is not None else [])


def test_bad_options_fail_clearly(face_video: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.npz"
    assert main(["track", str(face_video), "-o", str(out), "--focal", "-3",
                 "--device", "cpu"]) == 1
    assert capsys.readouterr().err == \
        "dvp: error: --focal must be a positive number of pixels, got -3.0\n"
    assert main(["track", str(face_video), "-o", str(out), "--overlay",
                 str(tmp_path / "nowhere" / "o.mp4"), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == (
        f"dvp: error: cannot write {tmp_path / 'nowhere' / 'o.mp4'}: directory "
        f"{tmp_path / 'nowhere'} does not exist\n")
    assert main(["track", str(face_video), "-o", str(out), "--set", "renderer.refine=maybe",
                 "--device", "cpu"]) == 1
    assert capsys.readouterr().err == \
        "dvp: error: config key 'renderer.refine' expects bool, got 'maybe'\n"
    assert not out.exists()


def test_track_with_the_torch_backend_in_chunks(face_video: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """`--set tracker.landmarks=torch`: the video's chunks (3 frames each) run as streams
    side by side; the same frames have a face and the fit agrees with MediaPipe's."""
    import logging

    from tracker.choices import forget_choices

    forget_choices()
    caplog.set_level(logging.INFO, logger="tracker.choices")
    ref, out = tmp_path / "mp.npz", tmp_path / "torch.npz"
    assert main(["track", str(face_video), "-o", str(ref), "--device", "cpu", *SETS]) == 0
    # the same focal length for both: the calibration's own instability (a focal length
    # moved by a few percent by landmarks 0.02 px apart) is not what is compared here
    focal = str(float(FaceParams.load(ref).focal[0]))
    assert main(["track", str(face_video), "-o", str(out), "--device", "cpu", *SETS,
                 "--focal", focal, "--set", "tracker.landmarks=torch",
                 "--set", "tracker.landmarks_chunk=3"]) == 0
    assert ("landmarks: torch on cpu, float32 (MediaPipe's face models in torch)"
            in [r.getMessage() for r in caplog.records])
    a, b = FaceParams.load(ref), FaceParams.load(out)
    np.testing.assert_array_equal(b.valid, a.valid)
    v = a.valid
    assert np.abs(np.degrees(b.rotation[v] - a.rotation[v])).max() < 1.0
    assert np.abs(b.translation[v] - a.translation[v]).max() < 0.5  # cm


def test_track_with_the_refinement(face_video: Path, tmp_path: Path) -> None:
    """`--set renderer.refine=true` (off by default on the CPU): the fit refined against the
    frames (small settings: a quick run); frames without a face stay as they were."""
    plain, refined = tmp_path / "plain.npz", tmp_path / "refined.npz"
    assert main(["track", str(face_video), "-o", str(plain), "--device", "cpu", *SETS]) == 0
    small = ["--set", "renderer.refine=true", "--set", "renderer.refine_size=64",
             "--set", "renderer.refine_keyframes=3", "--set", "renderer.refine_keyframe_steps=4",
             "--set", "renderer.refine_iterations=1"]
    assert main(["track", str(face_video), "-o", str(refined), "--device", "cpu", *SETS,
                 *small]) == 0
    a, b = FaceParams.load(plain), FaceParams.load(refined)
    np.testing.assert_array_equal(b.valid, a.valid)
    v = a.valid
    for key in ("rotation", "translation", "expression", "sh"):
        assert np.all(np.isfinite(getattr(b, key))), key
    assert not np.allclose(b.rotation[v], a.rotation[v])  # moved ...
    assert np.abs(np.degrees(b.rotation[v] - a.rotation[v])).max() < 10.0  # ... not far
    assert not np.allclose(b.sh[v], a.sh[v])  # per-frame lighting estimated
