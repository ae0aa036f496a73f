"""`dvp synth` and `dvp render` end to end (tiny sizes)."""

import numpy as np
import pytest

from streamer.cli.main import main
from streamer.video.io import probe, read_video
from tracker.params import FaceParams


@pytest.fixture(scope="module")
def synth_dir(face_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["synth", "-o", str(out), "--frames", "5", "--res", "48", "--seed", "3",
                 "--device", "cpu"]) == 0
    return out


def test_synth_writes_video_and_ground_truth(synth_dir):
    params = FaceParams.load(synth_dir / "params.npz")
    assert params.frames == 5 and params.valid.all()
    assert tuple(params.image_size) == (48, 48)
    frames, times, fps = read_video(synth_dir / "video.mp4")
    assert frames.shape == (5, 48, 48, 3) and fps == pytest.approx(25.0)
    assert np.allclose(times, params.timestamps, atol=1e-3)


def test_render_writes_the_three_images_side_by_side(synth_dir, tmp_path):
    out = tmp_path / "cond.mp4"
    assert main(["render", str(synth_dir / "params.npz"), "-o", str(out), "--res", "32",
                 "--device", "cpu"]) == 0
    info = probe(out)
    assert (info.width, info.height, info.frame_count) == (96, 32, 5)
    frames, _, _ = read_video(out)
    assert frames[:, :, 64:].max() > 200  # the gaze map's white sclera
    assert frames[:, 0].mean() < 10  # background at the top


def test_bad_arguments_exit_1_with_a_message(tmp_path, capsys):
    assert main(["synth", "-o", str(tmp_path / "x"), "--frames", "0", "--device", "cpu"]) == 1
    assert "dvp: error: --frames must be positive, got 0" in capsys.readouterr().err
    assert main(["render", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "c.mp4"),
                 "--device", "cpu"]) == 1
    assert "no such parameters file" in capsys.readouterr().err
