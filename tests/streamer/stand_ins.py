"""Stand-ins for the streamer tests (tests only, never the product): a tiny target
directory, session stages in place of the tracker's live fit and transfer, a fast
conditioning renderer.

The target directory is made with generator.target's TargetWriter and holds a generator of
random weights (the runtime contract is all the transport needs) and a few frames.
`FaceCueTracker` sees a "face" in any frame that is not almost black and reads a head yaw
from the frame's colour balance; `PoseRetarget` puts that yaw on the target at rest.
`ShadedDiskConditioner` draws a disk that follows the yaw (one test uses the real
ConditioningRenderer).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamer.cli.config import Config
from streamer.live.controls import Controls
from streamer.live.pipeline import SessionStages
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

    def landmarks(self, rgb: np.ndarray) -> tuple[float, float, tuple[int, int]] | None:
        """The frame's cues: (brightness, yaw, (h, w)), None when it is too dark."""
        self.frames += 1
        if float(rgb.mean()) < 20.0:
            return None
        yaw = (float(rgb[..., 0].mean()) - float(rgb[..., 2].mean())) / 255.0
        return float(rgb.mean()), yaw, rgb.shape[:2]

    def fit(self, cues: Any, timestamp: float, stage_ms: dict[str, float]) -> FaceParams | None:
        stage_ms["fit"] = 0.0
        if cues is None:
            return None
        _, yaw, shape = cues
        p = FaceParams.empty(1, self.names, shape, focal=float(shape[1]))
        return replace(p, rotation=np.array([[0.0, yaw, 0.0]], np.float32),
                       valid=np.ones(1, bool))

    def __call__(self, rgb: np.ndarray, timestamp: float,
                 stage_ms: dict[str, float]) -> FaceParams | None:
        stage_ms["landmarks"] = 0.0
        return self.fit(self.landmarks(rgb), timestamp, stage_ms)

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
