"""Fixtures of the streamer tests: a tiny target directory, stand-in session stages, and a
live server running in a background thread.

The target directory is made with generator.target's TargetWriter, holds a generator of
random weights (the runtime contract is all the transport needs) and a few frames. Session
stages stand in for the tracker's live fit and transfer (tests only): `FaceCueTracker` sees
a "face" in any frame that is not almost black and reads a head yaw from the frame's colour
balance; `PoseRetarget` puts that yaw on the target at rest. The conditioning renderer is
`ShadedDiskConditioner`, fast at 64 px (one test uses the real ConditioningRenderer).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamer.config import Config, load_config
from streamer.controls import Controls
from streamer.pipeline import SessionStages
from tracker.params import FaceParams

SIZE = 64
N_W = 11


def make_target_dir(root: Path, names: list[str], size: int = SIZE, frames: int = 4,
                    fps: float = 30.0, n_w: int = N_W, ngf: int = 8, seed: int = 0,
                    source_video: Path | None = None,
                    crop: tuple[int, int, int] | None = None) -> Path:
    """A complete target directory with an untrained (random) generator checkpoint."""
    from generator.checkpoint import save_checkpoint
    from generator.target import TargetInfo, TargetWriter, file_sha256, software_versions
    from generator.unet import UNet

    rng = np.random.default_rng(seed)
    params = FaceParams.empty(frames, names, (size, size), focal=2.5 * size)
    with TargetWriter(root) as writer:
        for _ in range(frames):
            writer.add_frame(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        writer.write_params(params)
        writer.write_albedo(np.full((16, 32, 3), 170, np.uint8))
        writer.write_neutral({"rotation": np.zeros(3, np.float32),
                              "translation": np.array([0, 0, 50], np.float32),
                              "expression": np.zeros(len(names), np.float32)})
        info = TargetInfo(
            source_video=str(source_video or "missing-source.mp4"),
            source_sha256=file_sha256(source_video) if source_video else "0" * 64,
            crop=crop or (0, 0, size), resolution=size, window=n_w, preset="tiny",
            holdout_start=frames - 1, frames=frames, fps=fps,
            consent="test fixture: no real person", software=software_versions())
        writer.commit(info)
    torch.manual_seed(seed)
    model = UNet(size=size, n_w=n_w, ngf=ngf)
    save_checkpoint(root / "checkpoints", {"step": 0, "generator": {
        "shape": model.shape(), "state": model.state_dict()}})
    return root


class ShadedDiskConditioner:
    """Conditioning stand-in: a disk whose position follows the head's yaw (9 channels)."""

    def __init__(self, size: int) -> None:
        self.size = size
        yy, xx = (torch.arange(size, dtype=torch.float32)[:, None] + 0.5) / size, \
            (torch.arange(size, dtype=torch.float32)[None, :] + 0.5) / size
        self.yy, self.xx = yy.expand(size, size), xx.expand(size, size)
        self.calls = 0

    def frames(self, params: FaceParams, indices: Any = None) -> torch.Tensor:
        self.calls += 1
        yaw = float(params.rotation[0, 1])
        jaw = float(params.expression[0].max())
        cx = 0.5 + 0.6 * yaw
        inside = ((self.xx - cx) ** 2 + (self.yy - 0.5) ** 2 < 0.09).float()
        frame = torch.stack([inside * (0.3 + 0.5 * self.xx), inside * self.yy, inside * 0.5,
                             inside * self.xx, inside * self.yy, inside * jaw,
                             inside, inside * 0.5, inside * 0.2])
        return frame[None]


class FaceCueTracker:
    """Source-tracker stand-in: a face is any frame brighter than 20 grey levels on average;
    its yaw is (mean red - mean blue) / 255 radians."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.closed = False
        self.frames = 0

    def __call__(self, rgb: np.ndarray, timestamp: float,
                 stage_ms: dict[str, float]) -> FaceParams | None:
        self.frames += 1
        stage_ms["landmarks"] = 0.0
        stage_ms["fit"] = 0.0
        if float(rgb.mean()) < 20.0:
            return None
        yaw = (float(rgb[..., 0].mean()) - float(rgb[..., 2].mean())) / 255.0
        p = FaceParams.empty(1, self.names, rgb.shape[:2], focal=float(rgb.shape[1]))
        return replace(p, rotation=np.array([[0.0, yaw, 0.0]], np.float32),
                       valid=np.ones(1, bool))

    def close(self) -> None:
        self.closed = True


class PoseRetarget:
    """Transfer stand-in: the target at rest with the source's rotation."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.neutral_calls = 0

    def __call__(self, source: FaceParams, controls: Controls) -> FaceParams:
        return replace(self.target.rest, rotation=source.rotation.copy())

    def rest(self, controls: Controls) -> FaceParams:
        return self.target.rest

    def set_neutral(self) -> None:
        self.neutral_calls += 1


def stand_in_stages(target: Any, config: Config) -> SessionStages:
    return SessionStages(tracker=FaceCueTracker(target.expression_names),
                         retarget=PoseRetarget(target))


@pytest.fixture(scope="session")
def names(face_model: Any) -> list[str]:
    return list(face_model.expression_names)


@pytest.fixture(scope="session")
def target_dir(tmp_path_factory: pytest.TempPathFactory, names: list[str]) -> Path:
    return make_target_dir(tmp_path_factory.mktemp("targets") / "tiny", names)


@pytest.fixture()
def config() -> Config:
    return load_config(None, [])


@pytest.fixture(scope="session")
def loaded_target(target_dir: Path, face_model: Any) -> Any:
    from streamer.stages import LoadedTarget

    return LoadedTarget(target_dir, load_config(None, []), torch.device("cpu"),
                        conditioner=ShadedDiskConditioner(SIZE), face_model=face_model)


@dataclass
class RunningServer:
    server: Any
    url: str
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def ws_url(self) -> str:
        base = self.url.split("?")[0].replace("http://", "ws://").replace("https://", "wss://")
        return base + "ws"

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture()
def run_server(loaded_target: Any) -> Iterator[Callable[..., RunningServer]]:
    """Start a DvpServer on 127.0.0.1 (free port) in a thread: `run_server(**options)`."""
    from streamer.server import DvpServer, ServeOptions

    running: list[RunningServer] = []

    def start(config: Config | None = None, stage_factory: Any = stand_in_stages,
              **options: Any) -> RunningServer:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        box: dict[str, Any] = {}

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                server = DvpServer(loaded_target, config or load_config(None, []),
                                   ServeOptions(host="127.0.0.1", port=0, **options),
                                   stage_factory=stage_factory)
                box["url"] = loop.run_until_complete(server.start())
                box["server"] = server
            except BaseException as err:  # reported to the test below
                box["error"] = err
            ready.set()
            if "server" in box:
                loop.run_forever()

        thread = threading.Thread(target=main, name="test-server", daemon=True)
        thread.start()
        ready.wait(30)
        if "error" in box:
            raise box["error"]
        handle = RunningServer(box["server"], box["url"], loop, thread)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        async def shutdown(server: Any = handle.server) -> None:
            await server._on_shutdown(server.app)
            await server.close()

        try:
            handle.call(shutdown())
        finally:
            handle.loop.call_soon_threadsafe(handle.loop.stop)
            handle.thread.join(10)
