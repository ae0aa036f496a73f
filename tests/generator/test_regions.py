"""Face, mouth and background regions: masks from the conditioning, loss weights, per-region
metrics, and the face model's mouth box."""

import numpy as np
import pytest
import torch

from generator.metrics import frame_metrics
from generator.regions import mouth_mask, pixel_weights, region_masks
from generator.synthetic import synthetic_data


@pytest.fixture(scope="module")
def data():
    return synthetic_data(frames=16, size=32)


def _frame(data, i):
    return (torch.from_numpy(np.array(data.conditioning[i:i + 1])),
            torch.from_numpy(np.array(data.masks[i:i + 1])))


def test_regions_split_the_frame_and_the_mouth_lies_in_the_face(data):
    cond, mask = _frame(data, 3)
    regions = region_masks(cond, mask, data.mouth_box)
    assert set(regions) == {"face", "mouth", "background"}
    assert torch.equal(regions["face"], mask > 0)
    assert torch.equal(regions["background"], ~regions["face"])
    mouth = regions["mouth"]
    assert mouth.any() and not (mouth & ~regions["face"]).any()
    # the disk's mouth box is its lower middle: below the face's centre row
    rows = torch.nonzero(mouth[0, 0])[:, 0].float().mean()
    assert rows > torch.nonzero(regions["face"][0, 0])[:, 0].float().mean()


def test_no_box_no_mouth(data):
    cond, mask = _frame(data, 0)
    assert not mouth_mask(cond[:, 3:6], mask > 0, None).any()


def test_float_and_uint8_conditioning_give_the_same_mouth(data):
    cond, mask = _frame(data, 5)
    as_float = cond.float() / 255.0
    assert torch.equal(mouth_mask(cond[:, 3:6], mask > 0, data.mouth_box),
                       mouth_mask(as_float[:, 3:6], mask > 0, data.mouth_box))


def test_pixel_weights_have_mean_one_and_the_asked_ratios(data):
    cond, mask = _frame(data, 2)
    w = pixel_weights(cond, mask, data.mouth_box, face_weight=1.0, mouth_weight=2.0)
    regions = region_masks(cond, mask, data.mouth_box)
    assert abs(float(w.mean()) - 1.0) < 1e-6
    background = float(w[regions["background"]][0])
    face_only = regions["face"] & ~regions["mouth"]
    assert float(w[face_only][0]) == pytest.approx(2.0 * background)
    assert float(w[regions["mouth"]][0]) == pytest.approx(4.0 * background)


def test_frame_metrics_per_region():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pred = truth.copy()
    pred[:, :8] = 0  # wrong only in the left columns
    face = np.zeros((32, 32), bool)
    face[:, 16:] = True
    mouth = np.zeros((32, 32), bool)
    row = frame_metrics(pred, truth, {"face": face, "mouth": mouth, "background": ~face})
    assert row["regions"]["face"] == {"psnr": 100.0, "ssim": pytest.approx(1.0), "l1": 0.0}
    assert row["regions"]["mouth"] is None
    left = truth[:, :16].astype(np.float64) / 255.0
    left_pred = pred[:, :16].astype(np.float64) / 255.0
    want = 10 * np.log10(1.0 / np.mean((left - left_pred) ** 2))
    assert row["regions"]["background"]["psnr"] == pytest.approx(want)
    assert row["regions"]["background"]["ssim"] < 0.9
    assert set(row) == {"psnr", "ssim", "l1", "regions"}


def test_the_face_models_mouth_box_covers_the_rendered_lips(face_model):
    from renderer.conditioning import ConditioningRenderer
    from renderer.regions import mouth_box
    from tracker.params import FaceParams

    box = mouth_box(face_model)
    assert box.shape == (2, 3) and (box[0] < box[1]).all()
    assert 0.0 <= box[0].min() and box[1].max() <= 1.0
    assert abs((box[0, 0] + box[1, 0]) / 2 - 0.5) < 0.05  # centred left to right
    params = FaceParams.empty(1, list(face_model.expression_names), (64, 64), 120.0)
    renderer = ConditioningRenderer(face_model, None, 64, "cpu")
    cond, mask = renderer.frames(params), renderer.masks(params)
    mouth = mouth_mask(cond[:, 3:6], mask > 0, box)[0, 0]
    assert mouth.sum() > 10
    # the mouth sits in the lower half of the face, around its middle column
    face = torch.nonzero(mask[0, 0] > 0).float()
    spot = torch.nonzero(mouth).float()
    top, bottom = face[:, 0].min(), face[:, 0].max()
    assert top + 0.4 * (bottom - top) < spot[:, 0].mean() < bottom
    assert abs(spot[:, 1].mean() - face[:, 1].mean()) < 3
