"""A real browser drives the page: headless Chromium with a fake webcam (a Y4M clip) opens
`dvp serve`'s page, which connects over /ws and WebRTC; the reenacted frames must arrive
and not be blank. Chromium is driven through the DevTools protocol on 127.0.0.1.

Skipped when no Chromium is installed (Debian package `chromium`; `.ci/run` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from websockets.sync.client import connect

from streamer.cli.config import load_config
from tests.conftest import MEDIA as MEDIA_DIR

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or \
    shutil.which("google-chrome")
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


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's WebSocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, timeout: float = 20.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"DevTools {method} did not answer in {timeout} s")
            reply = json.loads(self.ws.recv(timeout=left))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")


def launch_chromium(profile: Path, clip: Path, url: str) -> tuple[subprocess.Popen, int]:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--no-first-run",
            "--disable-sync", "--disable-default-apps", "--mute-audio",
            "--autoplay-policy=no-user-gesture-required",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={clip}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", url]
    log = profile / "chromium.log"
    with open(log, "wb") as err:  # a file, not a pipe: Chromium's logging cannot block it
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "HOME": str(profile)})
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return proc, int(port_file.read_text().split()[0])
        if proc.poll() is not None:
            raise RuntimeError(f"Chromium exited: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("Chromium did not open its DevTools port within 60 s")


def page_socket(port: int, url: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            targets = json.load(r)
        for target in targets:
            if target.get("type") == "page" and target.get("url", "").startswith(url):
                return target["webSocketDebuggerUrl"]
        time.sleep(0.2)
    raise TimeoutError("the page did not appear in Chromium's targets")


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
    proc, port = launch_chromium(profile, clip, page)
    try:
        with connect(page_socket(port, server.url), max_size=None, open_timeout=10) as ws:
            drive_page(DevTools(ws), server)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


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
