"""Held-out image metrics (DESIGN.md): PSNR, SSIM and L1 on RGB in [0, 1], whole S x S frame.

Each metric is computed per frame and averaged over the held-out frames. PSNR is
`10 log10(1 / MSE)` dB per frame (MSE floored at 1e-10, i.e. at most 100 dB). SSIM is
scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=-1)`. L1 is the mean absolute error.

Per-region figures (`evaluate`'s `regions`): the same three over the pixels of the face,
the mouth and the background (`generator.regions`).

The baseline of `evaluate` is what a renderer alone gives: the current frame's colour
rendering pasted, where the conditioning mask is 1, onto the mean held-in frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from skimage.metrics import structural_similarity

from generator.dataset import TrainingData, WindowDataset
from generator.regions import REGION_NAMES, region_masks

log = logging.getLogger(__name__)


#: Border of SSIM's window (scikit-image's for sigma 1.5): its whole-frame mean leaves it out.
_SSIM_PAD = 5


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in dB of `[H, W, 3]` float RGB in [0, 1]."""
    mse = float(np.mean((pred.astype(np.float64) - truth.astype(np.float64)) ** 2))
    return _psnr_of(mse)


def _psnr_of(mse: float) -> float:
    return 10.0 * float(np.log10(1.0 / max(mse, 1e-10)))


def _ssim_map(pred: np.ndarray, truth: np.ndarray) -> tuple[float, np.ndarray]:
    mean, full = structural_similarity(
        pred.astype(np.float64), truth.astype(np.float64), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, channel_axis=-1, full=True)
    return float(mean), full.mean(-1)


def ssim(pred: np.ndarray, truth: np.ndarray) -> float:
    """SSIM of `[H, W, 3]` float RGB in [0, 1] (DESIGN.md's scikit-image settings)."""
    return _ssim_map(pred, truth)[0]


def l1(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute error of `[H, W, 3]` float RGB in [0, 1]."""
    return float(np.mean(np.abs(pred.astype(np.float64) - truth.astype(np.float64))))


def frame_metrics(pred: np.ndarray, truth: np.ndarray,
                  regions: dict[str, np.ndarray] | None = None
                  ) -> dict[str, Any]:
    """{'psnr', 'ssim', 'l1'} of one `[H, W, 3]` uint8 RGB frame against the ground truth.

    With `regions` ({name: `[H, W]` bool}), also 'regions': {name: {'psnr', 'ssim', 'l1'}}
    over that region's pixels (PSNR of the region's MSE, the mean of SSIM's map there
    leaving out its 5-pixel border as the whole-frame SSIM does), or None for an empty
    region.
    """
    a, b = pred.astype(np.float64) / 255.0, truth.astype(np.float64) / 255.0
    mean_ssim, ssim_map = _ssim_map(a, b)
    row: dict[str, Any] = {"psnr": psnr(a, b), "ssim": mean_ssim, "l1": l1(a, b)}
    if regions is not None:
        inner = np.zeros(ssim_map.shape, bool)
        inner[_SSIM_PAD:-_SSIM_PAD, _SSIM_PAD:-_SSIM_PAD] = True
        err = a - b
        row["regions"] = {}
        for name, mask in regions.items():
            if not mask.any():
                row["regions"][name] = None
                continue
            inside = mask & inner
            row["regions"][name] = {
                "psnr": _psnr_of(float(np.mean(err[mask] ** 2))),
                "ssim": float(ssim_map[inside].mean()) if inside.any() else float(
                    ssim_map[mask].mean()),
                "l1": float(np.mean(np.abs(err[mask])))}
    return row


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "l1")}


def _region_means(model_rows: list[dict[str, Any]],
                  base_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per region: the means over the frames where it is not empty (None where it never is)."""
    out: dict[str, Any] = {}
    for name in REGION_NAMES:
        pairs = [(m["regions"][name], b["regions"][name]) for m, b in zip(model_rows, base_rows)
                 if m["regions"][name] is not None]
        out[name] = None if not pairs else {
            "frames": len(pairs), "model": _mean([p[0] for p in pairs]),
            "baseline": _mean([p[1] for p in pairs])}
    return out


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


def frame_regions(data: TrainingData, index: int) -> dict[str, np.ndarray]:
    """{'face', 'mouth', 'background'}: `[S, S]` bool masks of frame `index`."""
    cond = torch.from_numpy(np.array(data.conditioning[index:index + 1]))
    mask = torch.from_numpy(np.array(data.masks[index:index + 1]))
    return {k: v[0, 0].numpy() for k, v in region_masks(cond, mask, data.mouth_box).items()}


def evaluate(runtime: Callable[[torch.Tensor], torch.Tensor], data: TrainingData,
             device: torch.device, batch: int = 1) -> dict[str, object]:
    """DESIGN.md's held-out report for a generator runtime and the renderer baseline.

    runtime: `window [B, 99, S, S] float32 on device -> [B, S, S, 3] uint8` (generator.runtime).
    Returns {'frames': n, 'model': {'psnr', 'ssim', 'l1'}, 'baseline': {same}, 'regions':
    {'face' | 'mouth' | 'background': {'frames', 'model', 'baseline'} or None}}: the same
    figures over each region's pixels (`generator.regions`), averaged over the frames where
    the region is not empty.
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
            regions = frame_regions(data, int(heldout[p]))
            model_rows.append(frame_metrics(out[k], truth, regions))
            base_rows.append(frame_metrics(baseline_frame(data, heldout[p], mean_frame), truth,
                                           regions))
    report = {"frames": len(heldout), "model": _mean(model_rows), "baseline": _mean(base_rows),
              "regions": _region_means(model_rows, base_rows)}
    log.info("held-out metrics: %s", report)
    return report
