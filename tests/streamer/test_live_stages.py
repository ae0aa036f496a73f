"""The session stages made of the tracker's pieces: TransferStage (tracker.transfer with the
session's neutral calibration) on synthetic parameters, and the whole real pipeline
(MediaPipe, FaceTracker, transfer, ConditioningRenderer, generator runtime) on frames of a
real video."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamer.cli.config import load_config
from streamer.live.controls import Controls
from streamer.live.pipeline import LivePipeline
from streamer.live.stages import LoadedTarget, TransferStage, edit_of, make_session_stages
from tests.conftest import MEDIA as MEDIA_DIR
from tracker.params import FaceParams

MEDIA = MEDIA_DIR / "megamind.avi"


def source(names: list[str], t: float, yaw: float = 0.0, jaw: float = 0.0) -> FaceParams:
    p = FaceParams.empty(1, names, (480, 640), focal=800.0, timestamps=np.array([t]))
    expression = p.expression.copy()
    expression[0, names.index("jawOpen")] = jaw
    return replace(p, rotation=np.array([[0.0, yaw, 0.0]], np.float32),
                   expression=expression, valid=np.ones(1, bool))


def test_transfer_stage_neutral_and_modes(loaded_target: Any, names: list[str]) -> None:
    stage = TransferStage(loaded_target, load_config(None, []))
    # the first half second is the source's neutral: a head turned 0.2 rad, jaw a bit open
    for i in range(6):
        out = stage(source(names, i * 0.1, yaw=0.2, jaw=0.1), Controls())
    np.testing.assert_allclose(out.rotation, loaded_target.rest.rotation, atol=1e-5)
    assert stage.source_neutral.rotation[1] == pytest.approx(0.2, abs=1e-5)
    # from then on, changes from that neutral move the target
    out = stage(source(names, 1.0, yaw=0.3, jaw=0.6), Controls())
    assert out.rotation[0, 1] == pytest.approx(0.1, abs=1e-4)
    assert out.expression[0, names.index("jawOpen")] == pytest.approx(0.5, abs=1e-5)
    assert out.identity is loaded_target.params.identity or \
        np.allclose(out.identity, loaded_target.params.identity)
    # dub: mouth and jaw only, the target's own pose
    out = stage(source(names, 1.1, yaw=0.3, jaw=0.6), Controls(mode="dub"))
    np.testing.assert_allclose(out.rotation, loaded_target.rest.rotation, atol=1e-6)
    assert out.expression[0, names.index("jawOpen")] == pytest.approx(0.5, abs=1e-5)
    # edit: the sliders
    edit = Controls(mode="edit", head_rotation_deg=(0.0, 10.0, 0.0), expression_gain=0.5)
    out = stage(source(names, 1.2, yaw=0.2, jaw=0.6), edit)
    assert out.rotation[0, 1] == pytest.approx(np.deg2rad(10.0), abs=1e-4)
    assert out.expression[0, names.index("jawOpen")] == pytest.approx(0.25, abs=1e-5)
    assert edit_of(Controls(mode="full"), names) is None
    # set neutral: the next half second becomes the neutral
    stage.set_neutral()
    for i in range(6):
        out = stage(source(names, 2.0 + i * 0.1, yaw=-0.1), Controls())
    np.testing.assert_allclose(out.rotation, loaded_target.rest.rotation, atol=1e-5)


@pytest.mark.skipif(not MEDIA.is_file(), reason=f"{MEDIA} is not there")
def test_the_real_pipeline_on_a_real_face(target_dir: Path, face_model: Any) -> None:
    from streamer.video.io import read_frames

    config = load_config(None, ["tracker.calibration_seconds=0.5"])
    target = LoadedTarget(target_dir, config, torch.device("cpu"), face_model=face_model)
    stages = make_session_stages(target, config)
    pipeline = LivePipeline(target, stages, config, eyelook=target.eyelook,
                            eyelook_index=target.eyelook_index)
    outs = [pipeline.process(rgb, t)
            for rgb, t in read_frames(MEDIA, max_frames=24)]
    # calibration runs in a background thread: the stream never waited for it
    assert stages.tracker.tracker.wait_for_calibration(60.0)  # type: ignore[attr-defined]
    pipeline.close()
    faces = [o.face for o in outs]
    assert sum(faces) >= 18, faces
    assert stages.tracker.calibrated  # type: ignore[attr-defined]
    yaws = np.array([o.params.rotation[0, 1] for o in outs if o.face])
    jaw = np.array([o.params.expression[0, target.expression_names.index("jawOpen")]
                    for o in outs if o.face])
    assert np.ptp(yaws) > 1e-3 or np.ptp(jaw) > 1e-3  # the target moves with the source
    for out in outs:
        assert out.image.shape == (64, 64, 3) and np.isfinite(out.params.rotation).all()
        assert {"landmarks", "fit", "transfer", "render", "generator"} <= set(out.stage_ms)
