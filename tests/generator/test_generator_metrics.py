"""PSNR, SSIM and L1 against known values; the held-out report and its renderer baseline."""

import numpy as np
import pytest
import torch

from generator.metrics import baseline_frame, evaluate, l1, mean_heldin_frame, psnr, ssim
from generator.synthetic import synthetic_data


def test_known_values():
    a = np.full((16, 16, 3), 0.5)
    b = a + 0.1
    assert psnr(a, b) == pytest.approx(20.0)
    assert l1(a, b) == pytest.approx(0.1)
    assert psnr(a, a) == pytest.approx(100.0)
    assert ssim(a, a) == pytest.approx(1.0)
    # constant images: SSIM reduces to the luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    c1 = (0.01 * 1.0) ** 2
    assert ssim(a, b) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1), rel=1e-6)


def test_ssim_uses_the_design_settings():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a, b = rng.random((32, 32, 3)), rng.random((32, 32, 3))
    want = structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1, channel_axis=-1)
    assert ssim(a, b) == pytest.approx(want)
    assert ssim(a, b) != pytest.approx(structural_similarity(a, b, data_range=1, channel_axis=-1))


def test_baseline_pastes_the_colour_rendering_on_the_mean_heldin_frame():
    data = synthetic_data(frames=20, size=32)
    mean = mean_heldin_frame(data)
    assert np.allclose(mean, data.frames[: data.holdout_start].mean(0))
    frame = baseline_frame(data, 19, mean)
    mask = data.masks[19, 0].astype(bool)
    assert np.array_equal(frame[mask], data.conditioning[19, 0:3].transpose(1, 2, 0)[mask])
    assert np.array_equal(frame[~mask], mean.round().astype(np.uint8)[~mask])


def test_report_of_a_perfect_runtime():
    data = synthetic_data(frames=30, size=32)
    truth = torch.from_numpy(data.frames)
    calls = iter(data.heldout_indices)

    def oracle(window):
        return truth[[next(calls) for _ in range(window.shape[0])]]

    report = evaluate(oracle, data, torch.device("cpu"), batch=2)
    assert report["frames"] == 3
    assert report["model"] == {"psnr": pytest.approx(100.0), "ssim": pytest.approx(1.0),
                               "l1": 0.0}
    assert 15 < report["baseline"]["psnr"] < 40
    assert set(report["baseline"]) == {"psnr", "ssim", "l1"}
    assert list(report["regions"]) == ["face", "mouth", "background"]
    for name, region in report["regions"].items():
        assert region["frames"] == 3, name
        assert region["model"]["psnr"] == pytest.approx(100.0) and region["model"]["l1"] == 0.0
    assert report["regions"]["face"]["baseline"]["l1"] > 0.0  # the rendering is not the look
