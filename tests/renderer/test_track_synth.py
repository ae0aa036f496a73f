"""Tracker end to end: `dvp track` on `dvp synth` output recovers the ground truth.

Prints the figures (run with -s to see them): rotation error (degrees), face-region vertex
error (mm, model frame: identity + expression, pose removed), jawOpen and eyeBlink mean
absolute errors. The bounds are loose: they catch a broken pipeline, not small regressions.
"""

import numpy as np
import pytest
import torch

from streamer.cli.commands import COMMANDS
from streamer.cli.main import main
from tracker.params import FaceParams
from tracker.rotation import axis_angle_to_matrix

pytestmark = pytest.mark.slow


def _errors(model, gt: FaceParams, tr: FaceParams) -> dict[str, float]:
    rg = axis_angle_to_matrix(torch.from_numpy(gt.rotation)).numpy()
    rt = axis_angle_to_matrix(torch.from_numpy(tr.rotation)).numpy()
    rel = np.einsum("tij,tkj->tik", rg, rt)
    cos = np.clip((np.trace(rel, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    ids = model.region_vertices("narrow_face")
    vg = model.vertices(gt.identity[None], gt.expression, vertex_ids=ids)
    vt = model.vertices(tr.identity[None], tr.expression, vertex_ids=ids)
    jaw = model.expression_index("jawOpen")
    blinks = [model.expression_index(n) for n in ("eyeBlink_L", "eyeBlink_R")]
    return {
        "valid": float(tr.valid.mean()),
        "rotation_deg_median": float(np.degrees(np.median(np.arccos(cos)))),
        "face_vertex_mm_mean": float(np.linalg.norm(vg - vt, axis=-1).mean() * 10.0),
        "jawOpen_mae": float(np.abs(gt.expression[:, jaw] - tr.expression[:, jaw]).mean()),
        "jawOpen_corr": float(np.corrcoef(gt.expression[:, jaw], tr.expression[:, jaw])[0, 1]),
        "eyeBlink_mae": float(np.abs(gt.expression[:, blinks] - tr.expression[:, blinks])
                              .mean()),
        "eyeBlink_max_error": float(np.abs(gt.expression[:, blinks]
                                           - tr.expression[:, blinks]).max()),
    }


def test_track_recovers_synth_ground_truth(face_model, tmp_path):
    pytest.importorskip("mediapipe")
    if not any("track" in module.COMMANDS for module in COMMANDS):
        pytest.skip("'dvp track' is not registered yet")
    assert main(["synth", "-o", str(tmp_path), "--frames", "50", "--res", "256", "--seed", "0",
                 "--device", "cpu"]) == 0
    gt = FaceParams.load(tmp_path / "params.npz")
    out = tmp_path / "tracked.npz"
    assert main(["track", str(tmp_path / "video.mp4"), "-o", str(out), "--focal",
                 str(float(gt.focal[0])), "--device", "cpu"]) == 0
    tr = FaceParams.load(out)
    err = _errors(face_model, gt, tr)
    print("track on synth:", err)
    assert err["valid"] == 1.0
    assert err["rotation_deg_median"] < 10.0
    assert err["face_vertex_mm_mean"] < 12.0
    assert err["jawOpen_mae"] < 0.12 and err["jawOpen_corr"] > 0.5
    assert err["eyeBlink_mae"] < 0.12
