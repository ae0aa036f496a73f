"""A real browser drives the page: headless Chromium with a fake webcam (a Y4M clip) opens
`dvp serve`'s page, which connects over /ws and WebRTC; the reenacted frames must arrive
and not be blank. Chromium is driven through the DevTools protocol on 127.0.0.1.

Skipped when no Chromium is installed (Debian package `chromium`; `.ci/run` installs it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from websockets.sync.client import connect

from bench.chromium import CHROMIUM, DevTools, launch, page_socket, stop
from streamer.cli.config import load_config
from tests.conftest import MEDIA as MEDIA_DIR

MEDIA = MEDIA_DIR / "megamind.avi"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed "
                                "(apt-get install chromium)")


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 15) -> None:
    """Frames (H, W, 3) uint8 RGB as a YUV4MPEG2 file (4:2:0), what Chromium's fake webcam
    plays in a loop."""
    h, w = frames[0].shape[:2]
    with open(path, "wb") as fh:
        fh.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            yuv = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            fh.write(b"FRAME\n" + yuv.to_ndarray().tobytes())


def clip_frames(count: int = 30) -> list[np.ndarray]:
    """A face clip: the shared animated face video when present, else a coloured ramp."""
    frames = []
    if MEDIA.is_file():
        from streamer.video.io import read_frames

        for rgb, _ in read_frames(MEDIA, max_frames=count):
            frames.append(np.ascontiguousarray(rgb[::3, ::3][:176, :240]))
    else:
        for i in range(count):
            frames.append(np.full((176, 240, 3), (120 + 3 * i, 90, 70), np.uint8))
    return frames


def test_browser_receives_reenacted_frames(run_server: Any, real_target: Any,
                                           tmp_path: Path) -> None:
    """The whole live path: the page's fake webcam shows a face, the server runs the real
    session stages (MediaPipe, FaceTracker, transfer), renderer and generator."""
    from streamer.live.stages import make_session_stages

    server = run_server(target=real_target, stage_factory=make_session_stages,
                        config=load_config(None, ["tracker.calibration_seconds=0.5"]))
    clip = tmp_path / "clip.y4m"
    write_y4m(clip, clip_frames())
    profile = tmp_path / "profile"
    profile.mkdir()
    page = server.url + "?autostart=1"
    proc, port = launch(profile, page, ["--use-fake-ui-for-media-stream",
                                        "--use-fake-device-for-media-stream",
                                        f"--use-file-for-fake-video-capture={clip}"])
    try:
        with connect(page_socket(port, server.url), max_size=None, open_timeout=10) as ws:
            drive_page(DevTools(ws), server)
    finally:
        stop(proc)


def drive_page(devtools: DevTools, server: Any) -> None:
    """Wait for frames in the page, check them, switch the mode, stop."""
    deadline = time.monotonic() + 90
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = devtools.evaluate(
            "window.dvp ? {state: dvp.state, error: dvp.error, shown: dvp.framesShown, "
            "params: dvp.paramsReceived, sample: dvp.sample()} : null") or {}
        if not state:  # the page is still loading
            time.sleep(0.2)
            continue
        if state["error"]:
            pytest.fail(f"page error: {state['error']}")
        if state["shown"] >= 10 and state["params"] >= 10 and state["sample"]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no reenacted frames in the browser within 90 s: {state}")
    sample = state["sample"]
    assert (sample["width"], sample["height"]) == (64, 64)
    assert sample["std"] > 5.0, f"the output looks blank: {sample}"
    assert state["state"] == "live"
    # the page asked for the smallest playout delay of the video (Chromium has the knob),
    # and the server's answer sends the video with a zero playout delay
    assert devtools.evaluate("dvp.jitterBufferTarget") == 0
    assert devtools.evaluate("pc.remoteDescription.sdp.includes("
                             "'http://www.webrtc.org/experiments/rtp-hdrext/playout-delay')")
    params = devtools.evaluate("dvp.lastParams")
    assert params["type"] == "params"
    faces = devtools.evaluate("dvp.facesSeen")
    assert faces >= 5, f"the server found the webcam's face in {faces} frames only"
    assert set(params["stage_ms"]) >= {"landmarks", "fit", "render", "generator"}
    assert len(server.server.sessions) == 1
    # the page's controls reach the session
    devtools.evaluate("document.getElementById('mode').value = 'face';"
                      "document.getElementById('mode').onchange(); true")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if devtools.evaluate("dvp.lastParams.mode") == "face":
            break
        time.sleep(0.2)
    else:
        pytest.fail("the mode switch did not reach the server")
    devtools.evaluate("document.getElementById('stop').onclick(); true")
    deadline = time.monotonic() + 15
    while server.server.sessions and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.server.sessions, "the session outlived the page's stop"
