"""Held-out image metrics (DESIGN.md): PSNR, SSIM and L1 on RGB in [0, 1], whole S x S frame.

Each metric is computed per frame and averaged over the held-out frames. PSNR is
`10 log10(1 / MSE)` dB per frame (MSE floored at 1e-10, i.e. at most 100 dB). SSIM is
scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=-1)`. L1 is the mean absolute error.

The baseline of `evaluate` is what a renderer alone gives: the current frame's colour
rendering pasted, where the conditioning mask is 1, onto the mean held-in frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from skimage.metrics import structural_similarity

from generator.dataset import TrainingData, WindowDataset

log = logging.getLogger(__name__)


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in dB of `[H, W, 3]` float RGB in [0, 1]."""
    mse = float(np.mean((pred.astype(np.float64) - truth.astype(np.float64)) ** 2))
    return 10.0 * float(np.log10(1.0 / max(mse, 1e-10)))


def ssim(pred: np.ndarray, truth: np.ndarray) -> float:
    """SSIM of `[H, W, 3]` float RGB in [0, 1] (DESIGN.md's scikit-image settings)."""
    return float(structural_similarity(
        pred.astype(np.float64), truth.astype(np.float64), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, channel_axis=-1))


def l1(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute error of `[H, W, 3]` float RGB in [0, 1]."""
    return float(np.mean(np.abs(pred.astype(np.float64) - truth.astype(np.float64))))


def frame_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """{'psnr', 'ssim', 'l1'} of one `[H, W, 3]` uint8 RGB frame against the ground truth."""
    a, b = pred.astype(np.float64) / 255.0, truth.astype(np.float64) / 255.0
    return {"psnr": psnr(a, b), "ssim": ssim(a, b), "l1": l1(a, b)}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "l1")}


def mean_heldin_frame(data: TrainingData, chunk: int = 256) -> np.ndarray:
    """Mean of the held-in frames, `[S, S, 3]` float64 in [0, 255]."""
    total = np.zeros(data.frames.shape[1:], np.float64)
    for start in range(0, data.holdout_start, chunk):
        total += data.frames[start:min(start + chunk, data.holdout_start)].sum(0, dtype=np.float64)
    return total / data.holdout_start


def baseline_frame(data: TrainingData, index: int, mean_frame: np.ndarray) -> np.ndarray:
    """The baseline of frame `index`: colour rendering where the mask is 1, else the mean
    held-in frame; `[S, S, 3]` uint8."""
    colour = np.asarray(data.conditioning[index, 0:3], np.float64).transpose(1, 2, 0)
    if data.conditioning.dtype != np.uint8:
        colour = colour * 255.0
    mask = np.asarray(data.masks[index, 0]).astype(bool)[..., None]
    return np.where(mask, colour, mean_frame).round().clip(0, 255).astype(np.uint8)


def evaluate(runtime: Callable[[torch.Tensor], torch.Tensor], data: TrainingData,
             device: torch.device, batch: int = 1) -> dict[str, object]:
    """DESIGN.md's held-out report for a generator runtime and the renderer baseline.

    runtime: `window [B, 99, S, S] float32 on device -> [B, S, S, 3] uint8` (generator.runtime).
    Returns {'frames': n, 'model': {'psnr', 'ssim', 'l1'}, 'baseline': {same}}.
    """
    heldout = data.heldout_indices
    dataset = WindowDataset(data, heldout)
    mean_frame = mean_heldin_frame(data)
    model_rows, base_rows = [], []
    for start in range(0, len(heldout), batch):
        positions = np.arange(start, min(start + batch, len(heldout)))
        windows, _ = dataset.batch(positions)
        out = runtime(windows.to(device)).cpu().numpy()
        for k, p in enumerate(positions):
            truth = np.asarray(data.frames[heldout[p]])
            model_rows.append(frame_metrics(out[k], truth))
            base_rows.append(frame_metrics(baseline_frame(data, heldout[p], mean_frame), truth))
    report = {"frames": len(heldout), "model": _mean(model_rows), "baseline": _mean(base_rows)}
    log.info("held-out metrics: %s", report)
    return report
